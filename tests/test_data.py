"""Tests of glare_nat_data: image reading, layouts and pairing, augmentation, selection, BasicSR plumbing."""

from __future__ import annotations

import io
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.data import build_dataloader, build_dataset

from glare_nat_data.image_io import list_images, natural_key, read_image, write_image
from glare_nat_data.layouts import holdout_split, pair_files, pair_key, resolve_pair_dirs
from glare_nat_data.lol_dataset import LOLPairedDataset
from glare_nat_data.transforms import (
    draw_short_side,
    paired_random_crop,
    random_flips,
    random_resize_pair_8bit_lq,
    random_resize_short_side,
    resize_short_side,
)
from glare_nat_data.unpaired_dataset import LOLUnpairedDataset

# ----------------------------------------------------------------------------------------------- helpers


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    """Random RGB uint8 (H, W, 3) image, distinct per seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write_pair(lq_dir: Path, gt_dir: Path, lq_name: str, gt_name: str, seed: int, h: int = 12, w: int = 16):
    """LQ = pattern, GT = 255 - LQ (so alignment of any crop/flip is checkable as gt == 1 - lq)."""
    lq = _pattern(h, w, seed)
    write_image(lq_dir / lq_name, lq)
    write_image(gt_dir / gt_name, 255 - lq)
    return lq


def _make_tree(root: Path, layout: str, n: int = 3, h: int = 12, w: int = 16) -> dict[str, list[np.ndarray]]:
    """A tiny dataset of ``layout`` under ``root``; returns the LQ arrays per split in pairing order."""
    spec = {
        "lolv1": {"train": ("our485/low", "our485/high"), "test": ("eval15/low", "eval15/high")},
        "lolv2_real": {
            "train": ("Real_captured/Train/Low", "Real_captured/Train/Normal"),
            "test": ("Real_captured/Test/Low", "Real_captured/Test/Normal"),
        },
        "lolv2_synthetic": {
            "train": ("Synthetic/Train/Low", "Synthetic/Train/Normal"),
            "test": ("Synthetic/Test/Low", "Synthetic/Test/Normal"),
        },
        "folders": {"train": ("low", "high")},
    }[layout]
    out = {}
    for k, (split, (lq_sub, gt_sub)) in enumerate(spec.items()):
        arrays = []
        for i in range(1, n + 1):
            idx = 100 * k + i
            if layout == "lolv2_real":
                names = (f"low{idx:05d}.png", f"normal{idx:05d}.png")
            elif layout == "lolv2_synthetic":
                names = (f"r{idx:04d}abc.png",) * 2
            else:
                names = (f"{idx}.png",) * 2
            arrays.append(_write_pair(root / lq_sub, root / gt_sub, *names, seed=idx, h=h, w=w))
        out[split] = arrays
    return out


def _u8(t: torch.Tensor) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8."""
    return np.round(t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- image_io


def test_read_image_rgb_order_range_and_dtype(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR
    bgr[0, 0] = (10, 20, 30)
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    img = read_image(tmp_path / "red.png")
    assert img.shape == (4, 5, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img[1, 1], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(img[0, 0], np.array([30, 20, 10]) / 255.0, atol=1e-7)


def test_read_image_gray_rgba_and_16bit(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = read_image(tmp_path / "g.png")
    assert img.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_allclose(img[..., c], gray / 255.0, atol=1e-7)

    bgra = np.zeros((3, 4, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    bgra[..., 3] = 7  # almost transparent: alpha must be dropped, not blended
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    np.testing.assert_allclose(read_image(tmp_path / "a.png")[0, 0], [0.0, 0.0, 200 / 255.0], atol=1e-7)

    deep = np.zeros((2, 3, 3), np.uint16)
    deep[0, 0] = (65535, 1000, 0)  # BGR; 1000 is not representable in 8 bits
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    img16 = read_image(tmp_path / "d.png")
    np.testing.assert_allclose(img16[0, 0], [0.0, 1000 / 65535.0, 1.0], rtol=1e-6)

    gray16 = np.full((2, 2), 30000, np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    np.testing.assert_allclose(read_image(tmp_path / "g16.png"), np.full((2, 2, 3), 30000 / 65535.0), rtol=1e-6)


def test_read_image_applies_jpeg_exif_orientation(tmp_path):
    from PIL import Image

    pil = Image.fromarray(np.full((10, 30, 3), 128, np.uint8))
    exif = pil.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    pil.save(buf, "JPEG", exif=exif.tobytes())
    (tmp_path / "rot.jpg").write_bytes(buf.getvalue())
    assert read_image(tmp_path / "rot.jpg").shape == (30, 10, 3)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"", "empty"), (b"this is not a png at all", "could not be decoded")],
)
def test_read_image_bad_files_name_the_file(tmp_path, content, problem):
    bad = tmp_path / "broken_7.png"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=problem) as err:
        read_image(bad)
    assert "broken_7.png" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        read_image(tmp_path / "nothere.png")


def test_list_images_skips_strays_natural_order_and_empty_folder(tmp_path):
    for name in ("10.png", "2.png", "1.jpg"):
        write_image(tmp_path / name, _pattern(2, 2, 0))
    for stray in ("notes.txt", "Thumbs.db", ".DS_Store", "._2.png"):
        (tmp_path / stray).write_bytes(b"junk")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["1.jpg", "2.png", "10.png"]
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="empty_dir"):
        list_images(empty)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")
    assert sorted(["a10", "a2", "A1"], key=natural_key) == ["A1", "a2", "a10"]


# ------------------------------------------------------------------------------------ layouts, pairing


@pytest.mark.parametrize("layout", ["lolv1", "lolv2_real", "lolv2_synthetic"])
@pytest.mark.parametrize("named", [True, False])
def test_layouts_pair_files_and_items(tmp_path, layout, named):
    arrays = _make_tree(tmp_path, layout)
    for split in ("train", "test"):
        ds = LOLPairedDataset(
            {"dataroot": str(tmp_path), "layout": layout if named else "auto", "split": split, "phase": "val"}
        )
        assert len(ds) == 3
        for i in range(3):
            item = ds[i]
            assert item["lq"].shape == item["gt"].shape == (3, 12, 16)
            assert item["lq"].dtype == torch.float32
            assert 0.0 <= float(item["lq"].min()) and float(item["gt"].max()) <= 1.0
            np.testing.assert_array_equal(_u8(item["lq"]), arrays[split][i])  # right file, RGB order
            np.testing.assert_array_equal(_u8(item["gt"]), 255 - arrays[split][i])  # right partner
            assert pair_key(Path(item["lq_path"])) == pair_key(Path(item["gt_path"]))


def test_lolv2_real_pairs_different_names(tmp_path):
    _make_tree(tmp_path, "lolv2_real")
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "layout": "lolv2_real", "split": "train"})
    names = [(Path(a).name, Path(b).name) for a, b in ds.pairs]
    assert names == [(f"low{i:05d}.png", f"normal{i:05d}.png") for i in (1, 2, 3)]


