"""NAT models: GLARE + NAT wrappers, NAT-II training, Stage III with both NATs, option files (CPU, tiny sizes)."""

from __future__ import annotations

import json
import math
import os
from copy import deepcopy
from pathlib import Path

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml

import glare_nat_models  # noqa: F401  (registers archs, datasets, losses, metrics, models)
from glare_nat_arch.glare_arch import GLARENet
from glare_nat_arch.glare_nat_arch import (
    GLARE_PREFIXES,
    NAT2_DEFAULTS,
    SUPPORTED_VALUES,
    GLARENATNet,
    build_latent_nat,
    resolve_nat_config,
)
from glare_nat_arch.nat_uncertainty import calibrate_dist_temp, calibrate_tau, histogram_entropy
from glare_nat_models import nat_model
from glare_nat_models.nat_model import NAT_KNOB_LOCATIONS, binary_auroc, mfm_loss

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"

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


def read_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lookup(opt: dict, dotted: str):
    node = opt
    for part in dotted.split("."):
        node = node[part]
    return node


def make_opt(name: str, out_dir: Path, paths: dict, is_train: bool = True) -> dict:
    """Options as BasicSR's parse_options would produce them (CPU, no dist), outputs under ``out_dir``."""
    opt = read_yaml(DATA / name)
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1, num_gpu=0)
    dirs = {k: str(out_dir / k) for k in ("models", "training_states", "visualization", "log")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    opt["path"].update(dirs, experiments_root=str(out_dir))
    opt["path"].update(paths)
    return opt


def set_nat(opt: dict, **values) -> dict:
    """Set ``network_g.nat2.uncertainty`` values (``dist_temp``, ``tau``) and ``nat3.mask.tau3``."""
    g = opt["network_g"]
    for k in ("dist_temp", "tau"):
        if k in values:
            g["nat2"].setdefault("uncertainty", {})[k] = values[k]
    if "tau3" in values:
        g["nat3"].setdefault("mask", {})["tau3"] = values["tau3"]
    return opt


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """Tiny VQGAN, Stage-II, Stage-III (GLARENet) and NAT-II (GLARENATFlowNet) checkpoints matching the YAMLs."""
    d = tmp_path_factory.mktemp("nat_ckpts")
    s2 = read_yaml(DATA / "tiny_stage2_nat.yml")
    torch.manual_seed(0)
    vq = build_network(deepcopy(s2["network_vq"]))
    # a spread-out codebook so that flow latents have informative nearest codes
    vq.quantize.embedding.weight.data.normal_(0, 0.3)
    glare_kw = {k: v for k, v in s2["network_g"].items() if k not in ("type", "codebook_size", "nat2")}
    glare = GLARENet(**glare_kw)
    nat_net = build_network(deepcopy(s2["network_g"]))
    nat_net.nat2.dist_temp.fill_(0.01)
    nat_net.nat2.tau.fill_(0.3)
    stage2 = {k: v for k, v in glare.state_dict().items() if k.startswith(("RRDB.", "flowUpsamplerNet."))}
    nat_sd = {**stage2, **{k: v for k, v in nat_net.state_dict().items() if k.startswith("nat2.")}}
    files = {"vq": vq.state_dict(), "stage2": stage2, "glare": glare.state_dict(), "nat2": nat_sd}
    for name, sd in files.items():
        torch.save({"params": sd}, d / f"{name}.pth")
    return {k: str(d / f"{k}.pth") for k in files}


def stage2_paths(ckpts: dict) -> dict:
    return {"pretrain_network_vq": ckpts["vq"], "pretrain_network_stage2": ckpts["stage2"]}


def stage3_paths(ckpts: dict) -> dict:
    return {
        "pretrain_network_vq": ckpts["vq"],
        "pretrain_network_glare": ckpts["glare"],
        "pretrain_network_nat2": ckpts["nat2"],
    }


def batch(seed: int = 0, h: int = 36, w: int = 44) -> dict:
    """A batch of 2 whose latent (h/4 x w/4 = 9 x 11) has odd sizes."""
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(2, 3, h, w, generator=g)
    return {"lq": gt * 0.15, "gt": gt, "lq_path": ["a.png", "b.png"]}


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def run_test(model, data: dict) -> torch.Tensor:
    model.feed_data({"lq": data["lq"]})
    model.test()
    return model.get_current_visuals()["result"]


# ------------------------------------------------------------------------------------------------- knobs / options
def test_every_spec_knob_has_a_yaml_key_with_the_spec_default():
    spec = flatten(yaml.safe_load(SPEC_61))
    assert set(spec) == set(NAT_KNOB_LOCATIONS), set(spec) ^ set(NAT_KNOB_LOCATIONS)
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
    assert resolve_nat_config({}, NAT2_DEFAULTS, "x") == net2
    assert resolve_nat_config({"decode": {"iters": 2}}, NAT2_DEFAULTS, "x")["decode"]["schedule"] == "cosine"
    with pytest.raises(ValueError, match=r"network_g\.nat2\.model\.dimm is unknown"):
        resolve_nat_config({"model": {"dimm": 3}}, NAT2_DEFAULTS, "network_g.nat2")
    with pytest.raises(ValueError, match=r"network_g\.nat2\.feedback\.mode = 'gated' is not implemented"):
        resolve_nat_config({"feedback": {"mode": "gated"}}, NAT2_DEFAULTS, "network_g.nat2", SUPPORTED_VALUES["nat2"])
    ablations = {"model": {"uvit_skips": True, "pos": "peg", "tok_init": "codebook_lift", "cond_mode": "adaln"}}
    ablations["uncertainty"] = {"source": "margin"}
    ablations["decode"] = {"remask_rule": "threshold"}
    cfg = resolve_nat_config(ablations, NAT2_DEFAULTS, "network_g.nat2", SUPPORTED_VALUES["nat2"])
    nat = build_latent_nat(cfg, codebook_size=16, code_dim=3, cond_channels=4)
    assert nat.body.skip_proj is not None and nat.body.peg is not None and nat.pos == "peg"
    assert nat.tok_init == "codebook_lift" and nat.uncertainty_source == "margin" and nat.cond_merge is not None
    assert nat.remask_rule == "threshold"
    with pytest.raises(ValueError, match=r"train\.nat2\.r_maxx"):
        resolve_nat_config({"r_maxx": 1}, nat_model.NAT2_TRAIN_DEFAULTS, "train.nat2")


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


def test_every_implemented_ablation_trains_through_the_stock_step(tmp_path, ckpts):
    """adaLN conditioning, U-ViT skips, PEG-only positions, margin uncertainty and codebook-lift tokens together:
    finite masked CE, and the zero-initialised modulation and the skip projections receive updates."""
    opt = set_nat(make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts)), dist_temp=0.01, tau=0.3)
    model_opt = opt["network_g"]["nat2"].setdefault("model", {})
    model_opt.update(cond_mode="adaln", uvit_skips=True, pos="peg", tok_init="codebook_lift", depth=2)
    opt["network_g"]["nat2"].setdefault("uncertainty", {})["source"] = "margin"
    torch.manual_seed(0)
    model = build_model(opt)
    nat = model.get_bare_model(model.net_g).nat2
    ada0 = nat.body.blocks[0].ada[1].weight.detach().clone()
    skip0 = nat.body.skip_proj[0].weight.detach().clone()
    assert ada0.abs().max() == 0
    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
        assert math.isfinite(float(model.log_dict["l_ce"]))
    assert nat.body.blocks[0].ada[1].weight.abs().max() > 0
    assert not torch.equal(nat.body.skip_proj[0].weight, skip0)


