"""Launcher: ``python basicsr/test.py -opt options/<x>.yml`` runs the stock BasicSR test loop with glare-nat.

This folder has no ``__init__.py`` on purpose: it must never shadow the installed ``basicsr`` package.
"""

import os.path as osp
import runpy

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))

if __name__ == "__main__":
    # Re-use the training launcher's bootstrap (path set-up, install check, registration, patches).
    runpy.run_path(osp.join(osp.dirname(osp.abspath(__file__)), "train.py"), run_name="glare_nat_launcher")[
        "_bootstrap"
    ]()
    from basicsr.test import test_pipeline
    from glare_nat_models.launcher import finish_launch

    test_pipeline(ROOT)
    finish_launch()