def test_lolv2_subset_root_lowercase_folders(tmp_path):
    """GLARE's inference tree ``LOL-v2-real/test/{low,high}`` with LOL-v2 names, dataroot = subset folder."""
    root = tmp_path / "LOL-v2-real"
    _write_pair(root / "test/low", root / "test/high", "low00690.png", "normal00690.png", seed=1)
    _write_pair(root / "test/low", root / "test/high", "low00691.png", "normal00691.png", seed=2)
    ds = LOLPairedDataset({"dataroot": str(root), "layout": "lolv2_real", "phase": "test"})
    assert [Path(p[1]).name for p in ds.pairs] == ["normal00690.png", "normal00691.png"]


def test_folders_layout_and_explicit_dirs(tmp_path):
    arrays = _make_tree(tmp_path, "folders")
    for opt in (
        {"dataroot": str(tmp_path), "layout": "folders"},
        {"dataroot": str(tmp_path)},  # auto
        {"dataroot_lq": str(tmp_path / "low"), "dataroot_gt": str(tmp_path / "high")},
    ):
        ds = LOLPairedDataset({**opt, "phase": "val"})
        assert len(ds) == 3
        np.testing.assert_array_equal(_u8(ds[2]["lq"]), arrays["train"][2])


def test_split_defaults_follow_phase(tmp_path):
    _make_tree(tmp_path, "lolv1")
    lq_train, _ = resolve_pair_dirs({"dataroot": str(tmp_path), "phase": "train"})
    lq_val, gt_val = resolve_pair_dirs({"dataroot": str(tmp_path), "phase": "val"})
    assert lq_train == tmp_path / "our485/low"
    assert (lq_val, gt_val) == (tmp_path / "eval15/low", tmp_path / "eval15/high")