def test_codebook_lift_initialises_only_a_fresh_nat2(tmp_path, ckpts):
    """``tok_init: codebook_lift`` rewrites the code rows of a fresh NAT-II from the frozen codebook (also in the EMA
    copy); NAT-II weights loaded from a file are kept."""
    opt = set_nat(make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts)), dist_temp=0.01, tau=0.3)
    opt["network_g"]["nat2"].setdefault("model", {})["tok_init"] = "codebook_lift"
    torch.manual_seed(0)
    plain_opt = deepcopy(opt)
    plain_opt["network_g"]["nat2"]["model"]["tok_init"] = "random"
    plain = build_model(plain_opt).net_g.nat2.tok_emb.weight
    torch.manual_seed(0)
    model = build_model(opt)
    lifted = model.net_g.nat2.tok_emb.weight
    k = model.net_g.nat2.codebook_size
    assert not torch.allclose(lifted[:k], plain[:k]) and torch.equal(lifted[k], plain[k])
    assert torch.equal(model.net_g_ema.nat2.tok_emb.weight, lifted)
    torch.manual_seed(1)  # another rank's global seed (BasicSR: seed + rank): the same code rows
    assert torch.equal(build_model(deepcopy(opt)).net_g.nat2.tok_emb.weight[:k], lifted[:k])
    loaded_opt = deepcopy(opt)
    loaded_opt["path"]["pretrain_network_nat2"] = ckpts["nat2"]
    loaded = build_model(loaded_opt).net_g.nat2.tok_emb.weight
    saved = torch.load(ckpts["nat2"], weights_only=True)["params"]["nat2.tok_emb.weight"]
    assert torch.equal(loaded, saved)


