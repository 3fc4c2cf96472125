"""NAT options: the schema, its defaults and errors, the option files, the docs tables, explicit vs auto values."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from copy import deepcopy

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import pytest
import torch
import yaml
from basicsr.archs import build_network

import glare_nat_models  # noqa: F401  (registers archs, datasets, losses, metrics, models)
from glare_nat_arch.glare_arch import GLARENet
from glare_nat_arch.glare_nat_arch import GLARE_PREFIXES, GLARENATNet
from glare_nat_arch.nat_arch import LatentNAT
from glare_nat_arch.nat_options import (
    NAT2Options,
    NAT2TrainOptions,
    NAT3Options,
    NAT3TrainOptions,
    NATOptionsError,
    nat_option_problems,
    parse_options,
)
from tests.nat_model_helpers import DATA, ROOT, flatten, lookup, read_yaml
from tests.nat_options_docs import NAT_KNOB_LOCATIONS, options_table

#: docs/nat.md "Options", verbatim (the documented defaults).
SPEC_61 = """
nat2:
  enable: true
  grid: {merge: 2}
  model: {dim: 384, depth: 6, heads: 6, mlp_ratio: 4, dropout: 0.1, uvit_skips: false,
          pos: sincos2d+peg, cond_mode: additive, tok_init: random, mask_hides_latent: false}
  uncertainty: {source: entropy, dist_temp: auto_median_gap, knn: 64, tau: auto, rho_target: 0.25, rho_max: 0.5}
  decode: {iters: 4, schedule: cosine, conf: logp, sample_temp: 0.0, choice_temp: 0.0,
           remask_rule: schedule, remask_scope: new_only, early_stop: null}
  feedback: {mode: hard, mf_input: refined}
  train: {r_dist: uniform, r_min: 0.05, r_max: 0.6, beta_entropy: 4.0, label_smoothing: 0.1,
          lambda_vis: 0.0, p_gt_visible: 0.0, unroll_p: 0.0, full_frames: true,
          lr: 3.0e-4, wd: 0.05, betas: [0.9, 0.99], warmup: 1000, steps: 40000, ema: 0.999, batch: 8}
nat3:
  enable: false
  level: h4
  model: {dim: 384, depth: 4, heads: 6, patch: 2}
  mask: {tau3: auto, rho3_max: 0.5, train_random_r_max: 0.5}
  iters: 1
  residual: masked_only
  lambda_mfm: 0.1
