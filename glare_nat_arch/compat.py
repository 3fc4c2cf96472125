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
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["apply_import_shims", "patch_basicsr", "normalise_argv"]

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
    return resume_state


def patch_basicsr() -> None:
    """Apply run-time patches to already-imported BasicSR modules (idempotent)."""
    import basicsr.train

    basicsr.train.load_resume_state = load_resume_state


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
