"""Enhance your own low-light photos: ``python scripts/enhance.py -opt <test yml> -i <file|folder> -o <folder>``.

Thin wrapper of :func:`glare_nat_models.enhance_cli.main` (also installed as ``glare-nat-enhance``);
``--help`` lists the options (tiling, precision, device, suffix).
"""

import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("glare_nat_models") is None:  # not pip-installed: use this checkout
    sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))

from glare_nat_models.enhance_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
