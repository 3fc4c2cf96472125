"""The repo-root launchers drive the stock BasicSR train/test loops with our dataset and metrics (subprocesses)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo_lol")
    subprocess.run(
        [sys.executable, "scripts/make_demo_lol.py", "--out", str(out), "--size", "32x48", "--n-train", "6"]
        + ["--n-test", "2"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )
    return out


def _write_opts(tmp_path: Path, demo_root: Path, name: str, total_iter: int) -> tuple[Path, Path]:
    base = yaml.safe_load((REPO_ROOT / "options/demo/train_baseline_rrdbnet.yml").read_text())
    base["name"] = name
    for key in ("train", "val"):
        base["datasets"][key]["dataroot"] = str(demo_root)
        base["datasets"][key]["holdout"]["count"] = 2
    base["datasets"]["train"]["gt_size"] = 16
    base["datasets"]["train"]["batch_size_per_gpu"] = 2
    base["train"]["total_iter"] = total_iter
    base["val"]["val_freq"] = 2
    base["logger"] = {"print_freq": 1, "save_checkpoint_freq": 2, "use_tb_logger": False}
    train_yml = tmp_path / "train.yml"
    train_yml.write_text(yaml.safe_dump(base))
    test = yaml.safe_load((REPO_ROOT / "options/demo/test_baseline_rrdbnet.yml").read_text())
    test["name"] = f"{name}_test"
    test["datasets"]["test_1"]["dataroot"] = str(demo_root)
    test["path"]["pretrain_network_g"] = str(REPO_ROOT / "experiments" / name / "models" / "net_g_latest.pth")
    test_yml = tmp_path / "test.yml"
    test_yml.write_text(yaml.safe_dump(test))
    return train_yml, test_yml


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"basicsr/{script}.py", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


def test_train_resume_and_test_through_launchers(tmp_path, demo_root):
    name = f"pytest_launcher_{uuid.uuid4().hex[:8]}"
    train_yml, test_yml = _write_opts(tmp_path, demo_root, name, total_iter=2)
    exp = REPO_ROOT / "experiments" / name
    res = REPO_ROOT / "results" / f"{name}_test"
    try:
        # 2 iterations with validation, launched with the Restormer-style `--opt` spelling.
        run = _launch("train", "--opt", str(train_yml))
        assert run.returncode == 0, run.stderr[-3000:]
        assert (exp / "models" / "net_g_latest.pth").is_file()
        assert (exp / "training_states" / "2.state").is_file()
        log = "".join(p.read_text() for p in exp.glob("train_*.log"))
        assert "psnr_gtmean" in log  # our metric ran in the stock validation loop

        # CPU auto-resume (stock basicsr fails here: CUDA-only resume and cwd-relative state search).
        opts = yaml.safe_load(train_yml.read_text())
        opts["train"]["total_iter"] = 4
        train_yml.write_text(yaml.safe_dump(opts))
        run = _launch("train", "-opt", str(train_yml), "--auto_resume")
        assert run.returncode == 0, run.stderr[-3000:]
        log = "".join(p.read_text() for p in exp.glob("train_*.log"))
        assert "Resuming training from epoch" in log and "iter: 2" in log
        assert (exp / "training_states" / "4.state").is_file()

        # Stock test loop with our metrics in both protocols.
        run = _launch("test", "-opt", str(test_yml))
        assert run.returncode == 0, run.stderr[-3000:]
        tlog = "".join(p.read_text() for p in res.glob("test_*.log"))
        for metric in ("# psnr:", "# ssim:", "# psnr_gtmean:", "# ssim_gtmean:"):
            assert metric in tlog
        assert len(list((res / "visualization").rglob("*.png"))) == 2
    finally:
        for p in REPO_ROOT.joinpath("experiments").glob(f"{name}*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in REPO_ROOT.joinpath("results").glob(f"{name}*"):
            shutil.rmtree(p, ignore_errors=True)


def test_launcher_explains_missing_option_file():
    run = _launch("train", "-opt", "does/not/exist.yml")
    assert run.returncode != 0
    assert "exist.yml" in run.stderr


@pytest.mark.parametrize("launcher", ["train.py", "test.py"])
def test_missing_inputs_reported_at_once_before_anything_is_created(tmp_path, launcher):
    """No data and no checkpoints: one short message naming every missing path with its option key, exit 2,
    no option dump, no folder (neither in the current directory nor under the repository's experiments/)."""
    option = "train_stage2_nat.yml" if launcher == "train.py" else "test_glare_nat_lol.yml"
    opt = yaml.safe_load((REPO_ROOT / "options" / option).read_text())
    opt["name"] = f"pytest_preflight_{uuid.uuid4().hex[:8]}"
    opt_file = tmp_path / "opt.yml"
    opt_file.write_text(yaml.safe_dump(opt, sort_keys=False))
    cwd = tmp_path / "work"
    cwd.mkdir()
    before = {p.name for p in (REPO_ROOT / "experiments").iterdir()}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "basicsr" / launcher), "-opt", str(opt_file)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stdout + proc.stderr
    expected = {k: v for k, v in opt["path"].items() if k.startswith("pretrain_network_") and v}
    expected.update({f"{phase}.dataroot": d["dataroot"] for phase, d in opt["datasets"].items()})
    for key, path in expected.items():
        dotted = key if "." in key else f"path.{key}"
        prefix = "datasets." if "." in key else ""
        assert f"{prefix}{dotted}: {path}" in message, (key, message)
    assert len(message.splitlines()) <= len(expected) + 3  # no option dump, no traceback
    assert "Traceback" not in message
    assert list(cwd.iterdir()) == []
    assert {p.name for p in (REPO_ROOT / "experiments").iterdir()} == before
    assert not (REPO_ROOT / "tb_logger" / opt["name"]).exists()
    assert not (REPO_ROOT / "results" / opt["name"]).exists()


