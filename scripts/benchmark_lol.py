"""Benchmark a model on the LOL test sets in both protocols (plain and GT-mean), on any ``low/`` + ``high/`` tree
(``--folders``) and on unpaired photo folders (``--unpaired``: NIQE, brightness, colourfulness), optionally over a
``--sweep`` of one option, with latency / peak-memory columns and a reproducibility record.

``python scripts/benchmark_lol.py -opt <test yml> --lolv1 ROOT --out results/benchmark/<name>``; thin wrapper of
:func:`glare_nat_models.benchmark.main` (also installed as ``glare-nat-benchmark``); ``--help`` lists the options,
docs/evaluation.md explains them.
"""

import importlib.util
import os.path as osp
import sys

if importlib.util.find_spec("glare_nat_models") is None:  # not pip-installed: use this checkout
    sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))

from glare_nat_models.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
