"""Bad input through the whole stock training loop (``basicsr.train.train_pipeline``, in-process, CPU, seconds).

The unit tests (test_data.py, test_checkpoint.py, test_models.py) check each error where it is raised; these check
that it reaches the user intact when BasicSR's loop drives the data loader (also across a loader worker process),
the model construction and the optimisation steps, and what is left on disk afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs.rrdbnet_arch import RRDBNet

from glare_nat_models.checkpoint import CheckpointError, StrictLoadError, load_network_file
from glare_nat_models.launcher import patch_basicsr

NET = {"type": "RRDBNet", "num_in_ch": 3, "num_out_ch": 3, "scale": 1, "num_feat": 16, "num_block": 1, "num_grow_ch": 8}


@pytest.fixture
def lol(tmp_path) -> Path:
    """4 training pairs 32x32 in the LOL-v1 layout."""
    rng = np.random.default_rng(0)
    for sub in ("low", "high"):
        (tmp_path / "lol" / "our485" / sub).mkdir(parents=True)
    for i in range(4):
        gt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "lol" / "our485" / "high" / f"{i}.png"), gt)
        cv2.imwrite(str(tmp_path / "lol" / "our485" / "low" / f"{i}.png"), gt // 8)
    return tmp_path / "lol"


def _train(tmp_path: Path, lol: Path, monkeypatch, model_type: str = "GLAREBaseModel", **changes) -> Path:
    """Run ``train_pipeline`` on a tiny RRDBNet option set; returns the experiment folder."""
    from basicsr.train import train_pipeline

    opt = {
        "name": "bad_input",
        "model_type": model_type,
        "num_gpu": 0,
        "manual_seed": 0,
        "datasets": {
            "train": {
                "name": "tiny",
                "type": "LOLPairedDataset",
                "dataroot": str(lol),
                "layout": "lolv1",
                "split": "train",
                "gt_size": 16,
                "batch_size_per_gpu": 2,
                "num_worker_per_gpu": 0,
            }
        },
        "network_g": dict(NET),
        "path": {},
        "train": {
            "optim_g": {"type": "Adam", "lr": 1e-3},
            "scheduler": {"type": "MultiStepLR", "milestones": [100], "gamma": 0.5},
            "total_iter": 2,
            "pixel_opt": {"type": "L1Loss", "loss_weight": 1.0, "reduction": "mean"},
        },
        "logger": {"print_freq": 1, "save_checkpoint_freq": 1, "use_tb_logger": False},
    }
    for key, value in changes.items():  # "a__b" sets opt["a"]["b"]
        *parents, leaf = key.split("__")
        d = opt
        for p in parents:
            d = d[p]
        d[leaf] = value
    opt_file = tmp_path / "opt.yml"
    opt_file.write_text(yaml.safe_dump(opt))
    monkeypatch.setattr("sys.argv", ["train.py", "-opt", str(opt_file)])
    patch_basicsr()
    train_pipeline(str(tmp_path))
    return tmp_path / "experiments" / "bad_input"


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_training_image_is_named(tmp_path, lol, monkeypatch, workers):
    bad = lol / "our485" / "high" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    with pytest.raises(Exception, match="could not be decoded") as err:
        _train(tmp_path, lol, monkeypatch, model_type="SRModel", datasets__train__num_worker_per_gpu=workers)
    assert str(bad) in str(err.value)


def _checkpoint(path: Path, rename: dict[str, str] | None = None) -> Path:
    sd = RRDBNet(**{k: v for k, v in NET.items() if k != "type"}).state_dict()
    sd = {(rename or {}).get(k, k): v for k, v in sd.items()}
    torch.save({"params": sd}, path)
    return path


def test_truncated_pretrain_network_g_is_named(tmp_path, lol, monkeypatch):
    ckpt = _checkpoint(tmp_path / "net_g_pre.pth")
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as err:
        _train(tmp_path, lol, monkeypatch, path__pretrain_network_g=str(ckpt))
    assert str(ckpt) in str(err.value)
    models = tmp_path / "experiments" / "bad_input" / "models"
    assert not any(models.iterdir())  # the run stopped while building the model: nothing trained, nothing saved


def test_wrong_key_in_pretrain_network_g_gives_the_report(tmp_path, lol, monkeypatch):
    ckpt = _checkpoint(tmp_path / "net_g_pre.pth", rename={"conv_first.weight": "conv_start.weight"})
    with pytest.raises(StrictLoadError) as err:
        _train(tmp_path, lol, monkeypatch, path__pretrain_network_g=str(ckpt))
    msg = str(err.value)
    assert str(ckpt) in msg
    assert "missing keys (in the network, not in the file) (1):\n  conv_first.weight" in msg
    assert "unexpected keys (in the file, not in the network) (1):\n  conv_start.weight" in msg


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, lol, monkeypatch):
    """lr 1e30: the first Adam step makes the weights ~1e30, the next forward overflows to inf/NaN."""
    with pytest.raises(RuntimeError, match=r"non-finite loss at iteration 2: l_pix=(nan|inf)"):
        _train(tmp_path, lol, monkeypatch, train__optim_g={"type": "Adam", "lr": 1e30}, train__total_iter=5)
    exp = tmp_path / "experiments" / "bad_input"
    assert sorted(os.listdir(exp / "models")) == ["net_g_1.pth"]  # nothing written after the bad step
    assert sorted(os.listdir(exp / "training_states")) == ["1.state"]
    net = RRDBNet(**{k: v for k, v in NET.items() if k != "type"})
    load_network_file(net, exp / "models" / "net_g_1.pth")  # strict: complete and loadable
    assert all(torch.isfinite(p).all() for p in net.parameters())
    state = torch.load(exp / "training_states" / "1.state", map_location="cpu", weights_only=False)
    assert state["iter"] == 1 and len(state["optimizers"]) == 1
