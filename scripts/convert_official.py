#!/usr/bin/env python
"""Convert official GLARE weights to BasicSR ``{'params': state_dict}`` files, checking every key.

    python scripts/convert_official.py net_G.pth experiments/pretrained_models/glare_net_g_lol.pth
    python scripts/convert_official.py vqgan.pkl experiments/pretrained_models/glare_vqgan_lol.pth

The kind is detected from the keys: ``RRDB.*`` + ``deformable_decoder.*`` -> ``GLARENet`` (Stage III ``net_G.pth``),
``RRDB.*`` without the decoder -> ``GLAREFlowNet`` (a Stage-II checkpoint), ``encoder.*``/``decoder.*`` ->
``GLAREVQGAN`` (``vqgan.pkl``; its unused ``conv_semantic.*`` and ``vgg_feat_extractor.*`` entries are dropped, and
only those). The file is loaded into the network (official sizes unless ``--arch-json`` gives other constructor
arguments) with ``strict=True``; missing, unexpected and shape-mismatched keys are reported and nothing is
written unless they are all empty. Values are written unchanged (same dtype), in the network's key order.
Exit status: 0 on success, 1 on a key/shape mismatch, 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import glare_nat_arch  # noqa: E402,F401  (BasicSR import aliases before basicsr)
from glare_nat_arch.glare_arch import GLAREFlowNet, GLARENet  # noqa: E402
from glare_nat_arch.vqgan_arch import GLAREVQGAN, VQGAN_UNUSED_PREFIXES  # noqa: E402
from glare_nat_models.checkpoint import (  # noqa: E402
    CheckpointError,
    atomic_torch_save,
    compare_state_dicts,
    read_state_dict,
)

KINDS = {"net_g": GLARENet, "stage2": GLAREFlowNet, "vqgan": GLAREVQGAN}
MAX_LISTED = 40


def detect_kind(keys: list[str]) -> str:
    """'net_g', 'stage2' or 'vqgan' from the checkpoint's key prefixes (ValueError if none fits)."""
    if any(k.startswith("RRDB.") for k in keys):
        return "net_g" if any(k.startswith("deformable_decoder.") for k in keys) else "stage2"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "vqgan"
    raise ValueError(f"cannot tell the checkpoint kind from its keys (first keys: {keys[:5]})")


def convert(src: str | Path, dst: str | Path | None, kind: str | None = None, arch: dict | None = None) -> dict:
    """Check ``src`` against the network and (if it matches) save ``{'params': ...}`` to ``dst``.

    Returns a report: ``kind``, ``dropped`` (documented unused keys), ``missing``, ``unexpected``, ``shape``
    (``(key, ckpt_shape, net_shape)``), ``n_tensors``, ``n_params`` and ``written`` (bool).
    """
    state_dict, name = read_state_dict(src)
    kind = kind or detect_kind(list(state_dict))
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(KINDS)}")
    dropped = []
    if kind == "vqgan":
        dropped = sorted(k for k in state_dict if k.startswith(VQGAN_UNUSED_PREFIXES))
        for k in dropped:
            del state_dict[k]
    with torch.device("meta"):  # shapes only: no memory for the official ~100M parameters
        net: nn.Module = KINDS[kind](**(arch or {}))
    diff = compare_state_dicts(net.state_dict(), state_dict)
    shape = [(k, in_file, in_net) for k, in_net, in_file in diff.mismatched]
    report: dict = {"missing": diff.missing, "unexpected": diff.unexpected, "shape": shape}
    ok = diff.ok
    ordered = {k: state_dict[k] for k in net.state_dict()} if ok else state_dict
    report.update(
        kind=kind,
        source=name,
        dropped=dropped,
        n_tensors=len(state_dict),
        n_params=sum(v.numel() for v in state_dict.values()),
        written=False,
    )
    if ok and dst is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"params": ordered}, dst)
        report["written"] = True
    return report


def format_report(rep: dict) -> str:
    """Human-readable report (at most ``MAX_LISTED`` keys per category)."""
    lines = [
        f"{rep['source']}: {KINDS[rep['kind']].__name__} ({rep['kind']}), "
        f"{rep['n_tensors']} tensors, {rep['n_params']:,} params"
    ]
    if rep["kind"] == "vqgan":
        lines.append(f"  dropped (documented unused {', '.join(VQGAN_UNUSED_PREFIXES)}): {len(rep['dropped'])}")
    for what in ("missing", "unexpected", "shape"):
        items = rep[what]
        lines.append(f"  {what}: {len(items)}")
        lines.extend(f"    {item}" for item in items[:MAX_LISTED])
        if len(items) > MAX_LISTED:
            lines.append(f"    ... {len(items) - MAX_LISTED} more")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert official GLARE weights to BasicSR {'params': ...} files.")
    parser.add_argument("src", help="official net_G.pth, a Stage-II checkpoint, or vqgan.pkl")
    parser.add_argument("dst", nargs="?", help="output .pth (omit to only check)")
    parser.add_argument("--kind", choices=sorted(KINDS), help="override the key-based detection")
    parser.add_argument("--arch-json", help="JSON dict of constructor arguments (default: official sizes)")
    args = parser.parse_args(argv)
    try:
        arch = json.loads(args.arch_json) if args.arch_json else None
        rep = convert(args.src, args.dst, args.kind, arch)
    except (CheckpointError, ValueError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(rep))
    if rep["written"]:
        print(f"wrote {args.dst}")
    elif any(rep[w] for w in ("missing", "unexpected", "shape")):
        print("not written: the checkpoint does not match the network", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