# ------------------------------------------------------------------------------------------------- bit identity
def test_nothing_masked_stage2_output_is_bit_identical_to_glare(tmp_path, ckpts):
    s2 = read_yaml(DATA / "tiny_stage2_nat.yml")
    flow_opt = {
        **{k: s2[k] for k in ("name", "num_gpu", "network_vq")},
        "model_type": "GLAREFlowModel",
        "network_g": {k: v for k, v in s2["network_g"].items() if k not in ("codebook_size", "nat2")},
        "path": {},
    }
    flow_opt["network_g"]["type"] = "GLAREFlowNet"
    flow_opt.update(is_train=False, dist=False, rank=0, world_size=1)
    flow_opt["path"] = {"pretrain_network_vq": ckpts["vq"], "pretrain_network_g": ckpts["stage2"]}
    baseline = build_model(flow_opt)
    data = batch(3)
    ref = run_test(baseline, data)

    off = build_model(
        set_nat(make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts), False), dist_temp=0.01, tau=1.0)
    )
    assert torch.equal(run_test(off, data), ref)
    assert off._last_refine["n0"].sum() == 0
    on = build_model(
        set_nat(make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts), False), dist_temp=0.01, tau=0.0)
    )
    out_on = run_test(on, data)
    assert on._last_refine["n0"].sum() > 0 and not torch.equal(out_on, ref)  # the comparison can fail


def test_refined_codes_are_the_quantisation_of_the_nl_decoder_input(tmp_path, ckpts):
    """``refine_latent`` hands the NL decoder ``C[v^T]`` instead of quantising ``z_nl`` again: it must be exactly
    what the quantiser gives for ``z_nl`` (same codes), or the shortcut would change the output."""
    opt = set_nat(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), False), tau=0.0, tau3=1.0)
    model = build_model(opt)
    net, vq = model.net_g, model.net_vq
    with torch.no_grad():
        rev = net.reverse(batch(4)["lq"])
        lat = net.refine_latent(rev, vq.quantize.embedding.weight)
        quant, _, codes = vq.quantize_latent(lat["z_nl"])
    assert lat["quant_nl"] is not None and lat["refine"]["mask_union"].any()
    assert torch.equal(codes, lat["refine"]["codes"])
    assert (lat["quant_nl"] - quant).abs().max().item() < 1e-6


