"""The LOL benchmark on tiny fake test sets: known values for known outputs, both protocols, reproducibility."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from test_inference import tiny_model_options

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)
from glare_nat_models import benchmark

H, W, N = 32, 40, 3  # 32 px is the smallest side AlexNet-LPIPS accepts


def _write_pairs(low: Path, high: Path, names: list[tuple[str, str]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    low.mkdir(parents=True)
    high.mkdir(parents=True)
    for lq_name, gt_name in names:
        gt = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        lq = np.clip(gt * rng.uniform(0.1, 0.4, 3) + rng.normal(0, 3, gt.shape), 0, 255).round().astype(np.uint8)
        cv2.imwrite(str(low / lq_name), lq)
        cv2.imwrite(str(high / gt_name), gt)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """LOL-v1 (eval15/{low,high}, same names) and LOL-v2-real (Real_captured/Test/{Low,Normal}) fakes."""
    root = tmp_path_factory.mktemp("lol")
    v1, v2 = root / "LOL", root / "LOLv2"
    _write_pairs(v1 / "eval15" / "low", v1 / "eval15" / "high", [(f"{i}.png", f"{i}.png") for i in (1, 22, 23)], 0)
    (v1 / "eval15" / "low" / "README.txt").write_text("stray file, skipped")
    test = v2 / "Real_captured" / "Test"
    _write_pairs(test / "Low", test / "Normal", [(f"low{i:05d}.png", f"normal{i:05d}.png") for i in (690, 691)], 1)
    return {"lolv1": v1, "lolv2_real": v2}


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _run(*args: str) -> int:
    return benchmark.main([*map(str, args), "--quiet"])


# ------------------------------------------------------------------------------------------ direct computations
def _psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def _psnr_gtmean(out_rgb: np.ndarray, gt_rgb: np.ndarray) -> float:
    """GT-mean PSNR written out independently: BT.601 luma means, one scale, clip, float MSE."""
    luma = np.array([0.299, 0.587, 0.114])
    r = np.clip(out_rgb, 0, 1)
    adj = np.clip(r * (gt_rgb @ luma).mean() / (r @ luma).mean(), 0, 1)
    return 10 * np.log10(1.0 / np.mean((adj - gt_rgb) ** 2))


def test_identity_output_gives_directly_computed_psnr(trees, tmp_path):
    out = tmp_path / "id"
    assert _run("--identity", "--lolv1", trees["lolv1"], "--out", out, "--brightness", "0.5,1.0") == 0
    rows = _read_csv(out / "per_image.csv")
    assert [(r["brightness"], r["image"]) for r in rows] == [(b, n) for b in ("0.5", "1.0") for n in ("1", "22", "23")]
    for r in rows:
        lq = cv2.imread(str(trees["lolv1"] / "eval15" / "low" / f"{r['image']}.png"))[:, :, ::-1]
        gt = cv2.imread(str(trees["lolv1"] / "eval15" / "high" / f"{r['image']}.png"))[:, :, ::-1]
        scaled = np.clip(lq / 255.0 * float(r["brightness"]), 0, 1)
        assert float(r["psnr"]) == pytest.approx(_psnr_u8(np.rint(scaled * 255), gt), abs=1e-9)
        assert float(r["psnr_gtmean"]) == pytest.approx(_psnr_gtmean(scaled, gt / 255.0), abs=1e-4)
        assert 0 < float(r["ssim"]) < float(r["ssim_gtmean"]) < 1
    summary = json.loads((out / "results.json").read_text())["results"]
    assert [(s["brightness"], s["n"]) for s in summary] == [(0.5, 3), (1.0, 3)]
    assert summary[1]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows[3:]]))
    assert len(list((out / "grids").glob("*.png"))) == 2


def test_gt_as_output_is_perfect_in_both_protocols(trees, tmp_path):
    out = tmp_path / "gt"
    args = ["--gt-as-output", "--lolv1", trees["lolv1"], "--lolv2-real", trees["lolv2_real"], "--out", out]
    assert _run(*args, "--brightness", "1", "--lpips-weights", "random") == 0
    rows = _read_csv(out / "per_image.csv")
    assert [r["dataset"] for r in rows] == ["lolv1"] * 3 + ["lolv2_real"] * 2
    assert [r["image"] for r in rows[3:]] == ["low00690", "low00691"]
    for r in rows:
        assert r["psnr"] == r["psnr_gtmean"] == "inf"
        assert float(r["ssim"]) == pytest.approx(1.0, abs=1e-12)
        assert float(r["ssim_gtmean"]) == pytest.approx(1.0, abs=1e-12)
        assert float(r["lpips"]) == float(r["lpips_gtmean"]) == 0.0
    record = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity
    assert record["results"][0]["psnr"] == "inf"
    assert any("RANDOM" in n for n in record["notes"]) and any("FID skipped" in n for n in record["notes"])
    md = (out / "summary.md").read_text()
    assert "| lolv1 | 1 | 3 | inf | 1.0000 | 0.0000 | inf | 1.0000 | 0.0000 |" in md
    assert "Protocol A" in md and "Protocol B" in md


def test_model_run_is_reproducible_and_recorded(trees, tmp_path):
    yml = tiny_model_options(tmp_path)
    out = tmp_path / "model"
    args = ["-opt", yml, "--lolv1", trees["lolv1"], "--out", out, "--brightness", "0.3,1", "--device", "cpu"]
    assert _run(*args) == 0
    first_csv, first = (out / "per_image.csv").read_text(), json.loads((out / "results.json").read_text())
    assert _run(*args) == 0
    second = json.loads((out / "results.json").read_text())
    assert (out / "per_image.csv").read_text() == first_csv
    for rec in (first, second):
        rec.pop("created")
        rec.pop("timing")
    assert first == second
    # the model really ran: neither identity nor perfect
    rows = _read_csv(out / "per_image.csv")
    assert all(np.isfinite(float(r["psnr"])) for r in rows)
    # provenance
    sha = hashlib.sha256(Path(yml).read_bytes()).hexdigest()
    assert first["option_file"]["sha256"] == sha
    ckpt = first["checkpoints"]["pretrain_network_g"]
    assert ckpt["sha256"] == hashlib.sha256(Path(ckpt["path"]).read_bytes()).hexdigest()
    assert first["seed"] == 7  # the option file's manual_seed
    assert first["mode"] == "model" and first["model"]["model_type"] == "SRModel"
    assert first["determinism"]["torch_deterministic_algorithms"] is False
    assert first["versions"]["torch"] == torch.__version__.split("+")[0]
    assert set(first["protocols"]) >= {"plain", "gtmean"} and "bt601" in first["protocols"]["gtmean"]
    assert first["device"]["type"] == "cpu" and first["datasets"]["lolv1"]["n_images"] == N
    grid = cv2.imread(str(out / "grids" / "lolv1_x1.png"))
    assert grid.shape == (N * (H + 4), 3 * W, 3)  # rows: input | output | GT, 4 px gap


def _random_fid_inception(path: Path) -> None:
    """A randomly initialised network of the FID-Inception layout, saved as a local weight file."""
    from basicsr.archs import inception as inc
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(num_classes=1008, aux_logits=False, init_weights=False, weights=None)
    net.Mixed_5b, net.Mixed_5c = inc.FIDInceptionA(192, 32), inc.FIDInceptionA(256, 64)
    net.Mixed_5d = inc.FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = inc.FIDInceptionC(768, 128), inc.FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = inc.FIDInceptionC(768, 160), inc.FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = inc.FIDInceptionE_1(1280), inc.FIDInceptionE_2(2048)
    torch.save(net.state_dict(), path)


def test_fid_uses_local_weights_only(trees, tmp_path, monkeypatch):
    from basicsr.archs import inception as inc

    def no_download(*args, **kwargs):
        raise AssertionError("FID tried to download Inception weights")

    monkeypatch.setattr(inc, "load_url", no_download)
    weights = tmp_path / "pt_inception.pth"
    _random_fid_inception(weights)
    out = tmp_path / "fid"
    args = ["--gt-as-output", "--lolv1", trees["lolv1"], "--out", out, "--brightness", "1", "--grid-count", "0"]
    assert _run(*args, "--fid-inception", weights) == 0
    fid = json.loads((out / "results.json").read_text())["fid"]
    assert set(fid) == {"lolv1@1"} and abs(fid["lolv1@1"]) < 1e-3  # identical sets
    assert inc.LOCAL_FID_WEIGHTS.startswith("experiments/")  # module global restored


@pytest.mark.parametrize(("n1", "n2", "dim"), [(6, 9, 16), (12, 10, 6)])
def test_frechet_distance_equals_sqrtm_formula(n1, n2, dim):
    """Both paths (N < D: sample space; N >= D: feature space) equal the textbook formula with scipy's sqrtm."""
    from scipy import linalg

    rng = np.random.default_rng(dim)
    f1, f2 = rng.normal(size=(n1, dim)), rng.normal(0.5, 2.0, size=(n2, dim))
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    tr_sqrt = np.trace(linalg.sqrtm(s1 @ s2)).real
    expected = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert benchmark.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert benchmark.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_setup_errors_exit_2_with_message(trees, tmp_path, capsys):
    assert _run("--identity", "--out", tmp_path) == 2
    assert "--lolv1" in capsys.readouterr().err
    assert _run("--lolv1", trees["lolv1"], "--out", tmp_path) == 2
    assert "-opt is required" in capsys.readouterr().err
    assert _run("--identity", "--lolv2-synthetic", trees["lolv1"], "--out", tmp_path) == 2
    assert f"dataroot '{trees['lolv1']}'" in capsys.readouterr().err
    args = ["--gt-as-output", "--lolv1", trees["lolv1"], "--out", tmp_path]
    assert _run(*args, "--fid-inception", tmp_path / "nope.pth") == 2
    assert "nope.pth" in capsys.readouterr().err
    assert _run(*args, "--lpips-weights", tmp_path / "alex.pth") == 2
    assert "alex.pth" in capsys.readouterr().err
