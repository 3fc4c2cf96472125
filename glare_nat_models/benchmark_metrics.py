"""Metrics of ``glare-nat-benchmark``: full-reference (paired), no-reference (unpaired) and FID, with definitions.

* :func:`image_metrics`: PSNR / SSIM / LPIPS of one output against its ground truth, in both protocols.
* :func:`no_reference_metrics`: NIQE, mean brightness and colourfulness of one output without ground truth.
* :func:`summarise`: means per result row.
* :class:`FidScorer` / :func:`frechet_distance`: FID between an output set and its ground-truth set.

:data:`PROTOCOLS` holds the definition of every number; it is written into every ``summary.md`` / ``results.json``.

Channel order of NIQE: ``basicsr.metrics.calculate_niqe`` expects a **BGR** ``HWC`` image in [0, 255] (BasicSR reads
images with ``cv2.imread``, which gives BGR, and its ``to_y_channel`` applies ``bgr2ycbcr``: ``Y = 16 + (65.481 R +
128.553 G + 24.966 B) / 255`` with the channels taken in B, G, R order). We pass ``basicsr.utils.tensor2img`` of the
output (uint8, ``rint(255 x)``, RGB -> BGR), exactly what ``cv2.imread`` returns for the saved PNG, so the value
equals ``calculate_niqe(cv2.imread(png), 0, input_order='HWC', convert_to='y')``. Giving it RGB would swap the R and
B weights of Y and change the value.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "PROTOCOLS",
    "METRIC_COLUMNS",
    "NO_REFERENCE_COLUMNS",
    "image_metrics",
    "niqe_score",
    "mean_brightness",
    "colourfulness",
    "no_reference_metrics",
    "summarise",
    "FidScorer",
    "frechet_distance",
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
        "exactly by eigen/singular-value decompositions, see benchmark_metrics.frechet_distance). With so few images "
        "(15 for LOL-v1) FID is strongly biased: indicative only, compare only rows with equal image counts."
    ),
    "brightness": (
        "Input = clip(factor * low-light image, 0, 1); factor 1.0 is the standard benchmark. Paired sets are "
        "evaluated at every factor, unpaired sets at factor 1 only."
    ),
    "niqe": (
        "Unpaired sets (no ground truth). NIQE (lower = more natural) = basicsr.metrics.calculate_niqe(img, 0, "
        "input_order='HWC', convert_to='y') on the uint8 output img = basicsr.utils.tensor2img(output) (rint(255 x), "
        "BGR channel order, as cv2.imread gives and BasicSR expects): Y channel of BT.601 YCbCr, crop 0, 96x96 "
        "blocks without overlap, BasicSR's pristine-model parameters (MATLAB niqe_release). Undefined (NaN; the set "
        "mean and niqe_n use the other images) for images with fewer than two whole 96x96 blocks or without "
        "texture."
    ),
    "mean_brightness": "Mean BT.601 luma (0.299 R + 0.587 G + 0.114 B) of the uint8 output divided by 255, in [0, 1].",
    "colourfulness": (
        "Hasler & Suesstrunk (2003) colourfulness M of the uint8 output on the 0-255 scale: rg = R - G, "
        "yb = (R + G) / 2 - B, M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2) (population "
        "standard deviations); 0 for a gray image."
    ),
}

#: Full-reference (paired) columns, in table order.
METRIC_COLUMNS = ("psnr", "ssim", "lpips", "psnr_gtmean", "ssim_gtmean", "lpips_gtmean")
#: No-reference (unpaired) columns, in table order.
NO_REFERENCE_COLUMNS = ("niqe", "mean_brightness", "colourfulness")
#: NIQE's block side (basicsr.metrics.niqe.niqe: 96x96 blocks, no overlap); two whole blocks are the minimum.
NIQE_BLOCK = 96


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


def niqe_score(img_bgr: np.ndarray) -> float:
    """NIQE of a uint8 ``(H, W, 3)`` **BGR** image, BasicSR's implementation with its documented settings.

    ``basicsr.metrics.calculate_niqe(img_bgr, 0, input_order='HWC', convert_to='y')``; NaN where NIQE is
    undefined: fewer than two whole 96x96 blocks (one block gives no covariance) or blocks without texture
    (BasicSR then fails in an SVD or returns a non-finite value).
    """
    from basicsr.metrics import calculate_niqe

    h, w = img_bgr.shape[:2]
    if (h // NIQE_BLOCK) * (w // NIQE_BLOCK) < 2:
        return float("nan")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate blocks: NumPy's empty-slice warnings
        try:
            value = float(calculate_niqe(img_bgr, 0, input_order="HWC", convert_to="y"))
        except (np.linalg.LinAlgError, ValueError):
            return float("nan")
    return value if math.isfinite(value) else float("nan")


def mean_brightness(img_bgr: np.ndarray) -> float:
    """Mean BT.601 luma of a uint8 ``(H, W, 3)`` BGR image, divided by 255 (in [0, 1])."""
    return float((img_bgr.astype(np.float64) @ np.array([0.114, 0.587, 0.299])).mean() / 255.0)


def colourfulness(img_bgr: np.ndarray) -> float:
    """Hasler & Suesstrunk colourfulness ``M`` of a uint8 ``(H, W, 3)`` BGR image (0-255 scale; 0 for gray).

    ``rg = R - G``, ``yb = (R + G) / 2 - B``; ``M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 sqrt(mean(rg)^2 + mean(yb)^2)``.
    """
    img = img_bgr.astype(np.float64)
    b, g, r = img[..., 0], img[..., 1], img[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def no_reference_metrics(out: torch.Tensor) -> dict[str, float]:
    """NIQE, mean brightness and colourfulness of one output without ground truth (see :data:`PROTOCOLS`).

    Args:
        out: ``(3, H, W)`` or ``(1, 3, H, W)`` RGB output, float (clamped to [0, 1] here).

    Returns:
        ``{'niqe', 'mean_brightness', 'colourfulness'}``, all computed on ``tensor2img(out)`` (uint8 BGR).
    """
    from basicsr.utils import tensor2img

    img = tensor2img(out.detach().float().cpu().clamp(0, 1).reshape(out.shape[-3:]))  # uint8 BGR, rounded
    return {"niqe": niqe_score(img), "mean_brightness": mean_brightness(img), "colourfulness": colourfulness(img)}


def summarise(rows: list[dict], key_fields: tuple[str, ...] = ("dataset", "brightness")) -> list[dict]:
    """Mean of every metric column per ``key_fields`` group (first-seen order); adds ``n`` (image count).

    NIQE is averaged over the images where it is defined (finite) and their count is ``niqe_n``; the other
    columns are plain means (an ``inf`` PSNR makes the mean ``inf``).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key_fields), []).append(r)
    out = []
    for key, rs in groups.items():
        s = dict(zip(key_fields, key), n=len(rs))
        for col in METRIC_COLUMNS + NO_REFERENCE_COLUMNS:
            if col not in rs[0]:
                continue
            values = [r[col] for r in rs]
            if col == "niqe":
                values = [v for v in values if math.isfinite(v)]
                s["niqe_n"] = len(values)
            s[col] = float(np.mean(values)) if values else float("nan")
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
