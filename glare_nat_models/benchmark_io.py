"""Outputs of ``glare-nat-benchmark``: the provenance record and the files ``per_image.csv``, ``summary.md``,
``results.json`` and the image grids.

``summary.md`` holds one table for paired sets (full-reference metrics) and one for unpaired sets (no-reference
metrics), each with the runtime columns, then the definitions of every number (``record['protocols']``) and the
provenance. With a ``--sweep`` every table starts with the ``setting`` column (``KEY=VALUE``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from glare_nat_models.benchmark_metrics import METRIC_COLUMNS, NO_REFERENCE_COLUMNS
from glare_nat_models.inference import load_options, pretrain_paths

__all__ = [
    "sha256_file",
    "checkpoint_hashes",
    "cpu_model_name",
    "device_info",
    "provenance",
    "json_safe",
    "write_csv",
    "write_summary_md",
    "write_json",
    "write_grid",
    "to_u8_rgb",
]


# --------------------------------------------------------------------------------------------------------------
# provenance
# --------------------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hashes(opt: dict, cache: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``{pretrain_network_*: {'path', 'sha256'}}`` of resolved options; ``cache`` maps path -> hash across calls."""
    cache = {} if cache is None else cache
    out = {}
    for key, p in pretrain_paths(opt).items():
        if p not in cache:
            cache[p] = sha256_file(p)
        out[key] = {"path": p, "sha256": cache[p]}
    return out