"""


#: knobs beyond the spec, with the default that gives the spec's behaviour
EXTENSIONS = {"nat2.decode.flow_prior": 0.0, "nat2.decode.order": "confidence"}


# ------------------------------------------------------------------------------------------------- knobs / options
def test_every_spec_knob_has_a_yaml_key_with_the_spec_default():
    spec = flatten(yaml.safe_load(SPEC_61))
    assert set(spec) | set(EXTENSIONS) == set(NAT_KNOB_LOCATIONS), set(spec) ^ set(NAT_KNOB_LOCATIONS)
    assert not set(spec) & set(EXTENSIONS)
    stage2 = read_yaml(ROOT / "options/train_stage2_nat.yml")
    stage3 = read_yaml(ROOT / "options/train_stage3_nat.yml")
    for knob, default in spec.items():
        where = NAT_KNOB_LOCATIONS[knob]
        opt = stage2 if knob.startswith("nat2.") else stage3
        value = lookup(opt, where)
        if knob == "nat3.enable":
            assert value is True  # the dual-NAT recipe switches NAT-III on; its spec default is off
            continue
        assert value == default, f"{knob} -> {where} = {value!r}, spec {default!r}"
        if knob.startswith("nat2.") and where.startswith("network_g.nat2."):  # Stage III uses the same NAT-II
            assert lookup(stage3, where) == default, f"train_stage3_nat.yml {where}"
    # the cosine-to-0 schedule of the documented optimiser
    assert stage2["train"]["scheduler"] == {"type": "CosineAnnealingRestartLR", "periods": [40000], "eta_min": 0}
    assert stage2["train"]["optim_g"]["type"] == "AdamW" and stage2["train"]["grad_clip"] == 1.0
    assert stage3["train"]["nat3"]["lr"] == 2e-4 and stage3["train"]["nat3"]["warmup"] == 1000


def test_omitted_knobs_take_the_spec_defaults_and_bad_knobs_are_named():
    spec = yaml.safe_load(SPEC_61)
    net2 = {k: v for k, v in spec["nat2"].items() if k != "train"}
    for knob, default in EXTENSIONS.items():
        _, group, key = knob.split(".")
        net2[group][key] = default
    assert dataclasses.asdict(parse_options(NAT2Options, {}, "x")) == net2
    assert parse_options(NAT2Options, {"decode": {"iters": 2}}, "x").decode.schedule == "cosine"
    with pytest.raises(NATOptionsError, match=r"network_g\.nat2\.model\.dimm is unknown"):
        parse_options(NAT2Options, {"model": {"dimm": 3}}, "network_g.nat2")
    with pytest.raises(ValueError, match=r"network_g\.nat2\.feedback\.mode = 'gated' is not implemented"):
        parse_options(NAT2Options, {"feedback": {"mode": "gated"}}, "network_g.nat2")
    ablations = {"model": {"uvit_skips": True, "pos": "peg", "tok_init": "codebook_lift", "cond_mode": "adaln"}}
    ablations["uncertainty"] = {"source": "margin"}
    ablations["decode"] = {"remask_rule": "threshold"}
    nat = LatentNAT(16, parse_options(NAT2Options, ablations, "network_g.nat2"), code_dim=3, cond_channels=4)
    assert nat.body.skip_proj is not None and nat.body.peg is not None and nat.pos == "peg"
    assert nat.tok_init == "codebook_lift" and nat.uncertainty_source == "margin" and nat.cond_merge is not None
    assert nat.remask_rule == "threshold"
    with pytest.raises(NATOptionsError, match=r"train\.nat2\.r_maxx"):
        parse_options(NAT2TrainOptions, {"r_maxx": 1}, "train.nat2")


def test_every_nat_option_problem_is_named_at_once():
    """Unknown keys, wrong types, values out of range and unsupported choices of both blocks: one error, one line
    per problem, each with its full option key; building the network directly reports the same."""
    net = {
        "type": "GLARENATNet",
        "nat2": {"model": {"dimm": 3, "dim": "big"}, "decode": {"iters": 2.5}, "uncertainty": {"tau": "often"}},
        "nat3": {"level": "h2", "mask": {"rho3_max": 2.0}},
    }
    train = {"nat2": {"r_dist": "gauss", "full_frames": "yes"}, "nat3": {"warmup": -1}}
    problems = nat_option_problems({"network_g": net, "train": train})
    keys = [p.split(" ")[0].rstrip(":") for p in problems]
    assert keys == [
        "network_g.nat2.model.dimm",
        "network_g.nat2.model.dim",
        "network_g.nat2.uncertainty.tau",
        "network_g.nat2.decode.iters",
        "network_g.nat3.level",
        "network_g.nat3.mask.rho3_max",
        "train.nat2.r_dist",
        "train.nat2.full_frames",
        "train.nat3.warmup",
    ], problems
    glare_kw = {k: v for k, v in read_yaml(DATA / "tiny_stage3_nat.yml")["network_g"].items() if k != "type"}
    with pytest.raises(NATOptionsError) as err:
        GLARENATNet(**{**glare_kw, "nat2": net["nat2"], "nat3": net["nat3"]})
    assert err.value.problems == problems[:6]
    assert nat_option_problems({"network_g": {"type": "GLARENATFlowNet", "nat3": {}}}) == [
        "network_g.nat3 is unknown for network_g.type GLARENATFlowNet"
    ]
    # cross-key checks
    bad = {"decode": {"iters": 2, "early_stop": 3, "schedule": "autonat_sub"}, "model": {"dim": 10, "heads": 3}}
    with pytest.raises(NATOptionsError) as err:
        parse_options(NAT2Options, bad, "network_g.nat2")
    assert [p.split(" ")[0] for p in err.value.problems] == [
        "network_g.nat2.model.heads",
        "network_g.nat2.decode.early_stop",
        "network_g.nat2.decode.schedule",
    ]


@pytest.mark.parametrize("schema", [NAT2Options, NAT2TrainOptions, NAT3Options, NAT3TrainOptions])
def test_docs_option_tables_are_the_schema(schema):
    """docs/nat.md "Options" holds each block's table exactly as the dataclasses render it (keys, defaults, text)."""
    table = options_table(schema)
    assert table in (ROOT / "docs/nat.md").read_text(encoding="utf-8"), f"docs/nat.md needs:\n{table}"
    assert table.count("\n") == len(dataclasses.fields(schema)) + 1 + sum(
        len(dataclasses.fields(f.default_factory)) - 1 for f in dataclasses.fields(schema) if f.metadata.get("group")
    )


@pytest.mark.parametrize("folder", ["options", "options/demo", "options/official", "options/study", "tests/data"])
def test_every_option_file_passes_the_nat_schema(folder):
    for path in sorted((ROOT / folder).glob("*.yml")):
        assert nat_option_problems(read_yaml(path)) == [], path


