"""glare-nat models, losses and metrics, registered in BasicSR's registries."""

from glare_nat_arch import compat  # noqa: F401  (must run before basicsr is imported)

import importlib  # noqa: E402
from pathlib import Path  # noqa: E402

import glare_nat_arch  # noqa: E402,F401
import glare_nat_data  # noqa: E402,F401

_here = Path(__file__).resolve().parent
for _name in ("losses", "metrics"):
    if (_here / f"{_name}.py").exists():
        importlib.import_module(f"glare_nat_models.{_name}")
for _f in sorted(_here.glob("*_model.py")):
    importlib.import_module(f"glare_nat_models.{_f.stem}")
