"""``glare-nat-benchmark``: evaluate one model on the LOL test sets, in both protocols, with a provenance record.

Usage::

    python scripts/benchmark_lol.py -opt options/test_glare_lol.yml --lolv1 datasets/LOL \\
        --lolv2-real datasets/LOLv2 --lolv2-synthetic datasets/LOLv2 --out results/benchmark/glare \\
        [--brightness 0.3,0.7,1.0] [--lpips-weights alexnet.pth] [--fid-inception pt_inception.pth]

The model is the one the option file names (``path.pretrain_network_*``): the benchmark never selects
checkpoints. Every (test set, brightness factor) gives one row; the input is ``clip(factor * low, 0, 1)`` (factor
1.0 is the standard benchmark, the others are robustness runs). Two protocols are reported side by side, each
defined in :data:`PROTOCOLS` (and in every output file). ``--identity`` (output = input) and ``--gt-as-output``
(output = ground truth) need no model and check the pipeline.

Written to ``--out``: ``per_image.csv``, ``summary.md``, ``results.json`` (numbers plus git commit, option-file and
checkpoint SHA-256, seed, package versions, device, protocol definitions, determinism flags), ``grids/`` (input |
output | GT for the first ``--grid-count`` images) and optionally every output image (``--save-images``).
Re-running with the same arguments on CPU gives identical CSV / JSON numbers (only ``created`` and ``timing``
differ).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from glare_nat_arch import compat  # noqa: F401  (shims before basicsr)
from glare_nat_models.inference import (
    load_model_from_options,
    load_options,
    model_forward_fn,
    pretrain_paths,
    resolve_precision,
    run_enhancer,
    select_device,
)

__all__ = [
    "PROTOCOLS",
    "TEST_SETS",
    "image_metrics",
    "summarise",
    "load_test_set",
    "run_benchmark",
    "sha256_file",
    "provenance",
    "FidScorer",
    "frechet_distance",
    "main",
]

#: CLI flag -> (result name, LOLPairedDataset layout)
TEST_SETS = {"lolv1": "lolv1", "lolv2_real": "lolv2_real", "lolv2_synthetic": "lolv2_synthetic"}

PROTOCOLS = {
    "plain": (
        "Protocol A (no GT-mean; Retinexformer / SNR-Aware / Reti-Diff style). Output clamped to [0, 1] and "
        "rounded to uint8 (basicsr.utils.tensor2img). PSNR = basicsr.metrics.calculate_psnr (RGB, crop_border=0, "
        "test_y_channel=False: 10 log10(255^2 / MSE) over all 3 channels). SSIM = basicsr.metrics.calculate_ssim "
        "(same settings; MATLAB-style 11x11 Gaussian window, sigma 1.5, valid region, per RGB channel, averaged). "
        "LPIPS = AlexNet LPIPS v0.1 on the same uint8 RGB images mapped to [-1, 1]."
    ),
    "gtmean": (
        "Protocol B (GT-mean; KinD / LLFlow / GLARE style), mode '{mode}'. r = clip(output, 0, 1) (float, "
        "before rounding); r' = clip(r * mean(Y(gt)) / mean(Y(r)), 0, 1) with one global scale, Y = "
        "0.299 R + 0.587 G + 0.114 B in float64 (mode 'bt601'; mode 'official' reproduces the official GLARE code: "
        "cv2 BGR2GRAY applied to RGB arrays in float32). PSNR = 10 log10(1 / MSE(r', gt)) on float r' over all 3 "
        "channels (no rounding). SSIM = basicsr calculate_ssim on rint(255 r') vs rint(255 gt). LPIPS = AlexNet "
        "LPIPS v0.1 on rint(255 r'). Implemented in glare_nat_models.metrics (calculate_*_gtmean)."
    ),
    "fid": (
        "FID between the output set and the ground-truth set of one row (BasicSR InceptionV3 FID network, inputs "
        "resized to 299x299, 2048-d pool features; the Frechet distance of basicsr.metrics.fid.calculate_fid, computed "
        "exactly by eigen/singular-value decompositions, see benchmark.frechet_distance). With so few images (15 "
        "for LOL-v1) FID is strongly biased: indicative only, compare only rows with equal image counts."
    ),
    "brightness": "Input = clip(factor * low-light image, 0, 1); factor 1.0 is the standard benchmark.",
}

METRIC_COLUMNS = ("psnr", "ssim", "lpips", "psnr_gtmean", "ssim_gtmean", "lpips_gtmean")
OutputFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# metrics of one image
# --------------------------------------------------------------------------------------------------------------
def image_metrics(
    out: torch.Tensor,
    gt: torch.Tensor,
    gtmean_mode: str = "bt601",
    lpips_weights: str | None = None,
    lpips_device: str = "cpu",
) -> dict[str, float]:
    """Both protocols for one image pair.

    Args:
        out: ``(3, H, W)`` or ``(1, 3, H, W)`` RGB output, float (clamped to [0, 1] here).
        gt: ground truth of the same shape, float RGB in [0, 1].
        gtmean_mode: ``'bt601'`` or ``'official'`` (see :data:`PROTOCOLS`).
        lpips_weights: AlexNet weight file (or ``'random'`` for plumbing tests); None = no LPIPS.
        lpips_device: device of the LPIPS network.

    Returns:
        ``{'psnr', 'ssim', 'psnr_gtmean', 'ssim_gtmean'}`` plus ``'lpips'``, ``'lpips_gtmean'`` when enabled.
    """
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils import tensor2img

    from glare_nat_models.metrics import (
        calculate_lpips,
        calculate_lpips_gtmean,
        calculate_psnr_gtmean,
        calculate_ssim_gtmean,
    )

    out = out.detach().float().cpu().clamp(0, 1).reshape(gt.shape[-3:])
    gt = gt.detach().float().cpu().reshape(gt.shape[-3:])
    out_u8, gt_u8 = tensor2img(out), tensor2img(gt)  # uint8 BGR, rounded
    out_f = out.permute(1, 2, 0).numpy()[:, :, ::-1]  # float BGR [0, 1], unrounded
    gt_f = gt.permute(1, 2, 0).numpy()[:, :, ::-1]
    pair = dict(img=out_u8, img2=gt_u8)
    gm = dict(pair, img_float=out_f, img2_float=gt_f, mode=gtmean_mode)
    row = {
        "psnr": float(calculate_psnr(**pair, crop_border=0, test_y_channel=False)),
        "ssim": float(calculate_ssim(**pair, crop_border=0, test_y_channel=False)),
        "psnr_gtmean": calculate_psnr_gtmean(**gm, crop_border=0),
        "ssim_gtmean": calculate_ssim_gtmean(**gm, crop_border=0),
    }
    if lpips_weights is not None:
        lp = dict(alexnet_weights=lpips_weights, device=lpips_device)
        row["lpips"] = calculate_lpips(**pair, crop_border=0, **lp)
        row["lpips_gtmean"] = calculate_lpips_gtmean(**gm, crop_border=0, **lp)
    return row


def summarise(rows: list[dict], key_fields: tuple[str, ...] = ("dataset", "brightness")) -> list[dict]:
    """Mean of every metric column per ``key_fields`` group (first-seen order); adds ``n`` (image count)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(key_fields, key), n=len(rs))
        for col in METRIC_COLUMNS:
            if col in rs[0]:
                s[col] = float(np.mean([r[col] for r in rs]))
        out.append(s)
    return out


