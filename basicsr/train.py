"""Launcher: ``python basicsr/train.py -opt options/<x>.yml`` runs the stock BasicSR training loop with glare-nat.

This folder has no ``__init__.py`` on purpose: it must never shadow the installed ``basicsr`` package.
"""

import importlib.util
import os.path as osp
import sys

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))


def _bootstrap() -> None:
    """Make our packages importable, check basicsr, register everything and patch BasicSR's loop."""
    if importlib.util.find_spec("glare_nat_arch") is None:
        sys.path.insert(0, ROOT)
    spec = importlib.util.find_spec("basicsr")
    if spec is None or spec.origin is None:
        sys.exit("glare-nat: basicsr 1.4.2 is not installed. Run `make install` (or see README: Install).")
    try:
        import glare_nat_models  # noqa: F401  (BasicSR import aliases, then archs/data/models/losses/metrics)
    except ImportError as err:
        sys.exit(f"glare-nat: cannot import the glare-nat packages ({err}). Run `make install`.")
    from glare_nat_models.launcher import prepare_launch

    # --opt / --local-rank spellings, the option file read once: its missing inputs in one message (before any
    # output or folder), then the run-time patches of BasicSR's loop (glare_nat_models/launcher.py).
    sys.argv = prepare_launch(sys.argv)


if __name__ == "__main__":
    _bootstrap()
    from basicsr.train import train_pipeline
    from glare_nat_models.launcher import finish_launch

    train_pipeline(ROOT)
    finish_launch()
