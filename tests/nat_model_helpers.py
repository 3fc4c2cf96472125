"""Shared helpers of the NAT model tests: option files as BasicSR parses them, tiny checkpoints, batches."""

from __future__ import annotations

import os
from copy import deepcopy
from pathlib import Path

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import torch
import yaml
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml

import glare_nat_models  # noqa: F401  (registers archs, datasets, losses, metrics, models)
from glare_nat_arch.glare_arch import GLARENet

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


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


def make_nat_checkpoints(d: Path) -> dict[str, str]:
    """Tiny VQGAN, Stage-II, Stage-III (GLARENet) and NAT-II (GLARENATFlowNet) checkpoints matching the YAMLs,
    written to folder ``d``; returns their paths by name."""
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
