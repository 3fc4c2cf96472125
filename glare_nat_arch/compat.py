"""Compatibility shims that let stock BasicSR 1.4.2 run on current PyTorch / torchvision / SciPy.

Nothing in site-packages is edited. The import-time aliases below run when any glare-nat package is
imported, which must happen before the first ``import basicsr`` in the process. Run-time patches of
BasicSR functions are applied by :func:`patch_basicsr` (called by the launchers).

Shims (see ``design/basicsr.md`` §4 and the README section "Compatibility shims"):

1. ``torchvision.transforms.functional_tensor`` was removed in torchvision 0.17; basicsr imports
   ``rgb_to_grayscale`` from it at ``import basicsr`` time. We register an alias module.
2. ``scipy.ndimage.filters`` (used by basicsr's NIQE) is deprecated; alias it to ``scipy.ndimage`` if
   it ever disappears.
3. ``distutils.version.LooseVersion`` (used by basicsr's arch_util) is aliased to
   ``packaging.version.Version`` if ``distutils`` is unavailable.
4. ``basicsr.train.load_resume_state`` maps storages to CUDA and searches the cwd; replaced by a
   CPU-safe version that uses ``opt['path']['training_states']``.
5. ``--opt`` on the command line is rewritten to the stock ``-opt``.
6. Exact resume: the stock loop restarts the saved epoch from its first batch, so a run resumed from a
   mid-epoch (or end-of-epoch) checkpoint sees different data than an uninterrupted run.
   ``basicsr.train.create_train_val_dataloader`` is wrapped so that, on resume, the epoch is recomputed
   from the iteration and the batches the interrupted run already consumed in that epoch are skipped;
   random-number-generator states saved in the training state (``rng_states``, written by glare-nat
   models) are restored right before the first resumed batch is drawn.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import types
from collections.abc import Iterator
from typing import Any

__all__ = [
    "apply_import_shims",
    "patch_basicsr",
    "normalise_argv",
    "load_resume_state",
    "capture_rng_states",
    "restore_rng_states",
]

_FUNCTIONAL_TENSOR = "torchvision.transforms.functional_tensor"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def alias_functional_tensor() -> bool:
    """Register ``torchvision.transforms.functional_tensor`` if torchvision no longer ships it.

    Returns True when the alias was installed by this call.
    """
    if sys.modules.get(_FUNCTIONAL_TENSOR) is not None or _importable(_FUNCTIONAL_TENSOR):
        return False
    from torchvision.transforms import functional as F

    mod = types.ModuleType(_FUNCTIONAL_TENSOR)
    mod.rgb_to_grayscale = F.rgb_to_grayscale  # type: ignore[attr-defined]
    mod.__doc__ = "glare-nat alias: torchvision removed this module in 0.17 (basicsr 1.4.2 imports it)."
    sys.modules[_FUNCTIONAL_TENSOR] = mod
    return True


def alias_scipy_filters() -> bool:
    """Alias ``scipy.ndimage.filters`` to ``scipy.ndimage`` once SciPy removes the old module."""
    name = "scipy.ndimage.filters"
    if sys.modules.get(name) is not None or _importable(name):
        return False
    import scipy.ndimage

    sys.modules[name] = scipy.ndimage
    return True


def alias_loose_version() -> bool:
    """Provide ``distutils.version.LooseVersion`` (basicsr arch_util) when distutils is missing."""
    if _importable("distutils.version"):
        return False
    from packaging.version import Version

    distutils = sys.modules.get("distutils") or types.ModuleType("distutils")
    version = types.ModuleType("distutils.version")
    version.LooseVersion = Version  # type: ignore[attr-defined]
    distutils.version = version  # type: ignore[attr-defined]
    sys.modules["distutils"] = distutils
    sys.modules["distutils.version"] = version
    return True


def apply_import_shims() -> None:
    """Install every import-time alias (idempotent)."""
    alias_functional_tensor()
    alias_scipy_filters()
    alias_loose_version()


def load_resume_state(opt: dict):
    """CPU-safe replacement of ``basicsr.train.load_resume_state``.

    Auto-resume looks in ``opt['path']['training_states']`` (under the launcher's root, not the cwd);
    storages are mapped to CPU unless CUDA is available and ``num_gpu != 0``.
    """
    import os

    import torch
    from basicsr.utils import check_resume

    resume_state_path = None
    if opt.get("auto_resume"):
        state_path = opt["path"].get("training_states")
        if state_path and os.path.isdir(state_path):
            states = [f for f in os.listdir(state_path) if f.endswith(".state")]
            if states:
                latest = max(float(f[: -len(".state")]) for f in states)
                resume_state_path = os.path.join(state_path, f"{latest:.0f}.state")
                opt["path"]["resume_state"] = resume_state_path
    else:
        resume_state_path = opt["path"].get("resume_state")

    if resume_state_path is None:
        return None
    use_cuda = torch.cuda.is_available() and opt.get("num_gpu", 0) != 0
    if use_cuda:
        device_id = torch.cuda.current_device()
        resume_state = torch.load(
            resume_state_path, map_location=lambda storage, loc: storage.cuda(device_id), weights_only=False
        )
    else:
        resume_state = torch.load(resume_state_path, map_location="cpu", weights_only=False)
    check_resume(opt, resume_state["iter"])
    global _RESUME_STATE
    _RESUME_STATE = resume_state
    return resume_state


_RESUME_STATE: dict | None = None  # the state returned by load_resume_state, for the dataloader wrapper


def capture_rng_states() -> dict[str, Any]:
    """Snapshot of every global RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    import numpy as np
    import torch

    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002  (BasicSR draws from the legacy global RNG)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` (missing entries are left alone)."""
    import numpy as np
    import torch

    if "python" in states:
        random.setstate(_as_python_state(states["python"]))
    if "numpy" in states:
        np.random.set_state(states["numpy"])  # noqa: NPY002
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` needs tuples; a state that went through a checkpoint may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class _ResumeSampler:
    """Wraps the train sampler for the first resumed epoch: skips consumed indices, restores RNG states.

    Delegates ``set_epoch``/``len`` to the wrapped sampler, so the stock loop is unaware of it. The skip and
    the RNG restore happen once, when the first resumed batch is requested (after the DataLoader iterator
    drew its own base seed), so the RNG streams continue exactly where the interrupted run left them.
    """

    def __init__(self, sampler: Any, skip: int, rng_states: dict | None) -> None:
        self.sampler = sampler
        self.skip = skip
        self.rng_states = rng_states

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        if self.rng_states is not None:
            restore_rng_states(self.rng_states)
            self.rng_states = None
        for _ in range(self.skip):
            next(it, None)
        self.skip = 0
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def _wrap_create_train_val_dataloader(original):
    def create_train_val_dataloader(opt, logger):
        result = original(opt, logger)
        train_loader = result[0]
        state = _RESUME_STATE
        if state is None or train_loader is None or getattr(train_loader, "batch_sampler", None) is None:
            return result
        iters_per_epoch = len(train_loader)
        done = int(state["iter"])
        state["epoch"] = done // iters_per_epoch  # the epoch in which iteration done + 1 falls
        consumed = (done % iters_per_epoch) * train_loader.batch_sampler.batch_size
        batch_sampler = train_loader.batch_sampler
        batch_sampler.sampler = _ResumeSampler(batch_sampler.sampler, consumed, state.get("rng_states"))
        logger.info(
            f"glare-nat exact resume: iteration {done} -> epoch {state['epoch']}, skipping {consumed} samples "
            f"already seen in that epoch; RNG states {'restored' if state.get('rng_states') else 'not saved'}."
        )
        return result

    create_train_val_dataloader.__wrapped__ = original  # type: ignore[attr-defined]
    return create_train_val_dataloader


def patch_basicsr() -> None:
    """Apply run-time patches to already-imported BasicSR modules (idempotent)."""
    import basicsr.train

    basicsr.train.load_resume_state = load_resume_state
    current = basicsr.train.create_train_val_dataloader
    if not hasattr(current, "__wrapped__"):
        basicsr.train.create_train_val_dataloader = _wrap_create_train_val_dataloader(current)


def normalise_argv(argv: list[str]) -> list[str]:
    """Rewrite ``--opt`` (Restormer/Retinexformer habit) to BasicSR's ``-opt``."""
    out = []
    for arg in argv:
        if arg == "--opt":
            out.append("-opt")
        elif arg.startswith("--opt="):
            out.extend(["-opt", arg[len("--opt=") :]])
        else:
            out.append(arg)
    return out


apply_import_shims()