def test_nothing_masked_stage3_output_is_bit_identical_to_glare(tmp_path, ckpts):
    s3 = read_yaml(DATA / "tiny_stage3_nat.yml")
    aft_opt = {
        **{k: s3[k] for k in ("name", "num_gpu", "network_vq")},
        "model_type": "GLAREAFTModel",
        "network_g": {k: v for k, v in s3["network_g"].items() if k not in ("codebook_size", "nat2", "nat3")},
    }
    aft_opt["network_g"]["type"] = "GLARENet"
    aft_opt.update(is_train=False, dist=False, rank=0, world_size=1)
    aft_opt["path"] = {"pretrain_network_vq": ckpts["vq"], "pretrain_network_g": ckpts["glare"]}
    ref = run_test(build_model(aft_opt), batch(4))

    for mf_input in ("refined", "flow"):
        opt = set_nat(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), False), tau=1.0, tau3=1.0)
        opt["network_g"]["nat2"]["feedback"] = {"mf_input": mf_input}
        model = build_model(opt)
        assert torch.equal(run_test(model, batch(4)), ref), mf_input
    opt = set_nat(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), False), tau=0.0, tau3=1.0)
    assert not torch.equal(run_test(build_model(opt), batch(4)), ref)  # NAT-II active: output changes


def test_decoder_nat_at_init_leaves_stage3_output_unchanged(tmp_path, ckpts):
    opt = set_nat(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), False), tau=0.0, tau3=0.0)
    model = build_model(opt)  # NAT-III freshly initialised (zero output layer), masking half the patches
    net, vq = model.net_g, model.net_vq
    data = batch(5)
    with torch.no_grad():
        full, full_plain = net(data["lq"], vq, return_intermediates=True), net(data["lq"], vq)
        nat3, net.nat3 = net.nat3, None
        without = net(data["lq"], vq, return_intermediates=True)["output"]
        without_plain = net(data["lq"], vq)  # the in-place inference path: compared with its own kind
        net.nat3 = nat3
    assert full["nat3_mask"].any() and full["refine"]["n0"].sum() > 0
    assert torch.equal(full["nat3_h"], full["nat3_h_mid"])
    assert torch.equal(full["output"], without) and torch.equal(full_plain, without_plain)
    assert (full_plain - full["output"]).abs().max().item() < 1e-5  # the two paths differ by float rounding only


# ------------------------------------------------------------------------------------------------- NAT-II training
def frozen_trainable(model):
    net = model.get_bare_model(model.net_g)
    if isinstance(net, GLARENATNet):
        return [model.net_vq, net.RRDB, net.flowUpsamplerNet, net.nat2], [net.deformable_decoder, net.nat3]
    return [model.net_vq, net.RRDB, net.flowUpsamplerNet], [net.nat2]


@pytest.mark.parametrize("name", ["tiny_stage2_nat.yml", "tiny_stage3_nat.yml"])
def test_two_steps_train_only_the_trainable_parts_on_odd_latents(name, tmp_path, ckpts):
    paths = stage2_paths(ckpts) if "stage2" in name else stage3_paths(ckpts)
    model = build_model(make_opt(name, tmp_path, paths))
    frozen, trainable = frozen_trainable(model)
    in_optim = {id(p) for o in model.optimizers for g in o.param_groups for p in g["params"]}
    for m in frozen:
        assert all(not p.requires_grad and id(p) not in in_optim for p in m.parameters())
    for m in trainable:
        assert all(id(p) in in_optim for p in m.parameters() if p.requires_grad)  # D_MF: unused official params
    before_frozen, before_train = [snapshot(m) for m in frozen], [snapshot(m) for m in trainable]
    for it in (1, 2):
        model.feed_data(batch(it))
        model.update_learning_rate(it, -1)
        model.optimize_parameters(it)
        log = model.get_current_log()
        assert log and all(np.isfinite(v) for v in log.values()), log
    for m, snap in zip(frozen, before_frozen):
        assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items()), f"{type(m).__name__} changed"
        assert not m.training
    for m, snap in zip(trainable, before_train):
        assert any(not torch.equal(v, snap[k]) for k, v in m.state_dict().items() if v.is_floating_point())
    # the frozen GLARE part of the EMA copy stays bit-identical (copied, not averaged)
    ema = model.net_g_ema
    assert all(
        torch.equal(p, model.get_bare_model(model.net_g).RRDB.state_dict()[k]) for k, p in ema.RRDB.state_dict().items()
    )
    out = run_test(model, batch(7))
    assert out.shape == (2, 3, 36, 44) and bool(((out >= 0) & (out <= 1)).all())