def test_preflight_names_loss_and_metric_weights(tmp_path, monkeypatch):
    """A loss or metric that needs local weights is reported with its option key when no file can be found."""
    from glare_nat_models.preflight import missing_inputs

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("GLARE_NAT_VGG16", raising=False)
    monkeypatch.delenv("GLARE_NAT_ALEXNET", raising=False)
    weights = tmp_path / "alexnet.pth"
    weights.write_bytes(b"x")
    opt = {
        "train": {"perceptual_opt": {"type": "VGG16PerceptualLoss", "weights_path": None}},
        "val": {
            "metrics": {
                "lpips": {"type": "calculate_lpips", "alexnet_weights": str(weights)},  # present: not reported
                "lpips_gtmean": {"type": "calculate_lpips_gtmean", "alexnet_weights": str(tmp_path / "none.pth")},
                "random": {"type": "calculate_lpips", "alexnet_weights": "random"},
            }
        },
    }
    problems = missing_inputs(opt)
    assert [p.split(":")[0] for p in problems] == [
        "train.perceptual_opt.weights_path",
        "val.metrics.lpips_gtmean.alexnet_weights",
    ]


def test_readme_conversion_commands_write_what_the_options_read():
    """The README's ``convert_official.py SRC DST`` commands write exactly the LOL-v1 weight files that the option
    files load, and experiments/pretrained_models/README.md names the same files."""
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash)?\n(.*?)```", readme, flags=re.S)
    written = set()
    for block in blocks:
        for line in block.splitlines():
            words = line.split("#")[0].split()
            script = [i for i, w in enumerate(words) if w.endswith("convert_official.py")]
            if script:
                positional = [a for a in words[script[0] + 1 :] if not a.startswith("-")]
                assert len(positional) == 2, f"README conversion command without SRC and DST: {line}"
                written.add(positional[1])
    assert written, "the README shows no conversion command"

    read = set()
    for option in (REPO_ROOT / "options").rglob("*.yml"):
        read |= set(re.findall(r"experiments/pretrained_models/glare_[\w]+\.pth", option.read_text()))
    lol_v1 = {p for p in read if p.endswith("_lol.pth")}
    assert written == lol_v1, f"README writes {sorted(written)}, the options read {sorted(lol_v1)}"

    listed = set(re.findall(r"`(glare_\w+\.pth)`", (REPO_ROOT / "experiments/pretrained_models/README.md").read_text()))
    assert {Path(p).name for p in written} <= listed
