"""Tests of scripts/make_demo_lol.py: offline, deterministic, idempotent, readable by LOLPairedDataset."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from glare_nat_data.image_io import read_image
from glare_nat_data.lol_dataset import LOLPairedDataset

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_lol.py"
ARGS = ["--size", "24x32", "--n-train", "5", "--n-test", "2", "--seed", "3"]


def _run(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra], check=True, capture_output=True)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_module():
    spec = importlib.util.spec_from_file_location("make_demo_lol", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_is_deterministic_and_idempotent(tmp_path, demo_module):
    _run(tmp_path / "a")  # the CLI, twice, in fresh processes
    _run(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 2 * (5 + 2)
    assert a == b  # same bytes for the same seed
    demo_module.make_demo(tmp_path / "c", (24, 32), n_train=5, n_test=2, seed=4)
    assert _files(tmp_path / "c") != a
    # re-running in place after a larger run leaves exactly the requested set (stale demo files removed)
    demo_module.make_demo(tmp_path / "a", (24, 32), n_train=7, n_test=2, seed=3)
    (tmp_path / "a" / "our485" / "low" / "notes.txt").write_text("user file, kept")
    demo_module.make_demo(tmp_path / "a", (24, 32), n_train=5, n_test=2, seed=3)
    after = _files(tmp_path / "a")
    assert after.pop("our485/low/notes.txt") == b"user file, kept"
    assert after == b


def test_demo_layout_reads_as_lolv1(tmp_path, demo_module):
    counts = demo_module.make_demo(tmp_path, (24, 32), n_train=5, n_test=2, seed=0)
    assert counts == {"our485": 5, "eval15": 2}
    for layout in ("lolv1", "auto"):
        train = LOLPairedDataset({"dataroot": str(tmp_path), "layout": layout, "phase": "train", "gt_size": 16})
        test = LOLPairedDataset({"dataroot": str(tmp_path), "layout": layout, "phase": "val"})
        assert len(train) == 5 and len(test) == 2
        assert train[0]["lq"].shape == (3, 16, 16)
        assert test[1]["gt"].shape == (3, 24, 32)
    for low, high in LOLPairedDataset({"dataroot": str(tmp_path), "split": "train"}).pairs:
        lq, gt = read_image(low), read_image(high)
        assert lq.mean() < 0.6 * gt.mean()  # really darker
        assert lq.std() > 0  # not blank


def test_synthesis_is_darker_noisy_and_seeded(demo_module):
    gt = np.full((32, 32, 3), 180, np.uint8)
    low = demo_module.synthesize_low_light(gt, np.random.default_rng(0))
    again = demo_module.synthesize_low_light(gt, np.random.default_rng(0))
    assert low.dtype == np.uint8 and low.shape == gt.shape
    np.testing.assert_array_equal(low, again)
    assert low.mean() < 0.5 * gt.mean()
    assert low[..., 0].std() > 0.5  # signal-dependent noise on a flat patch
    chan = low.reshape(-1, 3).mean(0)
    assert np.ptp(chan) > 0.5  # colour cast: channels of a grey patch differ


def test_parse_size(demo_module):
    assert demo_module.parse_size("96x128") == (96, 128)
    assert demo_module.parse_size("64") == (64, 64)
    for bad in ("x", "4x4", "96x128x3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--size"):
            demo_module.parse_size(bad)


def test_unpaired_photos_are_dark_whole_deterministic_and_niqe_sized(tmp_path, demo_module):
    a = demo_module.make_unpaired(tmp_path / "a", n=3, long_side=200, seed=1)
    assert a == ["astronaut.png", "coffee.png", "chelsea.png"]
    _run(tmp_path / "p", "--unpaired", str(tmp_path / "b"), "--n-unpaired", "3", "--unpaired-size", "200")
    b = _files(tmp_path / "b")
    _run(tmp_path / "q")
    assert _files(tmp_path / "p") == _files(tmp_path / "q")  # the paired set does not depend on --unpaired
    assert sorted(b) == sorted(a) and b != _files(tmp_path / "a")  # seed 3 (ARGS) vs seed 1
    _run(tmp_path / "p", "--unpaired", str(tmp_path / "b"), "--n-unpaired", "3", "--unpaired-size", "200")
    assert _files(tmp_path / "b") == b  # deterministic
    photos = demo_module.load_photos()
    for name, photo in zip(a, photos):
        img = read_image(tmp_path / "a" / name)
        h, w = img.shape[:2]
        assert max(h, w) == 200 and (h // 96) * (w // 96) >= 2  # NIQE needs two whole 96 x 96 blocks
        assert abs(img.shape[0] / img.shape[1] - photo.shape[0] / photo.shape[1]) < 0.02
        assert img.mean() < 0.6 * photo.mean() / 255 and img.std() > 0
    demo_module.make_unpaired(tmp_path / "a", n=1, long_side=200, seed=1)
    assert sorted(_files(tmp_path / "a")) == ["astronaut.png"]  # stale photos of the larger run removed