def test_nat2_loss_is_cross_entropy_on_masked_positions_only(tmp_path, ckpts, monkeypatch):
    model = build_model(make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts)))
    net = model.get_bare_model(model.net_g)
    data = batch(2)
    model.feed_data(data)
    model.optimize_parameters(1)  # calibrates dist_temp / tau on this batch (no datasets configured)
    assert not math.isnan(float(net.nat2.tau)) and not math.isnan(float(net.nat2.dist_temp))
    assert float(model.net_g_ema.nat2.tau) == float(net.nat2.tau)  # calibrated buffers reach the EMA copy

    fixed = torch.zeros(2, 9, 11, dtype=torch.bool)
    fixed[0, 1:4, 2:5] = True
    fixed[1, 8, 10] = True
    monkeypatch.setattr(nat_model, "sample_train_mask", lambda *a, **k: fixed.clone())
    rows = []
    hook = net.nat2.head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():  # the expected loss, before the step changes the weights
        rev = net.reverse(data["lq"])
        y = model.net_vq.quantize.nearest_indices(model.net_vq.encode(data["gt"]))
        unc = net.nat2.uncertainty(rev["z_hat"], model.net_vq.quantize.embedding.weight)
        tokens = torch.where(fixed, net.nat2.mask_token_id, unc.codes)  # visible = flow codes, never the GT
        logits = net.nat2.logits(tokens, rev["z_hat"], rev["color_map"], rev["cond"], unc.entropy, fixed)
        expected = torch.nn.functional.cross_entropy(logits, y[fixed], label_smoothing=0.1)
    model.feed_data(data)
    model.optimize_parameters(2)
    hook.remove()
    assert rows == [int(fixed.sum()), int(fixed.sum())]  # logits only at the masked positions
    log = model.get_current_log()
    assert log["l_ce"] == pytest.approx(float(expected), rel=1e-5)
    assert log["mask_frac"] == pytest.approx(float(fixed.float().mean()))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 2) -> None:
        self.opt = {"name": "tiny-val"}
        self.items = [batch(20 + i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        b = self.items[i]
        return {"lq": b["lq"][0], "gt": b["gt"][0], "lq_path": f"img{i}.png"}


def test_validation_logs_nat_token_statistics_as_json(tmp_path, ckpts):
    opt = make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts))
    opt["val"]["use_ema"] = False
    model = build_model(set_nat(opt, dist_temp=0.01, tau=0.2))
    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
    loader = torch.utils.data.DataLoader(_Pairs(), batch_size=1)
    model.validation(loader, 2, None, False)
    stats = json.loads((tmp_path / "nat_val_stats_2.json").read_text())
    assert stats == json.loads((tmp_path / "nat_val_stats_latest.json").read_text())
    assert stats["n_images"] == 2 and stats["n_positions"] == 2 * 9 * 11
    assert all(isinstance(v, (int, float)) for v in stats.values()), stats
    assert 0 < stats["masked_frac"] <= 0.5 and stats["tau"] == pytest.approx(0.2)
    # recompute every statistic directly from the network, image by image
    net = model.get_bare_model(model.net_g).eval()
    v0, vt, ys, m0, ent = [], [], [], [], []
    psnr: dict[str, list[float]] = {"nat": [], "oracle_flow_codes": [], "oracle_gt_at_mask0": [], "oracle_all_gt": []}

    def db(img: torch.Tensor, gt: torch.Tensor) -> float:
        return float(10 * torch.log10(1 / (img.double().clamp(0, 1) - gt.double()).pow(2).mean()))

    with torch.no_grad():
        for item in loader.dataset:
            out = net.enhance(item["lq"][None], model.net_vq, return_intermediates=True)
            ref, gt = out["refine"], item["gt"][None]
            y_map = model.net_vq.quantize.nearest_indices(model.net_vq.encode(gt))
            ys.append(y_map.flatten())
            v0.append(ref["codes_init"].flatten())
            vt.append(ref["codes"].flatten())
            m0.append(ref["mask_init"].flatten())
            ent.append(ref["entropy"].flatten())
            psnr["nat"].append(db(out["output"], gt))
            for name, codes in (
                ("oracle_flow_codes", ref["codes_init"]),
                ("oracle_gt_at_mask0", torch.where(ref["mask_init"], y_map, ref["codes_init"])),
                ("oracle_all_gt", y_map),
            ):
                rgb = model.net_vq.decode_indices(codes)[0][..., : gt.shape[-2], : gt.shape[-1]]
                psnr[name].append(db(rgb, gt))
    for name, values in psnr.items():  # the oracle rows, each decoded independently here
        assert stats[f"psnr_{name}"] == pytest.approx(sum(values) / len(values), abs=1e-4), name
    assert stats["psnr_oracle_flow_codes"] != stats["psnr_oracle_all_gt"]
    v0, vt, y, m0, ent = (torch.cat(t) for t in (v0, vt, ys, m0, ent))
    assert stats["n_masked"] == int(m0.sum()) > 0
    assert stats["acc_flow_masked"] == pytest.approx(float((v0 == y)[m0].float().mean()))
    assert stats["acc_nat_masked"] == pytest.approx(float((vt == y)[m0].float().mean()))
    assert stats["acc_nat_all"] == pytest.approx(float((vt == y).float().mean()))
    wrong = v0 != y
    pairs = (ent[wrong][:, None] > ent[~wrong][None]).double() + 0.5 * (ent[wrong][:, None] == ent[~wrong][None])
    assert stats["auroc_entropy"] == pytest.approx(float(pairs.mean()))  # brute-force Mann-Whitney