def test_option_errors(tmp_path):
    _make_tree(tmp_path, "lolv1")
    root = str(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        LOLPairedDataset({"dataroot": root, "layout": "lolv3"})
    with pytest.raises(ValueError, match="split"):
        LOLPairedDataset({"dataroot": root, "split": "validation"})
    with pytest.raises(FileNotFoundError, match="lolv2_synthetic"):
        LOLPairedDataset({"dataroot": root, "layout": "lolv2_synthetic"})
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        LOLPairedDataset({"dataroot": str(tmp_path / "no_such_root")})
    with pytest.raises(KeyError, match="dataroot"):
        LOLPairedDataset({"phase": "val"})
    with pytest.raises(KeyError, match="dataroot_gt"):
        LOLPairedDataset({"dataroot_lq": root})
    with pytest.raises(NotImplementedError, match="lmdb"):
        LOLPairedDataset({"dataroot": root, "io_backend": {"type": "lmdb"}})
    assert len(LOLPairedDataset({"dataroot": root, "io_backend": {"type": "disk"}})) == 3
    with pytest.raises(ValueError, match="gt_size"):
        LOLPairedDataset({"dataroot": root, "gt_size": 8, "resize_short_side": [4, None]})
    with pytest.raises(KeyError, match="gt_size"):
        LOLPairedDataset({"dataroot": root, "use_resize_crop": True})


# ------------------------------------------------------------------------------------------ bad input


def test_missing_partner_is_named(tmp_path):
    _make_tree(tmp_path, "folders")
    write_image(tmp_path / "low" / "lonely_lq.png", _pattern(12, 16, 9))
    with pytest.raises(FileNotFoundError, match="lonely_lq.png"):
        pair_files(tmp_path / "low", tmp_path / "high")
    (tmp_path / "low" / "lonely_lq.png").unlink()
    write_image(tmp_path / "high" / "lonely_gt.png", _pattern(12, 16, 9))
    with pytest.raises(FileNotFoundError, match="lonely_gt.png"):
        LOLPairedDataset({"dataroot": str(tmp_path)})


def test_duplicate_pairing_key_is_named(tmp_path):
    _make_tree(tmp_path, "folders")
    write_image(tmp_path / "low" / "1.jpg", _pattern(12, 16, 9))  # same key as 1.png
    with pytest.raises(ValueError, match=r"1\.jpg"):
        pair_files(tmp_path / "low", tmp_path / "high")


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "our485/low").mkdir(parents=True)
    (tmp_path / "our485/high").mkdir(parents=True)
    write_image(tmp_path / "our485/high/1.png", _pattern(4, 4, 0))
    (tmp_path / "our485/low/Thumbs.db").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"our485[/\\]low"):
        LOLPairedDataset({"dataroot": str(tmp_path), "split": "train"})


@pytest.mark.parametrize(("content", "problem"), [(b"", "empty"), (b"\x89PNG garbage", "decoded")])
def test_unreadable_image_named_at_load_time(tmp_path, content, problem):
    _make_tree(tmp_path, "folders")
    (tmp_path / "high" / "2.png").write_bytes(content)
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "val"})  # names are fine: builds
    ds[0]
    with pytest.raises(ValueError, match=problem) as err:
        ds[1]
    assert str(tmp_path / "high" / "2.png") in str(err.value)


def test_pair_size_mismatch_names_both_files_and_sizes(tmp_path):
    _make_tree(tmp_path, "folders")
    write_image(tmp_path / "high" / "3.png", _pattern(10, 14, 3))
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "val"})
    with pytest.raises(ValueError, match="mismatch") as err:
        ds[2]
    msg = str(err.value)
    assert "low/3.png" in msg.replace("\\", "/") and "high/3.png" in msg.replace("\\", "/")
    assert "16x12" in msg and "14x10" in msg


def test_image_smaller_than_crop_is_named(tmp_path):
    _make_tree(tmp_path, "folders")
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "train", "gt_size": 13})
    with pytest.raises(ValueError, match="gt_size=13") as err:
        ds[0]
    assert "1.png" in str(err.value) and "16x12" in str(err.value)


