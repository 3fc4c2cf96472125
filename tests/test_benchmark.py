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
        for row in rec["results"]:  # runtime columns: measured, present, not reproducible
            assert row.pop("latency_ms") > 0
            peak, increase = row.pop("peak_mem_mib"), row.pop("mem_increase_mib")
            if Path("/proc/self/clear_refs").exists():  # Linux: peak RSS of the process during the call
                assert peak > 0 and 0 <= increase <= peak
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
    assert first["device"]["name"] and "median" in first["protocols"]["runtime"]
    md = (out / "summary.md").read_text()
    assert "| latency (ms) | peak mem (MiB) |" in md and first["device"]["name"] in md
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


# ------------------------------------------------------------------------------ unpaired sets, --folders, sweeps
def _photo(name: str, hw: tuple[int, int], gain: float) -> np.ndarray:
    """A darkened scikit-image photo (bundled, offline) resized to ``hw``, uint8 BGR."""
    from skimage import data as skdata

    rgb = cv2.resize(getattr(skdata, name)()[:, :, :3], (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    return np.clip(rgb[:, :, ::-1] * gain, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """JPEG, PNG, BMP photos of odd sizes, one too small for NIQE, a zero-byte PNG and a stray text file."""
    folder = tmp_path_factory.mktemp("unpaired") / "dark"
    folder.mkdir()
    cv2.imwrite(str(folder / "astronaut.jpg"), _photo("astronaut", (201, 243), 0.3))
    cv2.imwrite(str(folder / "coffee.png"), _photo("coffee", (194, 290), 0.2))
    cv2.imwrite(str(folder / "chelsea.bmp"), _photo("chelsea", (210, 301), 0.4))
    cv2.imwrite(str(folder / "small.png"), _photo("rocket", (90, 130), 0.3))  # < two 96x96 blocks
    (folder / "broken.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _niqe(path: Path) -> float:
    from basicsr.metrics import calculate_niqe

    return float(calculate_niqe(cv2.imread(str(path)), 0, input_order="HWC", convert_to="y"))


def _colourfulness_rgb(rgb: np.ndarray) -> float:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    return np.sqrt(rg.var() + yb.var()) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)


def test_unpaired_identity_niqe_is_basicsr_and_bad_files_are_skipped(photos, tmp_path, capsys):
    out = tmp_path / "id"
    assert _run("--identity", "--unpaired", photos, "--out", out) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty" in err
    rows = _read_csv(out / "per_image.csv")
    assert [r["image"] for r in rows] == ["astronaut.jpg", "chelsea.bmp", "coffee.png", "small.png"]
    for r in rows[:3]:  # identity: the output is the file's own uint8 image
        assert float(r["niqe"]) == _niqe(photos / r["image"])  # BGR, as BasicSR reads it
        rgb = cv2.imread(str(photos / r["image"]))[:, :, ::-1]
        assert float(r["mean_brightness"]) == pytest.approx((rgb @ [0.299, 0.587, 0.114]).mean() / 255, abs=1e-12)
        assert float(r["colourfulness"]) == pytest.approx(_colourfulness_rgb(rgb), rel=1e-9)
    assert rows[3]["niqe"] == "nan"  # 90 x 130: fewer than two 96 x 96 blocks
    record = json.loads((out / "results.json").read_text())
    (row,) = record["results"]
    assert row["kind"] == "unpaired" and row["dataset"] == "dark" and row["n"] == 4 and row["niqe_n"] == 3
    assert row["niqe"] == pytest.approx(np.mean([float(r["niqe"]) for r in rows[:3]]))
    assert record["datasets"]["dark"]["n_images"] == 4
    assert [s["file"] for s in record["datasets"]["dark"]["skipped"]] == ["broken.png"]
    assert {"niqe", "mean_brightness", "colourfulness", "runtime"} <= set(record["protocols"])
    assert "convert_to='y'" in record["protocols"]["niqe"]
    md = (out / "summary.md").read_text()
    assert "## Unpaired sets (no reference)" in md and "broken.png" in md and "small.png" in md
    assert "| set | n | n (NIQE) | NIQE | mean brightness | colourfulness | latency (ms) | peak mem (MiB) |" in md
    assert (out / "grids" / "dark_x1.png").is_file()


def test_unpaired_model_niqe_is_that_of_the_saved_output(photos, tmp_path):
    yml = tiny_model_options(tmp_path)
    out = tmp_path / "model"
    args = ["-opt", yml, "--unpaired", f"night={photos}", "--out", out, "--save-images", "--device", "cpu"]
    assert _run(*args, "--grid-count", "0") == 0
    rows = _read_csv(out / "per_image.csv")
    assert {r["dataset"] for r in rows} == {"night"} and len(rows) == 4
    for r in rows[:3]:
        saved = out / "images" / "night_x1" / f"{Path(r['image']).stem}.png"
        assert cv2.imread(str(saved)).shape == cv2.imread(str(photos / r["image"])).shape  # any size in = out
        assert float(r["niqe"]) == _niqe(saved)
        assert float(r["niqe"]) != _niqe(photos / r["image"])  # the model ran


def test_folder_without_readable_image_is_an_error_with_all_problems(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert _run("--identity", "--unpaired", bad, "--lolv1", tmp_path / "nope", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"folder '{bad}' has no readable image" in err and "a.png" in err and "b.jpg" in err
    assert str(tmp_path / "nope") in err  # the other problem is reported too
    assert not out.exists()


def test_folders_layout_evaluates_any_low_high_tree(tmp_path):
    root = tmp_path / "mine"
    _write_pairs(root / "low", root / "high", [("a.png", "a.png"), ("b.png", "b.png")], 5)
    out = tmp_path / "f"
    assert _run("--identity", "--folders", root, "--folders", f"again={root}", "--brightness", "1", "--out", out) == 0
    rows = _read_csv(out / "per_image.csv")
    assert [(r["dataset"], r["image"]) for r in rows] == [(d, n) for d in ("mine", "again") for n in ("a", "b")]
    for r in rows:
        lq, gt = (cv2.imread(str(root / sub / f"{r['image']}.png")) for sub in ("low", "high"))
        assert float(r["psnr"]) == pytest.approx(_psnr_u8(lq, gt), abs=1e-9)
    record = json.loads((out / "results.json").read_text())
    assert record["datasets"]["mine"]["layout"] == "folders" and record["datasets"]["again"]["n_images"] == 2


def _comparable(out: Path) -> tuple[list[dict], list[dict]]:
    """Per-image rows and summary rows without the setting label and the runtime columns."""
    rows = [{k: v for k, v in r.items() if k != "setting"} for r in _read_csv(out / "per_image.csv")]
    drop = {"setting", "latency_ms", "peak_mem_mib", "mem_increase_mib"}
    results = json.loads((out / "results.json").read_text())["results"]
    return rows, [{k: v for k, v in s.items() if k not in drop} for s in results]


def test_sweep_rows_equal_separate_set_runs(trees, photos, tmp_path):
    yml = tiny_model_options(tmp_path, act_type="relu")  # relu and leakyrelu have no weights: both load strictly
    common = ["-opt", yml, "--lolv1", trees["lolv1"], "--unpaired", photos, "--brightness", "0.5,1", "--device", "cpu"]
    assert _run(*common, "--sweep", "network_g.act_type=relu,leakyrelu", "--out", tmp_path / "sweep") == 0
    rows, summary = _comparable(tmp_path / "sweep")
    settings = [r["setting"] for r in _read_csv(tmp_path / "sweep" / "per_image.csv")]
    assert settings == ["network_g.act_type=relu"] * 10 + ["network_g.act_type=leakyrelu"] * 10
    for k, value in enumerate(("relu", "leakyrelu")):
        assert _run(*common, "--set", f"network_g:act_type={value}", "--out", tmp_path / value) == 0
        single_rows, single_summary = _comparable(tmp_path / value)
        assert rows[10 * k : 10 * (k + 1)] == single_rows  # byte-equal CSV cells
        assert summary[3 * k : 3 * (k + 1)] == single_summary
    assert rows[:10] != rows[10:]  # the swept option really changed the model
    record = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert record["sweep"] == {"key": "network_g.act_type", "values": ["relu", "leakyrelu"]}
    assert [s["overrides"] for s in record["settings"]] == [{"network_g.act_type": v} for v in ("relu", "leakyrelu")]
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "| setting | test set |" in md and "| network_g.act_type=leakyrelu | dark | 4 | 3 |" in md
    assert (tmp_path / "sweep" / "grids" / "network_g.act_type=relu" / "lolv1_x0.5.png").is_file()


def test_sweep_key_of_the_nat_decoding_rounds_reaches_the_network():
    """The documented key of the decoding rounds T builds the dual-NAT demo network with T rounds."""
    from basicsr.archs import build_network

    from glare_nat_models.inference import load_options

    root = Path(__file__).resolve().parents[1]
    for t in (2, 6):
        opt = load_options(root / "options/demo/test_stage3_nat.yml", {"network_g.nat2.decode.iters": t})
        assert build_network(opt["network_g"]).nat2.iters == t
    assert (
        load_options(root / "options/test_glare_nat_lol.yml", {"network_g.nat2.decode.iters": 6})["network_g"]["nat2"][
            "decode"
        ]["iters"]
        == 6
    )


def test_sweep_and_set_errors_are_named(trees, tmp_path, capsys):
    assert _run("--identity", "--lolv1", trees["lolv1"], "--sweep", "a=1,2", "--out", tmp_path) == 2
    assert "need -opt" in capsys.readouterr().err
    yml = tiny_model_options(tmp_path)
    base = ["-opt", yml, "--lolv1", trees["lolv1"], "--out", tmp_path / "x"]
    assert _run(*base, "--sweep", "a=1,1") == 2
    assert "repeats a value" in capsys.readouterr().err
    assert _run(*base, "--sweep", "a=1", "--sweep", "b=2") == 2
    assert "one --sweep" in capsys.readouterr().err
    assert _run(*base, "--sweep", "path.pretrain_network_g=nope1.pth,nope2.pth") == 2
    err = capsys.readouterr().err
    assert "nope1.pth' does not exist" in err and "nope2.pth' does not exist" in err
    assert not (tmp_path / "x").exists()


def test_no_reference_metrics_by_hand():
    from glare_nat_models.benchmark_metrics import colourfulness, mean_brightness, niqe_score

    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 2] = 255  # BGR
    assert colourfulness(red) == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-12)
    assert colourfulness(np.full((8, 8, 3), 77, np.uint8)) == 0.0
    assert mean_brightness(red) == pytest.approx(0.299, abs=1e-12)
    assert np.isnan(niqe_score(np.full((200, 200, 3), 90, np.uint8)))  # flat: undefined, not an exception


def test_runtime_meter_cuda_path_reads_the_allocator_counters(monkeypatch):
    """The CUDA branch (no GPU needed): synchronised around the call, peak = max_memory_allocated after a reset."""
    from glare_nat_models.benchmark_runtime import RuntimeMeter

    calls, mib = [], 2**20
    state = {"allocated": 100 * mib, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def model(size_mib: int) -> str:
        calls.append("model")
        state["peak"] = state["allocated"] + size_mib * mib
        return "out"

    meter = RuntimeMeter(torch.device("cuda"))
    meter.warmup(model, 999)
    assert meter.call(model, 30) == "out" and meter.call(model, 10) == "out"
    assert calls == ["model", "sync"] + ["sync", "model", "sync"] * 2
    summary = meter.summary()
    assert summary["peak_mem_mib"] == 130.0 and summary["mem_increase_mib"] == 30.0 and summary["n_timed"] == 2
    assert summary["latency_ms"] == pytest.approx(1000 * float(np.median(meter.seconds)))
