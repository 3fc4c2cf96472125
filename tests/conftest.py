"""Shared pytest fixtures: shims first, golden tensors, tiny temp LOL trees."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import glare_nat_arch  # noqa: F401  (compat shims before any basicsr import)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: golden tensors of the official GLARE code (provenance, keys and how to regenerate: tests/data/README.md)
GOLDEN_PATH = REPO_ROOT / "tests" / "data" / "glare_official_tiny.pt"


def load_golden(path: Path = GOLDEN_PATH) -> dict:
    """The golden dict at ``path``; a missing file fails the test (it is part of the repository), never skips it."""
    if not path.is_file():
        pytest.fail(f"golden tensors {path} are missing (they are part of the repository: restore the file)")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def golden() -> dict:
    """The golden dict of ``tests/data/glare_official_tiny.pt`` (see tests/data/README.md)."""
    return load_golden()


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