def test_stray_files_are_skipped(tmp_path):
    _make_tree(tmp_path, "lolv1")
    for sub in ("our485/low", "our485/high"):
        for stray in ("readme.txt", "Thumbs.db", ".DS_Store", "._1.png"):
            (tmp_path / sub / stray).write_bytes(b"junk")
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "split": "train", "phase": "val"})
    assert [Path(lq).name for lq, _ in ds.pairs] == ["1.png", "2.png", "3.png"]


# --------------------------------------------------------------------------------------- augmentation


def _contains_window(full: np.ndarray, patch: np.ndarray) -> bool:
    """Is ``patch`` a window of ``full`` or of one of its 8 flips/transposes?"""
    s = patch.shape[0]
    variants = []
    for t in (full, full.transpose(1, 0, 2)):
        variants += [t, t[:, ::-1], t[::-1], t[::-1, ::-1]]
    for v in variants:
        for top in range(v.shape[0] - s + 1):
            for left in range(v.shape[1] - patch.shape[1] + 1):
                if np.array_equal(v[top : top + s, left : left + patch.shape[1]], patch):
                    return True
    return False


def test_train_crop_is_aligned_and_seeded(tmp_path):
    arrays = _make_tree(tmp_path, "folders", h=12, w=16)
    opt = {"dataroot": str(tmp_path), "phase": "train", "gt_size": 8, "use_hflip": True, "use_rot": True}
    ds = LOLPairedDataset(opt)
    random.seed(123)
    first = [ds[i] for i in range(3)]
    random.seed(123)
    again = [ds[i] for i in range(3)]
    seen = set()
    for i, (a, b) in enumerate(zip(first, again)):
        assert a["lq"].shape == a["gt"].shape == (3, 8, 8)
        assert torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])
        torch.testing.assert_close(a["gt"], 1.0 - a["lq"], atol=1e-6, rtol=0)  # same window, same flips
        assert _contains_window(arrays["train"][i], _u8(a["lq"]))
    for seed in range(8):
        random.seed(seed)
        item = ds[seed % 3]
        torch.testing.assert_close(item["gt"], 1.0 - item["lq"], atol=1e-6, rtol=0)
        seen.add(_u8(item["lq"]).tobytes())
    assert len(seen) > 1  # the crop really is random


def test_flips_follow_options(tmp_path):
    arrays = _make_tree(tmp_path, "folders", n=1, h=6, w=10)
    full = arrays["train"][0]

    def variants(**aug):
        out = set()
        ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "train", **aug})
        for seed in range(24):
            random.seed(seed)
            img = _u8(ds[0]["lq"])
            out.add((img.shape, img.tobytes()))
        return out

    assert variants() == {(full.shape, full.tobytes())}
    assert variants(use_hflip=True) == {(full.shape, full.tobytes()), (full.shape, full[:, ::-1].tobytes())}
    assert variants(use_flip=True) == variants(use_hflip=True)  # GLARE's key
    assert variants(use_vflip=True) == {(full.shape, full.tobytes()), (full.shape, full[::-1].tobytes())}
    rot = variants(use_rot=True)
    assert len(rot) == 4 and ((10, 6, 3), np.ascontiguousarray(full.transpose(1, 0, 2)).tobytes()) in rot
    assert len(variants(use_hflip=True, use_rot=True)) == 8


def test_random_flips_same_for_all_images():
    a = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    for seed in range(6):
        x, y = random_flips([a, a + 100], True, True, True, rng=random.Random(seed))
        np.testing.assert_array_equal(y, x + 100)


def test_paired_random_crop_bounds_and_error():
    a = np.arange(5 * 7 * 1, dtype=np.float32).reshape(5, 7, 1)
    x, y = paired_random_crop([a, -a], 5, rng=random.Random(0))
    assert x.shape == (5, 5, 1)
    np.testing.assert_array_equal(y, -x)
    with pytest.raises(ValueError, match="does not fit"):
        paired_random_crop([a], 6)


def test_draw_short_side_range():
    rng = random.Random(0)
    draws = {draw_short_side(40, 16, None, rng) for _ in range(400)}
    assert min(draws) == 16 and max(draws) == 40  # GLARE: uniform integer in [gt_size, S]
    assert {draw_short_side(40, 16, 20, rng) for _ in range(100)} == set(range(16, 21))
    assert draw_short_side(10, 16, None, rng) == 16  # too small: upscaled to the crop


