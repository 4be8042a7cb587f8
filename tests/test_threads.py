"""The thread setup is chosen before torch starts: `detr_explained.core.configure_threads` (OMP_WAIT_POLICY=PASSIVE
on a busy machine, GOMP_SPINCOUNT=10000 on a quiet one, nothing where the user chose a wait policy), on the paths that come before torch: importing the library first, and the
`detr-explained` command, whose module imports no torch and whose main() chooses before importing it."""
import os
import subprocess
import sys

import pytest

POLICY_VARS = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')


def run(code: str, **extra_env) -> str:
    "stdout of `code` in a fresh Python with no wait policy set (plus `extra_env`)."
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    env.update(extra_env)
    return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True,
                          timeout=300).stdout.strip()


SEEN = "import os, sys; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


BY_LOAD = {'PASSIVE None', 'None 10000'}       # busy machine / quiet machine


def test_library_imported_before_torch_chooses_by_the_load():
    out = run('import detr_explained.core as c, torch; ' + SEEN + "; print(c.THREADS_CHOSEN)")
    seen, chosen = out.splitlines()
    assert seen in BY_LOAD
    assert chosen == ("{'OMP_WAIT_POLICY': 'PASSIVE'}" if seen == 'PASSIVE None' else "{'GOMP_SPINCOUNT': '10000'}")


@pytest.mark.parametrize('load, cores, busy', [(0.1, 2, False), (1.4, 2, False), (1.5, 2, True), (9.0, 2, True),
                                               (6.0, 16, False)])
def test_busy_is_as_many_jobs_as_cores(load, cores, busy):
    from detr_explained.core import machine_busy, configure_threads
    assert machine_busy(load, cores) is busy
    env = {}
    assert configure_threads(env, busy=busy) == env == ({'OMP_WAIT_POLICY': 'PASSIVE'} if busy else {'GOMP_SPINCOUNT': '10000'})


def test_torch_imported_first_changes_nothing():
    assert run('import torch, detr_explained.core; ' + SEEN) == 'None None'


@pytest.mark.parametrize('user', [{'OMP_WAIT_POLICY': 'ACTIVE'}, {'GOMP_SPINCOUNT': '10000'}])
def test_the_users_choice_is_kept(user):
    out = run('import detr_explained.core; ' + SEEN, **user)
    assert out == f"{user.get('OMP_WAIT_POLICY')} {user.get('GOMP_SPINCOUNT')}"


def test_the_command_chooses_before_torch():
    "Importing the command module starts no torch; main() sets the policy before the command (and torch) runs."
    code = ("import os, sys, detr_explained.cli as cli\n"
            "assert 'torch' not in sys.modules\n"
            "cli.COMMANDS['demo'] = lambda args: print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')) or 0\n"
            "sys.exit(cli.main(['demo']))")
    assert run(code) in BY_LOAD