def _write_lol(root: Path, n: int = 3, h: int = 32, w: int = 40) -> None:
    rng = np.random.default_rng(0)
    for sub in ("low", "high"):
        (root / "our485" / sub).mkdir(parents=True)
    for i in range(n):
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "our485" / "high" / f"{i}.png"), gt)
        cv2.imwrite(str(root / "our485" / "low" / f"{i}.png"), gt // 6)


def test_calibration_runs_on_the_validation_split_before_training(tmp_path, ckpts):
    _write_lol(tmp_path / "lol")
    opt = make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts))
    ds = {"type": "LOLPairedDataset", "dataroot": str(tmp_path / "lol"), "layout": "lolv1", "split": "train"}
    opt["datasets"] = {"train": {**ds, "name": "t", "phase": "train", "gt_size": None}, "val": {**ds, "name": "v"}}
    model = build_model(opt)
    nat2 = model.get_bare_model(model.net_g).nat2
    assert not model.needs_calibration()
    # tau is the (1 - rho_target) entropy quantile of the validation images' flow outputs
    lq = [model.calibration_images(model.nat_train)[i] for i in range(3)]
    net = model.get_bare_model(model.net_g)
    with torch.no_grad():
        zs = [net.reverse(x)["z_hat"] for x in lq]
    cb = model.net_vq.quantize.embedding.weight
    assert float(nat2.dist_temp) == pytest.approx(calibrate_dist_temp(zs, cb))
    assert float(nat2.tau) == pytest.approx(calibrate_tau(zs, cb, float(nat2.dist_temp), 8, 0.25))
    assert float(model.net_g_ema.nat2.tau) == float(nat2.tau)
    opt["datasets"]["train"]["gt_size"] = 16  # crops contradict full_frames: true
    with pytest.raises(ValueError, match="full_frames"):
        build_model(opt)


