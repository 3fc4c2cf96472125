"""glare-nat networks, registered in BasicSR's ARCH_REGISTRY (import every ``*_arch.py``)."""

import importlib
from pathlib import Path

from glare_nat_arch import basicsr_aliases  # noqa: F401  (must run before basicsr is imported)

_here = Path(__file__).resolve().parent
for _f in sorted(_here.glob("*_arch.py")):
    importlib.import_module(f"glare_nat_arch.{_f.stem}")
