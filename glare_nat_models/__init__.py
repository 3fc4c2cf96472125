"""glare-nat models, losses and metrics, registered in BasicSR's registries."""

import importlib
from pathlib import Path

import glare_nat_arch  # noqa: F401  (compat shims first, then every *_arch.py)
import glare_nat_data  # noqa: F401  (every *_dataset.py)

_here = Path(__file__).resolve().parent
for _name in ("losses", "metrics"):
    importlib.import_module(f"glare_nat_models.{_name}")
for _f in sorted(_here.glob("*_model.py")):
    importlib.import_module(f"glare_nat_models.{_f.stem}")
