"""Every training option file in tests/data/ runs through the stock BasicSR loop: two steps and a validation.

Adding a ``tiny_*.yml`` there is enough for it to be run. Checkpoints the file leaves as ``~`` under ``path`` are
written first with random weights: ``pretrain_network_<x>`` from the file's own ``network_<x>`` block,
``pretrain_network_stage2`` as the Stage-II part (``RRDB.*``, ``flowUpsamplerNet.*``) of ``network_g``; other
``~`` entries stay unset (optional weights). The data is a 3-pair LOL-v1 tree with one pair held out for
validation; a ``datasets`` block in the file overrides the keys it names (e.g. ``gt_size: ~`` for full frames).
The loop is :func:`basicsr.train.train_pipeline` with the launcher's patches.
"""

from __future__ import annotations

import os
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml

import glare_nat_models.base_model as base_mod
from glare_nat_models.checkpoint import STAGE2_PREFIXES

DATA = Path(__file__).parent / "data"
OPTION_FILES = sorted(p.name for p in DATA.glob("tiny_*.yml"))


def write_lol_tree(root: Path, n_train: int = 3, n_test: int = 2, size: int = 32) -> None:
    """A LOL-v1 tree of random 8-bit pairs (low = high // 8)."""
    rng = np.random.default_rng(0)
    for split, n in (("our485", n_train), ("eval15", n_test)):
        for sub in ("low", "high"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            cv2.imwrite(str(root / split / "high" / f"{i}.png"), gt)
            cv2.imwrite(str(root / split / "low" / f"{i}.png"), (gt // 8).astype(np.uint8))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _random_checkpoints(opt: dict, out: Path) -> None:
    """Fill ``path.pretrain_network_*: ~`` entries that have a network to build (see the module docstring)."""
    torch.manual_seed(0)
    for key, value in list(opt["path"].items()):
        if not key.startswith("pretrain_network_") or value is not None:
            continue
        part = key[len("pretrain_network_") :]
        if f"network_{part}" in opt:
            state = build_network(deepcopy(opt[f"network_{part}"])).state_dict()
        elif part == "stage2":
            full = build_network(deepcopy(opt["network_g"])).state_dict()
            state = {k: v for k, v in full.items() if k.startswith(STAGE2_PREFIXES)}
        else:
            continue
        torch.save({"params": state}, out / f"{part}.pth")
        opt["path"][key] = str(out / f"{part}.pth")


@pytest.mark.parametrize("name", OPTION_FILES)
def test_option_file_trains_two_steps_and_validates(name, tmp_path, monkeypatch):
    from basicsr.train import train_pipeline
    from glare_nat_models.launcher import patch_basicsr

    patch_basicsr()
    write_lol_tree(tmp_path / "lol")
    with open(DATA / name, encoding="utf-8") as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    opt = _plain(opt)
    opt["num_gpu"] = "auto"
    own = opt.get("datasets") or {}  # the file's own dataset settings (e.g. full frames) win over the defaults
    _random_checkpoints(opt, tmp_path)
    lol = {"type": "LOLPairedDataset", "dataroot": str(tmp_path / "lol"), "layout": "lolv1", "split": "train"}
    opt["datasets"] = {
        "train": {
            **lol,
            "name": "tiny_train",
            "holdout": {"count": 1, "seed": 0, "role": "train"},
            "gt_size": 32,
            "use_hflip": True,
            "batch_size_per_gpu": 2,
            "num_worker_per_gpu": 0,
            "dataset_enlarge_ratio": 1,
        },
        "val": {**lol, "name": "tiny_holdout", "holdout": {"count": 1, "seed": 0, "role": "val"}},
    }
    for phase in ("train", "val"):
        opt["datasets"][phase].update(own.get(phase) or {})
    opt["train"]["total_iter"] = 2
    opt["val"].update(val_freq=2, save_img=False)
    opt["logger"] = {"print_freq": 1, "save_checkpoint_freq": 2, "use_tb_logger": False}
    opt_file = tmp_path / "opt.yml"
    opt_file.write_text(yaml.safe_dump(opt))
    monkeypatch.setattr("sys.argv", ["train.py", "-opt", str(opt_file)])
    validations = []
    real_validation = base_mod.GLAREBaseModel.nondist_validation

    def record(self, dataloader, current_iter, *args):
        real_validation(self, dataloader, current_iter, *args)
        validations.append((dataloader.dataset.opt["name"], current_iter, dict(self.metric_results)))

    monkeypatch.setattr(base_mod.GLAREBaseModel, "nondist_validation", record)
    train_pipeline(str(tmp_path))
    exp = tmp_path / "experiments" / opt["name"]
    models = sorted(os.listdir(exp / "models"))
    assert models and all(m.endswith(("_2.pth", "_latest.pth")) for m in models), models
    assert os.listdir(exp / "training_states") == ["2.state"]
    assert [(n, it) for n, it, _ in validations] == [("tiny_holdout", 2), ("tiny_holdout", 3)]  # stock: final +1
    for _, _, results in validations:
        assert results and all(np.isfinite(v) for v in results.values()), results