def test_launcher_exits_2_on_a_bad_nat_key_before_creating_anything(tmp_path):
    opt = read_yaml(ROOT / "options/train_stage2_nat.yml")
    opt["name"] = "pytest_nat_schema"
    opt["network_g"]["nat2"]["decode"]["iterz"] = 4
    opt["train"]["nat2"]["unroll_p"] = 1.5
    opt_file = tmp_path / "opt.yml"
    opt_file.write_text(yaml.safe_dump(json.loads(json.dumps(opt)), sort_keys=False))
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "basicsr" / "train.py"), "-opt", str(opt_file)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "network_g.nat2.decode.iterz is unknown" in proc.stderr
    assert "train.nat2.unroll_p must be in [0, 1], got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr and list(cwd.iterdir()) == []
    assert not (ROOT / "experiments" / "pytest_nat_schema").exists()


@pytest.mark.parametrize(
    "name",
    [
        "options/train_stage2_nat.yml",
        "options/train_stage3_nat.yml",
        "options/test_glare_nat_lol.yml",
        "options/demo/train_stage2_nat.yml",
        "options/demo/test_stage2_nat.yml",
        "options/demo/train_stage3_nat.yml",
        "options/demo/test_stage3_nat.yml",
        "options/demo/test_stage3_nat_latent.yml",
    ],
)
def test_option_files_build_their_networks(name):
    opt = read_yaml(ROOT / name)
    with torch.device("meta"):  # shapes only: official sizes cost no memory or init time
        net = build_network(deepcopy(opt["network_g"]))
        vq = build_network(deepcopy(opt["network_vq"]))
    assert net.codebook_size == vq.quantize.n_e and net.nat2 is not None and net.nat2_enabled
    assert type(net).__name__ == ("GLARENATFlowNet" if "stage2" in name else "GLARENATNet")
    if "nat_latent" in name:
        assert net.nat3 is None and net.mf_input == "flow"
    elif type(net).__name__ == "GLARENATNet":
        assert net.nat3 is not None and net.mf_input == "refined"
    demo = read_yaml(ROOT / "options/demo/train_stage2_nat.yml") if "demo" in name else None
    if demo is not None and "stage2" not in name:  # the demo Stage III reuses the demo NAT-II's shape
        assert net.nat2.tok_emb.weight.shape[1] == demo["network_g"]["nat2"]["model"]["dim"]


def test_glare_part_keeps_official_names_and_nats_live_under_their_prefixes():
    opt = read_yaml(DATA / "tiny_stage3_nat.yml")["network_g"]
    glare_kw = {k: v for k, v in opt.items() if k not in ("type", "codebook_size", "nat2", "nat3")}
    plain = set(GLARENet(**glare_kw).state_dict())
    assert set(GLARENATNet(**glare_kw).state_dict()) == plain  # no NATs: loads net_G.pth strictly
    keys = set(build_network(deepcopy(opt)).state_dict())
    assert {k for k in keys if k.startswith(GLARE_PREFIXES)} == plain
    assert {k.split(".")[0] for k in keys - plain} == {"nat2", "nat3"}


@pytest.mark.parametrize("calibrated", [True, False])
def test_networks_keep_explicit_values_and_auto_takes_the_loaded_ones(calibrated):
    """The networks own the rule: loading a state dict keeps numeric dist_temp / tau / tau3 options and takes the
    file's values for ``auto`` (NaN there = not calibrated, so NaN stays)."""
    kw = {k: v for k, v in read_yaml(DATA / "tiny_stage3_nat.yml")["network_g"].items() if k != "type"}
    nan = float("nan")
    values = (
        {"nat2.dist_temp": 0.01, "nat2.tau": 0.3, "nat3.tau3": 0.4}
        if calibrated
        else dict.fromkeys(("nat2.dist_temp", "nat2.tau", "nat3.tau3"), nan)
    )
    explicit = deepcopy(kw)
    explicit["nat2"]["uncertainty"].update(dist_temp=0.02, tau=0.7)
    explicit["nat3"]["mask"] = {"tau3": 0.6}
    for options, expect in ((kw, values), (explicit, {"nat2.dist_temp": 0.02, "nat2.tau": 0.7, "nat3.tau3": 0.6})):
        torch.manual_seed(0)
        net = GLARENATNet(**deepcopy(options))
        sd = net.state_dict()
        sd.update({k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()})
        net.load_state_dict(sd)
        got = {k: float(v) for k, v in net.state_dict().items() if k in values}
        assert got == pytest.approx(expect, nan_ok=True), (options is explicit, got)
