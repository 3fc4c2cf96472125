"""Import-time aliases that let stock BasicSR 1.4.2 import on current torchvision / SciPy / Python.

Nothing in site-packages is edited. :func:`apply_import_shims` runs when any glare-nat package is imported, which
must happen before the first ``import basicsr`` in the process (user-facing summary: ``docs/compat.md``):

1. ``torchvision.transforms.functional_tensor`` was removed in torchvision 0.17; basicsr imports
   ``rgb_to_grayscale`` from it at ``import basicsr`` time. We register an alias module.
2. ``scipy.ndimage.filters`` (used by basicsr's NIQE) is deprecated; alias it to ``scipy.ndimage`` if
   it ever disappears.
3. ``distutils.version.LooseVersion`` (used by basicsr's arch_util) is aliased to
   ``packaging.version.Version`` if ``distutils`` is unavailable.

The run-time patches of BasicSR's training loop live in :mod:`glare_nat_models.launcher` (applied by the launchers).
"""

from __future__ import annotations

import importlib.util
import sys
import types

__all__ = ["alias_functional_tensor", "alias_scipy_filters", "alias_loose_version", "apply_import_shims"]

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


apply_import_shims()
