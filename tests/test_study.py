"""Tests of the proxy study's plumbing (``scripts/run_study.py``, ``scripts/make_study_data.py``), not its numbers.

The per-seed option files keep every seed's NAT checkpoints apart; every checkpoint a command reads is written by a
training it depends on (so the scheduler can never start a job before its inputs exist); the data script keeps the
test photos out of the training crops.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_study_data  # noqa: E402
import run_study  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    gen = tmp_path_factory.mktemp("study_options")
    files = run_study.write_options(False, gen)
    return files, run_study.build_jobs(files)


def _opt(files, key) -> dict:
    return yaml.safe_load((ROOT / files[key]).read_text())


def test_seeded_option_files_are_apart(study):
    files, _ = study
    for key in ("train_stage2_nat", "train_stage3_nat", "test_stage2_nat", "test_stage3_nat_latent", "test_stage3_nat"):
        opts = [_opt(files, f"{key}_s{s}") for s in run_study.SEEDS]
        assert len({o["name"] for o in opts}) == len(run_study.SEEDS)
        for seed, opt in zip(run_study.SEEDS, opts):
            if key.startswith("train"):
                assert opt["manual_seed"] == seed
            if key == "train_stage2_nat":
                continue  # reads no NAT checkpoint
            nat_paths = [v for v in opt["path"].values() if isinstance(v, str) and "_nat" in v]
            assert nat_paths and all(f"_s{seed}/" in v for v in nat_paths), (key, seed, nat_paths)
    hidden = _opt(files, f"train_stage2_nat_hidden_s{run_study.SEEDS[0]}")
    assert hidden["network_g"]["nat2"]["model"]["mask_hides_latent"] is True
    default = _opt(files, f"train_stage2_nat_s{run_study.SEEDS[0]}")
    assert default["network_g"]["nat2"]["model"]["mask_hides_latent"] is False
    for variant, (keys, (group, knob, value)) in run_study.VARIANTS.items():  # each variant: its one knob set
        for key in keys:
            opt = _opt(files, f"{key}_{variant}_s{run_study.SEEDS[0]}")
            assert opt["network_g"]["nat2"][group][knob] == value, (variant, key)
            assert variant in opt["name"]


def test_every_checkpoint_read_is_written_by_a_dependency(study):
    files, jobs = study
    by_name = {j.name: j for j in jobs}
    assert len(by_name) == len(jobs)
    writer = {}  # experiment name -> training job
    for job in jobs:
        if job.name.startswith("train_"):
            writer[_opt(files, job.name)["name"]] = job.name

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), list(by_name[name].deps)
        while todo:
            d = todo.pop()
            assert d in by_name, f"{name} depends on unknown job {d}"
            if d not in seen:
                seen.add(d)
                todo.extend(by_name[d].deps)
        return seen

    for job in jobs:
        assert job.name not in ancestors(job.name), f"dependency cycle through {job.name}"
        opt_file = job.cmd[job.cmd.index("-opt") + 1] if "-opt" in job.cmd else None
        if opt_file is None:
            continue
        opt = yaml.safe_load((ROOT / opt_file).read_text())
        for key, value in opt.get("path", {}).items():
            if key.startswith("pretrain_network_") and isinstance(value, str) and value.startswith("experiments/"):
                exp = value.split("/")[1]
                assert writer.get(exp) in ancestors(job.name), f"{job.name} reads {value} before it is written"


def test_study_data_holds_the_test_photos_out(tmp_path):
    assert not set(make_study_data.TRAIN_PHOTOS) & set(make_study_data.TEST_PHOTOS)
    script = ROOT / "scripts" / "make_study_data.py"
    args = [sys.executable, str(script), "--n-train", "6", "--crop", "32", "--test-size", "64"]
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([*args, "--out", str(out)], check=True, capture_output=True)
    names = sorted(p.stem for p in (tmp_path / "a" / "eval15" / "high").glob("*.png"))
    assert names == sorted(make_study_data.TEST_PHOTOS)
    assert len(list((tmp_path / "a" / "our485" / "low").glob("*.png"))) == 6
    for p in sorted((tmp_path / "a").rglob("*.png")):  # deterministic: the same bytes twice
        assert p.read_bytes() == (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes(), p


def test_report_lists_the_token_statistics_of_every_decoding_variant(tmp_path, monkeypatch):
    import study_report

    def stats(psnr: float) -> dict:
        return {"psnr_nat": psnr, "acc_nat_masked": 0.08, "acc_flow_masked": 0.04, "auroc_score": 0.66}

    monkeypatch.setattr(study_report, "ROOT", tmp_path)
    seed = run_study.SEEDS[0]
    assert study_report.decode_variant_accuracy(tmp_path, {seed: stats(17.0)}, seed) == []  # no variant measured
    for variant, psnr in (("prior0.5", 17.2), ("halton", 16.9)):
        folder = tmp_path / "results" / f"study_test_stage2_nat_{variant}_s{seed}"
        folder.mkdir(parents=True)
        (folder / "nat_val_stats_latest.json").write_text(json.dumps(stats(psnr)))
    rows = [r for r in study_report.decode_variant_accuracy(tmp_path, {seed: stats(17.0)}, seed) if r.startswith("| ")]
    assert rows[1:] == [  # after the header
        "| flow_prior 0 (the option files) | 17.00 | 0.0800 | 0.0400 | 0.6600 |",
        "| flow_prior 0.5 | 17.20 | 0.0800 | 0.0400 | 0.6600 |",
        "| order halton | 16.90 | 0.0800 | 0.0400 | 0.6600 |",
    ]
