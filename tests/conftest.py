"""Shared pytest fixtures.

Tests that need `../shared` (official fixtures, the COCO sample) find it through one setting:
the environment variable `DETR_EXPLAINED_SHARED` (default: `shared/` beside the repository).
Where it is absent they skip with the reason; with `DETR_EXPLAINED_REQUIRE_SHARED=1` (set by
`.ci/run`) the skip becomes a failure, so CI never skips them silently.
"""
import os
from pathlib import Path

import pytest

from detr_explained.core import shared_dir, load_official_fixture
from lab_server import lab_server, lab_browser  # noqa: F401  (JupyterLab + Chromium fixtures, tests/lab_server.py)


def _need(path: Path, what: str) -> Path:
    if path is not None and path.exists(): return path
    msg = (f"{what} not found at {path} (set DETR_EXPLAINED_SHARED to the folder that holds "
           "fixtures/ and coco-sample/)")
    if os.environ.get("DETR_EXPLAINED_REQUIRE_SHARED") == "1": pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared() -> Path:
    "The shared data folder (skips, or fails under DETR_EXPLAINED_REQUIRE_SHARED=1, if absent)."
    return _need(shared_dir(), "shared data folder")


@pytest.fixture(scope="session")
def official_dir(shared) -> Path:
    return _need(shared / "fixtures" / "official", "official fixtures")


@pytest.fixture(scope="session")
def coco_sample(shared) -> Path:
    return _need(shared / "coco-sample", "COCO sample")


@pytest.fixture(scope="session")
def official_fixture(official_dir):
    "`official_fixture(name)` -> fixture dict with the complete `state_dict` (backbone merged)."
    cache = {}
    def load(name: str):
        if name not in cache: cache[name] = load_official_fixture(name, official_dir)
        return cache[name]
    return load