def _git_state(repo: Path) -> dict:
    def git(*a: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("glare-nat", "torch", "torchvision", "basicsr", "numpy", "opencv-python", "lpips", "scikit-image"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_model_name() -> str:
    """The CPU model (``model name`` of ``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, precision: torch.dtype | None) -> dict:
    """The device the numbers were measured on: type, name (GPU or CPU model), precision, threads, CPU count."""
    cuda = device.type == "cuda"
    return {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if cuda else cpu_model_name(),
        "precision": str(precision or torch.float32).replace("torch.", ""),
        "torch_threads": None if cuda else torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def provenance(opt_path: str | Path | None, mode: str, seed: int, overrides: dict | None = None) -> dict:
    """Option-file and checkpoint hashes (after ``overrides``), git state, seed, versions, determinism flags."""
    record: dict = {
        "mode": mode,
        "git": _git_state(Path(__file__).resolve().parents[1]),
        "seed": seed,
        "versions": _versions(),
        "determinism": {
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
    }
    if opt_path is not None:
        opt = load_options(opt_path, overrides)
        record["option_file"] = {"path": str(opt_path), "sha256": sha256_file(opt_path)}
        record["model"] = {"name": opt.get("name"), "model_type": opt.get("model_type")}
        record["overrides"] = dict(overrides or {})
        record["checkpoints"] = checkpoint_hashes(opt)
    return record


# --------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------
def _fmt(v: float | int | str | None, digits: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v:.{digits}f}")
    return str(v)


def json_safe(obj):
    """``obj`` with non-finite floats as strings (``'inf'`` / ``'nan'``: strict JSON has no infinities)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _has_sweep(rows: list[dict]) -> bool:
    return any(r.get("setting") is not None for r in rows)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Per-image rows (paired and unpaired; a metric a row lacks is an empty cell); floats at full precision."""
    present = [c for c in METRIC_COLUMNS + NO_REFERENCE_COLUMNS if any(c in r for r in rows)]
    fields = (["setting"] if _has_sweep(rows) else []) + ["dataset", "brightness", "image"] + present
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


_RUNTIME_COLS = [("latency_ms", "latency (ms)", 2), ("peak_mem_mib", "peak mem (MiB)", 1)]


def _table(rows: list[dict], key_cols: list[tuple[str, str]], cols: list[tuple[str, str, int]]) -> list[str]:
    """Markdown table: key columns (``(field, title)``, shown as text) then formatted metric columns."""
    sweep = _has_sweep(rows)
    keys = ([("setting", "setting")] if sweep else []) + key_cols
    head = [t for _, t in keys] + [t for _, t, _ in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in rows:
        cells = [f"{s[k]:g}" if isinstance(s[k], float) else str(s[k]) for k, _ in keys]
        cells += [_fmt(s.get(c, float("nan")), d) for c, _, d in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_summary_md(path: Path, summary: list[dict], record: dict) -> None:
    """Tables of means per (setting,) set and brightness (paired, unpaired), then definitions and provenance."""
    paired = [s for s in summary if s.get("kind", "paired") == "paired"]
    unpaired = [s for s in summary if s.get("kind") == "unpaired"]
    lines = [f"# Benchmark: {record.get('model', {}).get('name') or record['mode']}", ""]
    if paired:
        has_lpips = "lpips" in paired[0]
        cols = [("psnr", "PSNR", 2), ("ssim", "SSIM", 4)] + ([("lpips", "LPIPS", 4)] if has_lpips else [])
        cols += [(c + "_gtmean", f"{t} (GT-mean)", d) for c, t, d in cols]
        cols += [("fid", "FID", 2)] if record.get("fid") else []
        key_cols = [("dataset", "test set"), ("brightness", "brightness"), ("n", "n")]
        lines += ["## Paired test sets (full reference)", ""] + _table(paired, key_cols, cols + _RUNTIME_COLS) + [""]
    if unpaired:
        cols = [("niqe", "NIQE", 4), ("mean_brightness", "mean brightness", 4), ("colourfulness", "colourfulness", 2)]
        key_cols = [("dataset", "set"), ("n", "n"), ("niqe_n", "n (NIQE)")]
        lines += ["## Unpaired sets (no reference)", ""] + _table(unpaired, key_cols, cols + _RUNTIME_COLS) + [""]
        skipped = [(n, s) for n, info in record.get("datasets", {}).items() for s in info.get("skipped", [])]
        lines += [f"- {n}: skipped unreadable `{s['file']}`: {s['error']}" for n, s in skipped]
        lines += [""] if skipped else []
    dev = record.get("device", {})
    lines += ["## Runtime", ""]
    lines.append(
        f"- device: {dev.get('type')} ({dev.get('name')}), precision {dev.get('precision')}, "
        f"torch threads {dev.get('torch_threads')}, {dev.get('cpu_count')} CPUs"
    )
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in record["protocols"].items()]
    lines += ["", "## Provenance", ""]
    if "option_file" in record:
        lines.append(f"- option file: `{record['option_file']['path']}` sha256 `{record['option_file']['sha256']}`")
        if record.get("overrides"):
            lines.append(f"- overrides (--set): {', '.join(f'`{k}={v}`' for k, v in record['overrides'].items())}")
        for k, c in record["checkpoints"].items():
            lines.append(f"- {k}: `{c['path']}` sha256 `{c['sha256']}`")
    if record.get("sweep"):
        lines.append(f"- sweep: `{record['sweep']['key']}` over {record['sweep']['values']} (one model per value)")
    lines.append(f"- mode: {record['mode']}; seed {record['seed']}; git commit {record['git']['commit']}")
    lines += [f"- note: {n}" for n in record.get("notes", [])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_json(path: Path, record: dict) -> None:
    """``results.json`` (strict JSON: non-finite floats as strings)."""
    path.write_text(json.dumps(json_safe(record), indent=2, default=str) + "\n", encoding="utf-8")


def to_u8_rgb(t: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` float RGB tensor -> ``(H, W, 3)`` uint8 RGB, ``round(255 clamp(t, 0, 1))``."""
    return (t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def write_grid(path: Path, rows: list[tuple[torch.Tensor, ...]]) -> None:
    """One row per image: e.g. input | output | GT (``(3, H, W)`` RGB tensors), rows padded to a common width."""
    from glare_nat_data.image_io import write_image

    strips = [np.concatenate([to_u8_rgb(t) for t in row], axis=1) for row in rows]
    width = max(r.shape[1] for r in strips)
    strips = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in strips]
    write_image(path, np.concatenate(strips, axis=0))