def test_resize_short_side_shapes_and_bicubic():
    img = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    (out,) = resize_short_side([img], 20)
    assert out.shape == (20, 30, 3)
    np.testing.assert_allclose(out, cv2.resize(img, (30, 20), interpolation=cv2.INTER_CUBIC))
    assert resize_short_side([img], 40)[0] is img  # factor 1: untouched
    tall = resize_short_side([img.transpose(1, 0, 2)], 25)[0]
    assert tall.shape == (38, 25, 3)  # 60 * 25 / 40 = 37.5 -> 38
    gray = resize_short_side([img[:, :, :1]], 20)[0]
    assert gray.shape == (20, 30, 1)
    a, b = random_resize_short_side([img, img * 2], 16, rng=random.Random(3))
    assert a.shape == b.shape and min(a.shape[:2]) >= 16
    np.testing.assert_allclose(b, a * 2, rtol=1e-5, atol=1e-6)


def test_resize_then_crop_in_dataset(tmp_path):
    _make_tree(tmp_path, "folders", h=12, w=16)
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "train", "gt_size": 14, "use_resize_crop": True})
    for seed in range(5):
        random.seed(seed)
        item = ds[seed % 3]
        assert item["lq"].shape == item["gt"].shape == (3, 14, 14)  # 12 < 14: upscaled, no error
        assert 0.0 <= float(item["lq"].min()) and float(item["lq"].max()) <= 1.0
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "train", "gt_size": 8, "resize_short_side": [9, 10]})
    random.seed(0)
    assert ds[0]["gt"].shape == (3, 8, 8)


