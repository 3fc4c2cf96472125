"""Shared pytest fixtures: shims first, golden tensors, tiny temp LOL trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import glare_nat_arch  # noqa: F401  (compat shims before any basicsr import)

REPO_ROOT = Path(__file__).resolve().parents[1]
_GOLDEN_NAME = "glare_official_tiny.pt"


def golden_path() -> Path | None:
    """Location of the official-code golden tensors (env GLARE_GOLDEN, else ../shared/golden/)."""
    candidates = []
    if os.environ.get("GLARE_GOLDEN"):
        candidates.append(Path(os.environ["GLARE_GOLDEN"]))
    candidates.append(REPO_ROOT.parent / "shared" / "golden" / _GOLDEN_NAME)
    candidates.append(REPO_ROOT / "tests" / "data" / _GOLDEN_NAME)
    for c in candidates:
        if c.is_file():
            return c
    return None


@pytest.fixture(scope="session")
def golden() -> dict:
    """The golden dict of ``glare_official_tiny.pt`` (see shared/golden/README.md).

    In CI (``CI=true``) a missing file is a failure, never a skip.
    """
    path = golden_path()
    if path is None:
        msg = f"golden tensors {_GOLDEN_NAME} not found (set GLARE_GOLDEN or place ../shared/golden/ beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One thread for the whole session: tiny ops run faster and are immune to OpenMP spin contention on a busy
    2-core box (the Makefile sets OMP_NUM_THREADS=1 for the same reason). Session scope, so module fixtures that
    bit-exact tests compare against are computed with the same thread count as the tests themselves (a float64
    reduction split over 2 threads rounds differently), whatever OMP_NUM_THREADS the caller set."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _keep_one_thread(_one_thread):
    """A test that changes the thread count does not leak it into the next one."""
    yield
    torch.set_num_threads(1)