# --------------------------------------------------------------------------------------------------------------
# FID (local Inception weights only)
# --------------------------------------------------------------------------------------------------------------
class FidScorer:
    """FID with BasicSR's FID InceptionV3 loaded from a **local** file (never downloaded).

    ``basicsr.archs.inception.fid_inception_v3`` loads ``LOCAL_FID_WEIGHTS`` when that file exists and downloads
    otherwise; we check the file first and point that module global at it while the network is built.
    """

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        import basicsr.archs.inception as inception
        from basicsr.metrics.fid import load_patched_inception_v3

        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--fid-inception: Inception weight file '{path}' does not exist")
        old = inception.LOCAL_FID_WEIGHTS
        inception.LOCAL_FID_WEIGHTS = str(path)
        try:
            with warnings.catch_warnings():  # BasicSR's Inception still passes torchvision's deprecated pretrained=
                warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
                self.net = load_patched_inception_v3(device=device, resize_input=True, normalize_input=True)
        finally:
            inception.LOCAL_FID_WEIGHTS = old
        self.device = device

    @torch.no_grad()
    def features(self, images: list[torch.Tensor]) -> np.ndarray:
        """``[(3, H, W) RGB [0, 1]]`` -> ``(N, 2048)`` float64 pool features (one image at a time: sizes may differ)."""
        feats = [self.net(img[None].to(self.device))[0].flatten(1).cpu() for img in images]
        return torch.cat(feats).double().numpy()

    def score(self, outputs: list[torch.Tensor], gts: list[torch.Tensor]) -> float:
        """FID between the two image sets (see :func:`frechet_distance`)."""
        return frechet_distance(self.features(outputs), self.features(gts))


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``f1 (N1, D)`` and ``f2 (N2, D)``.

    ``|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrt(S1 S2)``, the formula of ``basicsr.metrics.fid.calculate_fid``
    (which is not called: it uses ``scipy.linalg.sqrtm(..., disp=False)``, deprecated in SciPy 1.16 and slow).
    ``Tr sqrt(S1 S2)`` is the sum of square roots of the eigenvalues of ``S1 S2``, computed exactly by symmetric
    eigen/singular-value decompositions:

    * ``min(N1, N2) < D`` (15 LOL images vs D = 2048; the covariances are singular): the singular values of
      ``A1 A2^T / sqrt((N1 - 1)(N2 - 1))`` (``A`` = centred features, ``N x D``), since
      ``S1 S2 = A1^T A1 A2^T A2 / c`` has the same non-zero eigenvalues as ``(A1 A2^T)(A1 A2^T)^T / c``;
    * otherwise: the eigenvalues of ``R S2 R`` with ``R = S1^(1/2)`` (similar to ``S1 S2``).
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"FID needs two (N >= 2, D) feature arrays, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mu1, f2 - mu2  # (N, D): rows are the centred samples
    c1, c2 = len(f1) - 1, len(f2) - 1
    if min(len(f1), len(f2)) < f1.shape[1]:
        tr_sqrt = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt(c1 * c2)
    else:
        lam, vec = np.linalg.eigh(a1.T @ a1 / c1)
        root = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ (a2.T @ a2 / c2) @ root), 0, None)).sum()
    tr1, tr2 = (a1**2).sum() / c1, (a2**2).sum() / c2
    return float(((mu1 - mu2) ** 2).sum() + tr1 + tr2 - 2 * tr_sqrt)


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


