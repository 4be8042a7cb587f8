"""The thread setup is chosen before torch starts: `detr_explained.core.configure_threads` (OMP_WAIT_POLICY=PASSIVE
unless the user chose a wait policy), on the paths that come before torch: importing the library first, and the
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


def test_library_imported_before_torch_chooses_passive():
    assert run('import detr_explained.core, torch; ' + SEEN) == 'PASSIVE None'


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
            "cli.COMMANDS['demo'] = lambda args: print(os.environ.get('OMP_WAIT_POLICY')) or 0\n"
            "sys.exit(cli.main(['demo']))")
    assert run(code) == 'PASSIVE'
