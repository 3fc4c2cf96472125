"""Launcher: ``python basicsr/train.py -opt options/<x>.yml`` runs the stock BasicSR training loop with glare-nat.

This folder has no ``__init__.py`` on purpose: it must never shadow the installed ``basicsr`` package.
"""

import importlib.util
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))


def _bootstrap() -> None:
    """Make our packages importable, check basicsr, apply shims and register everything."""
    if importlib.util.find_spec("glare_nat_arch") is None:
        sys.path.insert(0, ROOT)
    spec = importlib.util.find_spec("basicsr")
    if spec is None or spec.origin is None:
        sys.exit("glare-nat: basicsr 1.4.2 is not installed. Run `make install` (or see README: Install).")
    try:
        import glare_nat_models  # noqa: F401  (compat shims, then archs/data/models/losses/metrics)
    except ImportError as err:
        sys.exit(f"glare-nat: cannot import the glare-nat packages ({err}). Run `make install`.")
    from glare_nat_arch.compat import normalise_argv, patch_basicsr
    from glare_nat_models.preflight import preflight

    sys.argv = normalise_argv(sys.argv)
    preflight(sys.argv)  # every missing input path in one message, before any output or folder
    patch_basicsr()


if __name__ == "__main__":
    _bootstrap()
    from basicsr.train import train_pipeline

    train_pipeline(ROOT)