def _device_info(device: torch.device, precision: torch.dtype | None) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "type": device.type,
        "name": name,
        "precision": str(precision or torch.float32).replace("torch.", ""),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def provenance(opt_path: str | Path | None, mode: str, seed: int) -> dict:
    """Option-file and checkpoint hashes, git state, seed, versions, determinism flags."""
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
        opt = load_options(opt_path)
        record["option_file"] = {"path": str(opt_path), "sha256": sha256_file(opt_path)}
        record["model"] = {"name": opt.get("name"), "model_type": opt.get("model_type")}
        record["checkpoints"] = {k: {"path": p, "sha256": sha256_file(p)} for k, p in pretrain_paths(opt).items()}
    return record


# --------------------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------------------
def _fmt(v: float | int | str, digits: int) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else ("nan" if math.isnan(v) else f"{v:.{digits}f}")
    return str(v)


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # 'inf' / 'nan': strict JSON has no infinities
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_csv(path: Path, rows: list[dict]) -> None:
    """Per-image rows; floats written with full precision (``repr``)."""
    fields = ["dataset", "brightness", "image"] + [c for c in METRIC_COLUMNS if rows and c in rows[0]]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def write_summary_md(path: Path, summary: list[dict], record: dict) -> None:
    """Markdown table of means per test set and brightness, then the protocol definitions and provenance."""
    has_lpips = bool(summary) and "lpips" in summary[0]
    cols = [("psnr", "PSNR", 2), ("ssim", "SSIM", 4)] + ([("lpips", "LPIPS", 4)] if has_lpips else [])
    gcols = [(c + "_gtmean", f"{t} (GT-mean)", d) for c, t, d in cols]
    fid = record.get("fid", {})
    head = ["test set", "brightness", "n"] + [t for _, t, _ in cols + gcols] + (["FID"] if fid else [])
    lines = [
        f"# Benchmark: {record.get('model', {}).get('name') or record['mode']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for s in summary:
        cells = [s["dataset"], f"{s['brightness']:g}", str(s["n"])] + [_fmt(s[c], d) for c, _, d in cols + gcols]
        if fid:
            cells.append(_fmt(fid.get(f"{s['dataset']}@{s['brightness']:g}", float("nan")), 2))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Protocols", ""] + [f"- **{k}**: {v}" for k, v in record["protocols"].items()]
    lines += ["", "## Provenance", ""]
    if "option_file" in record:
        lines.append(f"- option file: `{record['option_file']['path']}` sha256 `{record['option_file']['sha256']}`")
        for k, c in record["checkpoints"].items():
            lines.append(f"- {k}: `{c['path']}` sha256 `{c['sha256']}`")
    lines.append(f"- mode: {record['mode']}; seed {record['seed']}; git commit {record['git']['commit']}")
    lines += [f"- note: {n}" for n in record.get("notes", [])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _to_u8_rgb(t: torch.Tensor) -> np.ndarray:
    return (t.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def write_grid(path: Path, triples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """One row per image: input | output | GT (``(3, H, W)`` RGB tensors), rows padded to a common width."""
    from glare_nat_data.image_io import write_image

    rows = [np.concatenate([_to_u8_rgb(t) for t in tri], axis=1) for tri in triples]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    write_image(path, np.concatenate(rows, axis=0))


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------
def load_test_set(name: str, root: str | Path, layout: str, max_images: int | None = None):
    """The ``split: test`` pairs of a LOL-style tree as a :class:`glare_nat_data.lol_dataset.LOLPairedDataset`.

    Raises FileNotFoundError / ValueError naming the folder when the layout is not found or holds no pairs.
    """
    from glare_nat_data.lol_dataset import LOLPairedDataset

    opt = {"name": name, "type": "LOLPairedDataset", "dataroot": str(root), "layout": layout, "split": "test"}
    opt.update(phase="test", max_images=max_images)
    return LOLPairedDataset(opt)


def run_benchmark(
    sets: dict,
    out_dir: Path,
    output_fn: OutputFn,
    record: dict,
    brightness: list[float],
    seed: int,
    gtmean_mode: str = "bt601",
    lpips_weights: str | None = None,
    fid: FidScorer | None = None,
    lpips_device: str = "cpu",
    grid_count: int = 3,
    save_images: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate ``output_fn`` on every test set and brightness factor; write CSV, Markdown, JSON and grids.

    Args:
        sets: ``{name: dataset}`` (see :func:`load_test_set`); items hold ``lq``, ``gt`` (3, H, W) and ``lq_path``.
        out_dir: output folder (created; existing files of the same names are overwritten).
        output_fn: ``(lq (1, 3, H, W), gt (1, 3, H, W)) -> (1, 3, H, W)`` output in [0, 1].
        record: provenance (see :func:`provenance`); completed and written as ``results.json``.
        brightness: input scale factors.
        seed: re-applied (``basicsr.utils.set_random_seed``) before every row, so rows do not depend on order.

    Returns:
        The JSON record.
    """
    from basicsr.utils import set_random_seed
    from tqdm import tqdm

    from glare_nat_data.image_io import write_image

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    record["datasets"], record["fid"], seconds, count = {}, {}, 0.0, 0
    for name, ds in sets.items():
        info = {k: ds.opt.get(k) for k in ("dataroot", "layout", "split")}
        record["datasets"][name] = dict(info, lq_dir=str(ds.lq_dir), gt_dir=str(ds.gt_dir), n_images=len(ds))
        for factor in brightness:
            set_random_seed(seed)
            grid, outs, gts = [], [], []
            for i in tqdm(range(len(ds)), desc=f"{name} x{factor:g}", unit="img", disable=not progress):
                item = ds[i]
                lq, gt = (item["lq"][None] * factor).clamp(0, 1), item["gt"][None]
                t0 = time.perf_counter()
                out = output_fn(lq, gt).float().cpu().clamp(0, 1)
                seconds, count = seconds + time.perf_counter() - t0, count + 1
                image = Path(item["lq_path"]).stem
                rows.append(
                    {
                        "dataset": name,
                        "brightness": factor,
                        "image": image,
                        **image_metrics(out, gt, gtmean_mode, lpips_weights, lpips_device),
                    }
                )
                if i < grid_count:
                    grid.append((lq[0], out[0], gt[0]))
                if save_images:
                    write_image(out_dir / "images" / f"{name}_x{factor:g}" / f"{image}.png", _to_u8_rgb(out[0]))
                if fid is not None:
                    outs.append(out[0])
                    gts.append(gt[0])
            if grid:
                write_grid(out_dir / "grids" / f"{name}_x{factor:g}.png", grid)
            if fid is not None:
                record["fid"][f"{name}@{factor:g}"] = fid.score(outs, gts)
    summary = summarise(rows)
    record["results"] = summary
    record["timing"] = {"output_seconds_total": seconds, "output_seconds_per_image": seconds / max(count, 1)}
    write_csv(out_dir / "per_image.csv", rows)
    write_summary_md(out_dir / "summary.md", summary, record)
    (out_dir / "results.json").write_text(json.dumps(_json_safe(record), indent=2) + "\n", encoding="utf-8")
    return record


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--brightness expects comma-separated numbers, got '{text}'") from exc
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--brightness factors must be positive, got '{text}'")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glare-nat-benchmark",
        description="Evaluate a model on LOL test sets: PSNR/SSIM/LPIPS in the plain and the GT-mean protocol.",
    )
    p.add_argument("-opt", "--opt", help="test option YAML naming the checkpoint(s) (not needed for debug modes)")
    p.add_argument("--lolv1", metavar="ROOT", help="LOL-v1 root (eval15/{low,high})")
    p.add_argument("--lolv2-real", metavar="ROOT", help="LOL-v2 root or its Real_captured folder")
    p.add_argument("--lolv2-synthetic", metavar="ROOT", help="LOL-v2 root or its Synthetic folder")
    p.add_argument("--out", help="output folder (default results/benchmark/<name>)")
    p.add_argument("--brightness", type=_floats, default=[0.3, 0.7, 1.0], help="input scale factors (0.3,0.7,1.0)")
    p.add_argument("--gtmean-mode", choices=("bt601", "official"), default="bt601", help="GT-mean gray weights")
    p.add_argument(
        "--lpips-weights",
        help="local torchvision AlexNet file ('random' = plumbing only); default: "
        "$GLARE_NAT_ALEXNET or the torch hub cache, else LPIPS is skipped",
    )
    p.add_argument("--fid-inception", metavar="PATH", help="local pt_inception-2015-12-05 weights; else no FID")
    p.add_argument("--seed", type=int, help="random seed (default: the option file's manual_seed, else 0)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA only)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--tile", type=int, default=0, help="tile side (default 0 = whole images)")
    p.add_argument("--tile-overlap", type=int, default=32, help="minimum tile overlap in pixels")
    p.add_argument("--pad-multiple", type=int, default=4, help="pad H, W to a multiple of this (default 4)")
    p.add_argument("--grid-count", type=int, default=3, help="images per input|output|GT grid (0 = no grids)")
    p.add_argument("--save-images", action="store_true", help="also write every output image")
    p.add_argument("--max-images", type=int, help="evaluate only the first N pairs of each set (debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    debug = p.add_mutually_exclusive_group()
    debug.add_argument("--identity", action="store_true", help="debug: output = (brightness-scaled) input")
    debug.add_argument("--gt-as-output", action="store_true", help="debug: output = ground truth")
    return p


def _resolve_lpips(option: str | None) -> tuple[str | None, str | None]:
    """``(weights to pass to the metric or None, note)``; never downloads."""
    from glare_nat_models.pretrained import ALEXNET_FILE, RANDOM, resolve_weights

    if option is not None and option.lower() == RANDOM:
        return RANDOM, "LPIPS uses RANDOM AlexNet weights (plumbing only; not the LPIPS metric)"
    try:
        path = resolve_weights(option, "GLARE_NAT_ALEXNET", ALEXNET_FILE, "LPIPS (AlexNet)")
    except FileNotFoundError as exc:
        if option is not None:
            raise
        return None, f"LPIPS skipped: {exc}"
    return str(path), None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 setup error)."""
    args = build_parser().parse_args(compat.normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    roots = {n: (getattr(args, n), layout) for n, layout in TEST_SETS.items() if getattr(args, n)}
    mode = "identity" if args.identity else "gt-as-output" if args.gt_as_output else "model"
    try:
        if not roots:
            raise ValueError("give at least one test set: --lolv1, --lolv2-real or --lolv2-synthetic")
        if mode == "model" and not args.opt:
            raise ValueError("-opt is required (or use --identity / --gt-as-output)")
        if args.deterministic:
            import os

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        sets = {n: load_test_set(n, root, layout, args.max_images) for n, (root, layout) in roots.items()}
        device = select_device(args.device)
        dtype = resolve_precision(device, args.fp16, args.bf16)
        opt = load_options(args.opt) if args.opt else {}
        seed = args.seed if args.seed is not None else int(opt.get("manual_seed") or 0)
        lpips_weights, lpips_note = _resolve_lpips(args.lpips_weights)
        fid = FidScorer(args.fid_inception, device) if args.fid_inception else None
        record = provenance(args.opt, mode, seed)
        if mode == "model":
            model = load_model_from_options(args.opt, {"manual_seed": seed}, device)
            fn = model_forward_fn(model, dtype)
            tiling = dict(tile=args.tile or None, overlap=args.tile_overlap, multiple=args.pad_multiple)

            def output_fn(lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
                return run_enhancer(fn, lq, device, **tiling)
        elif mode == "identity":

            def output_fn(lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
                return lq
        else:

            def output_fn(lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
                return gt
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"glare-nat-benchmark: error: {exc}", file=sys.stderr)
        return 2
    notes = [lpips_note] if lpips_note else []
    if fid is None:
        notes.append("FID skipped: no --fid-inception weights given (nothing is downloaded)")
        print(f"note: {notes[-1]}", file=sys.stderr)
    if lpips_note:
        print(f"note: {lpips_note}", file=sys.stderr)
    name = (opt.get("name") or Path(args.opt).stem) if mode == "model" else mode
    out_dir = Path(args.out or Path("results") / "benchmark" / name)
    record.update(
        command=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=_device_info(device, dtype),
        inference={"tile": args.tile or None, "tile_overlap": args.tile_overlap, "pad_multiple": args.pad_multiple},
        gtmean_mode=args.gtmean_mode,
        brightness=args.brightness,
        protocols={k: v.format(mode=args.gtmean_mode) for k, v in PROTOCOLS.items()},
        notes=notes,
    )
    run_benchmark(
        sets,
        out_dir,
        output_fn,
        record,
        args.brightness,
        seed,
        gtmean_mode=args.gtmean_mode,
        lpips_weights=lpips_weights,
        fid=fid,
        lpips_device=str(device),
        grid_count=args.grid_count,
        save_images=args.save_images,
        progress=not args.quiet,
    )
    print(f"wrote {out_dir}/summary.md, per_image.csv, results.json", file=sys.stderr)
    print((out_dir / "summary.md").read_text(encoding="utf-8").split("\n## ")[0])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