def test_flow_mc_uncertainty_from_flow_samples_calibrates_masks_and_trains(tmp_path, ckpts):
    """``uncertainty.source: flow_mc``: the code-histogram entropy of 8 flow samples at heat 0.8 (recomputed here
    from the flow), deterministic; tau is its quantile on the calibration split; it masks at inference and trains."""
    _write_lol(tmp_path / "lol")
    opt = make_opt("tiny_stage2_nat.yml", tmp_path, stage2_paths(ckpts))
    opt["network_g"]["nat2"].setdefault("uncertainty", {})["source"] = "flow_mc"
    ds = {"type": "LOLPairedDataset", "dataroot": str(tmp_path / "lol"), "layout": "lolv1", "split": "train"}
    opt["datasets"] = {"train": {**ds, "name": "t", "phase": "train", "gt_size": None}, "val": {**ds, "name": "v"}}
    model = build_model(opt)
    net = model.get_bare_model(model.net_g)
    cb = model.net_vq.quantize.embedding.weight
    lq = model.calibration_images(model.nat_train)
    with torch.no_grad():
        revs = [net.reverse(x) for x in lq]
        scores = [net.nat2_score(r, cb) for r in revs]
        gen = torch.Generator().manual_seed(0)
        rev = revs[0]
        codes = []
        for _ in range(8):
            eps = torch.randn(rev["color_map"].shape, generator=gen)
            z, _ = net.flowUpsamplerNet(rev["color_map"] + 0.8 * eps, rev["cond"], reverse=True)
            codes.append(model.net_vq.quantize.nearest_indices(z))
    assert torch.equal(scores[0], histogram_entropy(torch.stack(codes)))
    assert torch.equal(net.nat2_score(revs[0], cb), scores[0])  # deterministic
    assert 0 < float(torch.cat([s.flatten() for s in scores]).std())  # samples disagree somewhere
    flat = torch.cat([s.reshape(-1) for s in scores]).numpy()
    assert float(net.nat2.tau) == pytest.approx(float(np.quantile(flat, 0.75)), abs=1e-6)
    with torch.no_grad():
        lat = net.refine_latent(revs[0], cb)
    assert torch.equal(lat["refine"]["score"], scores[0])
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert math.isfinite(float(model.log_dict["l_ce"]))


def test_explicit_option_values_win_over_checkpoint_buffers(tmp_path, ckpts):
    opt = make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), is_train=False)
    model = build_model(opt)
    assert float(model.net_g.nat2.tau) == pytest.approx(0.3)  # 'auto': the checkpoint's calibrated value
    model = build_model(set_nat(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts), False), tau=0.7))
    assert float(model.net_g.nat2.tau) == pytest.approx(0.7)


# ------------------------------------------------------------------------------------------------- Stage III
def test_stage3_nat3_group_lr_warmup_mfm_loss_and_tau3_calibration(tmp_path, ckpts):
    model = build_model(make_opt("tiny_stage3_nat.yml", tmp_path, stage3_paths(ckpts)))
    net = model.get_bare_model(model.net_g)
    groups = {g["name"]: g for g in model.optimizer_g.param_groups}
    assert set(groups) == {"decoder", "nat3"} and groups["nat3"]["initial_lr"] == 2e-3
    assert math.isnan(float(net.nat3.tau3))
    lrs = []
    for it in (1, 2):
        model.feed_data(batch(it))
        model.update_learning_rate(it, -1)
        lrs.append((groups["decoder"]["lr"], groups["nat3"]["lr"]))
        model.optimize_parameters(it)
        assert "l_mfm" in model.get_current_log() and model.get_current_log()["l_mfm"] > 0
    assert lrs == [(1e-3, 2e-3 / 4), (1e-3, 2e-3 * 2 / 4)]  # NAT-III warm-up over train.nat3.warmup = 4
    assert 0.0 <= float(net.nat3.tau3) <= 1.0  # calibrated on the first batch


