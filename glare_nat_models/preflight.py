"""Check every input path an option file needs before BasicSR prints the options or creates a folder.

The launchers (``basicsr/train.py``, ``basicsr/test.py``) call :func:`preflight` first, with the option file
they read (:func:`glare_nat_models.launcher.prepare_launch`). It walks the option tree
once and collects, with the dotted option key that names each:

* data: every ``datasets.<phase>.dataroot*`` / ``meta_info_file`` that does not exist;
* checkpoints: every ``path.pretrain_network_*`` and ``path.resume_state`` that is not a file;
* local weights of the losses and metrics that need them (``VGG16PerceptualLoss``, ``LPIPSLoss``,
  ``calculate_lpips*``): the file the option, the environment variable or torch's cache would give;
* the NAT options (``network_g.nat2`` / ``nat3``, ``train.nat2`` / ``nat3``) against their schema
  (:func:`glare_nat_arch.nat_options.nat_option_problems`): unknown keys, wrong types, unsupported values.

All problems come in one message; nothing is created. Paths are relative to the current directory, as BasicSR
reads them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from glare_nat_arch.nat_options import nat_option_problems
from glare_nat_models.pretrained import ALEXNET_FILE, RANDOM, VGG16_FILE, resolve_weights

_VGG16 = ("vgg16_weights", "GLARE_NAT_VGG16", VGG16_FILE, "VGG16")
_ALEX = ("alexnet_weights", "GLARE_NAT_ALEXNET", ALEXNET_FILE, "AlexNet")

#: loss / metric ``type`` -> the weight files it can use, any one of them (option key, environment variable,
#: torchvision file name, network); ``LPIPSLoss`` narrows them by its ``net`` option.
WEIGHTED_PARTS: dict[str, list[tuple[str, str, str, str]]] = {
    "VGG16PerceptualLoss": [("weights_path", *_VGG16[1:])],
    "LPIPSLoss": [_VGG16, _ALEX],
    "calculate_lpips": [_ALEX],
    "calculate_lpips_gtmean": [_ALEX],
}


def _weight_choices(part: Mapping) -> list[tuple[str, str, str, str]]:
    choices = WEIGHTED_PARTS[part["type"]]
    if part["type"] == "LPIPSLoss" and part.get("net", "auto") != "auto":
        choices = [c for c in choices if c[3].lower().startswith(str(part["net"]).lower()[:3])]
    return choices


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every entry of a nested option dict."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            yield dotted, value
            yield from _walk(value, dotted)


def missing_inputs(opt: Mapping, auto_resume: bool = False) -> list[str]:
    """Every input path of ``opt`` that does not exist (and a batch given twice), as ``'<option key>: <problem>'``
    lines; empty when everything is there."""
    problems: list[str] = []
    for key, value in _walk(opt.get("datasets") or {}, "datasets"):
        leaf = key.rsplit(".", 1)[-1]
        if (leaf.startswith("dataroot") or leaf == "meta_info_file") and isinstance(value, str):
            if not os.path.exists(value):
                problems.append(f"{key}: {value} does not exist")
    train = (opt.get("datasets") or {}).get("train") or {}
    if train.get("total_batch_size") is not None and train.get("batch_size_per_gpu") is not None:
        problems.append("datasets.train: both total_batch_size and batch_size_per_gpu are given; keep one")
    for key, value in (opt.get("path") or {}).items():
        wanted = key.startswith("pretrain_network_") or (key == "resume_state" and not auto_resume)
        if wanted and isinstance(value, str) and not os.path.isfile(value):
            problems.append(f"path.{key}: {value} is not a file")
    for key, value in _walk({k: opt.get(k) for k in ("train", "val")}):
        if not isinstance(value, Mapping) or value.get("type") not in WEIGHTED_PARTS:
            continue
        found, wanted = False, []
        for option, env_var, filename, net in _weight_choices(value):
            if str(value.get(option)).lower() == RANDOM:  # random weights asked for explicitly: nothing to find
                found = True
                break
            try:
                resolve_weights(value.get(option), env_var, filename, net)
                found = True
                break
            except FileNotFoundError:
                wanted.append(
                    f"{key}.{option}: {value.get(option) or f'${env_var} or $TORCH_HOME/hub/checkpoints/{filename}'}"
                )
        if not found:
            problems.append(f"{' | '.join(wanted)} not found (local {value['type']} weights; nothing is downloaded)")
    return problems


def preflight(opt_file: str, opt: Mapping, auto_resume: bool = False) -> None:
    """Exit with one message listing every problem of the options ``opt`` read from ``opt_file``: NAT options
    against their schema, then missing inputs."""
    problems = nat_option_problems(opt) + missing_inputs(opt, auto_resume=auto_resume)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        sys.stderr.write(
            f"glare-nat: {opt_file} has {len(problems)} problem(s) (missing inputs, conflicting or invalid "
            f"options):\n{lines}\n"
            "Nothing was started or created. Fix the options or paths in the option file (relative paths are read from "
            "the current directory) or put the files there; README.md says where data and weights go.\n"
        )
        raise SystemExit(2)