def test_resized_low_light_stays_on_the_8bit_grid(tmp_path):
    """As the official loader, the random resize treats the LQ as 8-bit (OpenCV's uint8 bicubic), so every LQ value
    after augmentation is k/255; the GT is resized in float (between the steps)."""
    _make_tree(tmp_path, "folders", h=12, w=16)
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "train", "gt_size": 8, "resize_short_side": [9, 11]})
    for seed in range(6):
        random.seed(seed)
        item = ds[seed % 3]
        lq = item["lq"]
        assert lq.dtype == torch.float32
        assert torch.equal((lq * 255).round() / 255, lq), "LQ off the k/255 grid"  # k/255 in float32, as stored
    lq = (np.arange(12 * 16 * 3, dtype=np.float32).reshape(12, 16, 3) % 7) / 255.0
    gt = np.linspace(0, 1, 12 * 16 * 3, dtype=np.float32).reshape(12, 16, 3)
    lq_r, gt_r = random_resize_pair_8bit_lq(lq, gt, 10, 10)
    ref = cv2.resize((lq * 255 + 0.5).astype(np.uint8), (13, 10), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(lq_r, ref.astype(np.float32) / 255.0)  # the same uint8 kernel, same inputs
    assert gt_r.dtype == np.float32 and not np.array_equal(gt_r * 255, np.round(gt_r * 255))


def test_validation_phase_gives_full_images(tmp_path):
    _make_tree(tmp_path, "folders", h=12, w=16)
    ds = LOLPairedDataset({"dataroot": str(tmp_path), "phase": "val", "gt_size": 8, "use_hflip": True})
    assert ds[0]["lq"].shape == (3, 12, 16)


# ------------------------------------------------------------------------------------------ selection


def test_holdout_is_disjoint_complete_and_deterministic(tmp_path):
    _make_tree(tmp_path, "folders", n=10, h=4, w=4)
    base = {"dataroot": str(tmp_path), "phase": "train"}
    train = LOLPairedDataset({**base, "holdout": {"count": 3, "seed": 5, "role": "train"}}).pairs
    val = LOLPairedDataset({**base, "phase": "val", "holdout": {"count": 3, "seed": 5}}).pairs  # role from phase
    assert len(train) == 7 and len(val) == 3
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(pair_files(tmp_path / "low", tmp_path / "high"))
    assert LOLPairedDataset({**base, "holdout": {"count": 3, "seed": 5, "role": "val"}}).pairs == val
    others = {tuple(holdout_split(train + val, 3, seed, "val")) for seed in range(6)}
    assert len(others) > 1  # the seed matters
    with pytest.raises(ValueError, match="holdout.count"):
        LOLPairedDataset({**base, "holdout": {"count": 10}})
    with pytest.raises(ValueError, match="holdout.role"):
        LOLPairedDataset({**base, "holdout": {"count": 2, "role": "test"}})


def test_subset_and_max_images(tmp_path):
    _make_tree(tmp_path, "lolv2_real", n=6, h=4, w=4)
    base = {"dataroot": str(tmp_path), "split": "train"}
    by_name = LOLPairedDataset({**base, "subset": ["low00002.png", "normal00005", "00003"]}).pairs
    assert [p[0].name for p in by_name] == ["low00002.png", "low00003.png", "low00005.png"]
    with pytest.raises(ValueError, match="low00099"):
        LOLPairedDataset({**base, "subset": ["low00099"]})
    half = LOLPairedDataset({**base, "subset": 0.5, "subset_seed": 1}).pairs
    assert len(half) == 3 and half == LOLPairedDataset({**base, "subset": 0.5, "subset_seed": 1}).pairs
    assert len(LOLPairedDataset({**base, "max_images": 2})) == 2


# ------------------------------------------------------------------------------------------ unpaired


def test_unpaired_folder_and_file(tmp_path):
    for name, seed in (("b10.png", 1), ("b2.jpg", 2)):
        write_image(tmp_path / name, _pattern(6, 8, seed))
    (tmp_path / "desktop.ini").write_text("x")
    ds = LOLUnpairedDataset({"dataroot_lq": str(tmp_path), "io_backend": {"type": "disk"}})
    assert [Path(p).name for p in ds.paths] == ["b2.jpg", "b10.png"]
    item = ds[1]
    assert set(item) == {"lq", "lq_path"} and item["lq"].shape == (3, 6, 8)
    np.testing.assert_array_equal(_u8(item["lq"]), _pattern(6, 8, 1))
    single = LOLUnpairedDataset({"dataroot": str(tmp_path / "b10.png")})
    assert len(single) == 1
    assert len(LOLUnpairedDataset({"dataroot_lq": str(tmp_path), "max_images": 1})) == 1
    with pytest.raises(ValueError, match="desktop.ini"):
        LOLUnpairedDataset({"dataroot_lq": str(tmp_path / "desktop.ini")})
    with pytest.raises(NotImplementedError, match="lmdb"):
        LOLUnpairedDataset({"dataroot_lq": str(tmp_path), "io_backend": {"type": "lmdb"}})


# ------------------------------------------------------------------------------------- BasicSR plumbing


def test_build_dataset_and_dataloader(tmp_path):
    _make_tree(tmp_path, "lolv1", n=4, h=12, w=16)
    train_opt = {
        "name": "tiny",
        "type": "LOLPairedDataset",
        "dataroot": str(tmp_path),
        "layout": "lolv1",
        "phase": "train",
        "gt_size": 8,
        "use_hflip": True,
        "batch_size_per_gpu": 2,
        "num_worker_per_gpu": 0,
        "io_backend": {"type": "disk"},
    }
    ds = build_dataset(train_opt)
    assert isinstance(ds, LOLPairedDataset)
    loader = build_dataloader(ds, train_opt, num_gpu=0, dist=False, sampler=None, seed=0)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["lq"].shape == batches[0]["gt"].shape == (2, 3, 8, 8)
    assert len(batches[0]["lq_path"]) == 2

    val_opt = {"name": "tiny_val", "type": "LOLPairedDataset", "dataroot": str(tmp_path), "phase": "val"}
    val = list(build_dataloader(build_dataset(val_opt), val_opt, num_gpu=0))
    assert len(val) == 4 and val[0]["lq"].shape == (1, 3, 12, 16)
    assert val[0]["lq_path"][0].replace("\\", "/").endswith("eval15/low/101.png")

    test_opt = {
        "name": "un",
        "type": "LOLUnpairedDataset",
        "dataroot_lq": str(tmp_path / "eval15/low"),
        "phase": "test",
    }
    batch = next(iter(build_dataloader(build_dataset(test_opt), test_opt, num_gpu=0)))
    assert batch["lq"].shape == (1, 3, 12, 16) and "gt" not in batch
