"""glare-nat datasets, registered in BasicSR's DATASET_REGISTRY (import every ``*_dataset.py``)."""

import importlib
from pathlib import Path

from glare_nat_arch import basicsr_aliases  # noqa: F401  (must run before basicsr is imported)

_here = Path(__file__).resolve().parent
for _f in sorted(_here.glob("*_dataset.py")):
    importlib.import_module(f"glare_nat_data.{_f.stem}")