def test_mfm_loss_and_auroc_helpers():
    h = torch.zeros(1, 2, 2, 2)
    t = torch.ones(1, 2, 2, 2)
    m = torch.tensor([[[[True, False], [False, False]]]])
    t[0, :, 1, 1] = 100.0  # outside the mask: ignored
    assert mfm_loss(h, t, m) == pytest.approx(1.0)
    assert mfm_loss(h, t, torch.zeros_like(m)) == 0.0
    assert binary_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert binary_auroc(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.5
    assert binary_auroc(torch.tensor([0.9, 0.95, 0.4, 0.5]), torch.tensor([0, 1, 0, 1])) == 0.75
    assert binary_auroc(torch.rand(5), torch.zeros(5)) is None


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_nat", ROOT / "scripts" / "bench_nat.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_nat_tiny_smoke(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    results = bench.main(["--tiny", "--device", "cpu", "--warmup", "0", "--runs", "1", "--json", str(out)])
    assert json.loads(out.read_text())["sizes"][0]["size"] == "64x48"
    info = results["sizes"][0]
    assert info["nat2_masked_frac"] == pytest.approx(0.25, abs=0.02)  # tau calibrated to rho_target
    paths = info["paths"]
    assert set(paths) >= {"stage II", "stage II + NAT-II", "stage III", "stage III + NAT-II + NAT-III"}
    for name in ("stage II + NAT-II", "stage III + NAT-II", "stage III + NAT-II + NAT-III"):
        r = paths[name]
        assert r["peak_bytes"] > paths[r["base"]]["weight_bytes"] and math.isfinite(r["latency_overhead"])
        assert r["weight_bytes"] > paths[r["base"]]["weight_bytes"]  # the NAT weights are counted
        assert r["macs"] > paths[r["base"]]["macs"] > 0 and r["mac_overhead"] > 0  # the NAT's work is counted
    assert paths["NAT-II only"]["macs"] > 0
    printed = capsys.readouterr().out
    assert "memory +" in printed and "MACs +" in printed
    untimed = bench.main(["--tiny", "--device", "cpu", "--macs-only"])["sizes"][0]["paths"]
    for name, r in untimed.items():  # one call per path: the same exact MACs and live-tensor peak, no timings
        assert "ms" not in r and "latency_overhead" not in r
        assert r["macs"] == paths[name]["macs"] and r["act_bytes"] == paths[name]["act_bytes"], name
    assert "not timed" in capsys.readouterr().out


def test_nat3_only_uses_the_flow_entropy_and_leaves_the_latent_alone():
    opt = deepcopy(read_yaml(DATA / "tiny_stage3_nat.yml")["network_g"])
    opt["nat2"] = {"enable": False, "uncertainty": {"knn": 8, "dist_temp": 0.01}}
    opt["nat3"]["mask"] = {"tau3": 0.0}
    torch.manual_seed(0)
    net = build_network(opt).eval()
    net.apply_option_values()
    vq = build_network(deepcopy(read_yaml(DATA / "tiny_stage3_nat.yml")["network_vq"])).eval()
    with torch.no_grad():
        out = net(batch(9)["lq"], vq, return_intermediates=True)
        entropy = net.nat2.uncertainty(out["z_hat"], vq.quantize.embedding.weight).entropy
    assert out["refine"] is None and out["z_nl"] is out["z_hat"] and out["z_mf"] is out["z_hat"]
    assert torch.equal(out["uncertainty"], entropy) and out["nat3_mask"].any()
