"""GT-mean PSNR / SSIM / LPIPS and plain LPIPS, registered in BasicSR's ``METRIC_REGISTRY``.

Calling convention (BasicSR validation): ``metric(img=out, img2=gt, **opt)`` with ``img``/``img2`` uint8
**BGR** arrays (HWC unless ``input_order='CHW'``), as produced by ``basicsr.utils.tensor2img``. Our models
additionally pass ``img_float`` / ``img2_float``: the same images as float BGR arrays in [0, 1] before
rounding. GT-mean metrics use the float arrays when present (the adjustment is defined on the unrounded
output), else ``uint8 / 255``. Plain PSNR / SSIM are BasicSR's ``calculate_psnr`` / ``calculate_ssim``.

GT-mean adjustment (KinD / LLFlow protocol, docs/glare.md "Official metrics"), one global scale::

    r  = clip(out, 0, 1);  t = gt
    r' = clip(r * gray_mean(t) / gray_mean(r), 0, 1)

``mode`` selects the gray mean:

* ``'bt601'`` (default): the correct BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of the actual channel order,
  in float64.
* ``'official'``: exactly the official GLARE / Retinexformer code, which converts the images to RGB and then
  applies ``cv2.COLOR_BGR2GRAY`` (effective luma ``0.114 R + 0.587 G + 0.299 B``) on float32 arrays, with
  float32 means and a float32 scale.

PSNR is ``10 log10(1 / mse)`` on float ``r'`` over all three channels (no rounding). SSIM is BasicSR's
MATLAB-style SSIM (11x11 Gaussian, sigma 1.5, valid region, per channel, averaged) on
``uint8 = rint(255 r')`` (round half to even, as ``skimage.img_as_ubyte``). Both modes use these two formulas;
they differ only in the gray weights and precision of the scale. One deliberate difference from the official
script: identical images give ``inf`` PSNR (BasicSR convention) where the official ``utils2.PSNR`` returns 100.

LPIPS is AlexNet LPIPS v0.1 (``lpips`` package) with local trunk weights (``glare_nat_models.pretrained``):
RGB uint8 images mapped to [-1, 1] as the official ``Measure.py`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import cv2
import numpy as np
import torch
from basicsr.metrics.metric_util import reorder_image
from basicsr.metrics.psnr_ssim import calculate_ssim
from basicsr.utils.registry import METRIC_REGISTRY

from glare_nat_models.pretrained import ALEXNET_FILE, build_lpips_alex, resolve_weights

__all__ = [
    "GTMEAN_MODES",
    "gray_mean",
    "gt_mean_adjust",
    "to_uint8",
    "get_lpips_net",
    "lpips_distance",
    "calculate_psnr_gtmean",
    "calculate_ssim_gtmean",
    "calculate_lpips",
    "calculate_lpips_gtmean",
]

GTMEAN_MODES = ("bt601", "official")
_BT601_BGR = np.array([0.114, 0.587, 0.299])  # weights of B, G, R
_LPIPS_CACHE: dict[tuple[str, str], torch.nn.Module] = {}


def _check_mode(mode: str) -> None:
    if mode not in GTMEAN_MODES:
        raise ValueError(f"GT-mean metric: unknown mode {mode!r}; expected one of {GTMEAN_MODES}.")


def gray_mean(img: np.ndarray, mode: str = "bt601") -> float:
    """Mean gray level of an (H,W,3) **BGR** float image in [0,1].

    ``'bt601'``: mean of 0.299 R + 0.587 G + 0.114 B in float64. ``'official'``: the official code's
    ``cv2.cvtColor(rgb.astype(float32), COLOR_BGR2GRAY).mean()`` (float32; effective 0.114 R + 0.587 G + 0.299 B).
    """
    _check_mode(mode)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"GT-mean metric: expected an (H, W, 3) image, got shape {img.shape}.")
    if mode == "official":
        rgb = np.ascontiguousarray(img[..., ::-1]).astype(np.float32)
        return cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY).mean()  # np.float32, kept for the float32 scale
    return float((img.astype(np.float64) @ _BT601_BGR).mean())


def gt_mean_adjust(output: np.ndarray, gt: np.ndarray, mode: str = "bt601") -> tuple[np.ndarray, float]:
    """Scale ``output`` so that its gray mean equals the GT's (the one shared GT-mean helper).

    Args:
        output: (H,W,3) BGR float output; clipped to [0, 1] first (the official scripts clamp the network output).
        gt: (H,W,3) BGR float ground truth in [0, 1].
        mode: ``'bt601'`` or ``'official'`` (see module docstring).

    Returns:
        (adjusted, scale): ``clip(clip(output, 0, 1) * scale, 0, 1)`` as float64 (H,W,3), and the scale
        ``gray_mean(gt) / gray_mean(output)``. An all-black output (gray mean 0) is returned unscaled, scale 1.
    """
    if output.shape != gt.shape:
        raise ValueError(f"GT-mean metric: output shape {output.shape} differs from GT shape {gt.shape}.")
    r = np.clip(output.astype(np.float64), 0.0, 1.0)
    m_r, m_t = gray_mean(r, mode), gray_mean(gt, mode)
    if m_r <= 0:
        return r, 1.0
    scale = m_t / m_r  # float32 / float32 in 'official' mode, as in the official script
    return np.clip(r * scale, 0.0, 1.0), float(scale)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0,1] float -> uint8 with round-half-to-even (``skimage.img_as_ubyte`` semantics)."""
    return np.rint(np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def _float01(img_u8: np.ndarray, img_float: np.ndarray | None, input_order: str) -> np.ndarray:
    """HWC float64 in [0,1]: ``img_float`` if given, else ``img_u8 / 255``."""
    if img_float is not None:
        return reorder_image(np.asarray(img_float), input_order=input_order).astype(np.float64)
    img_u8 = reorder_image(np.asarray(img_u8), input_order=input_order)
    if img_u8.dtype != np.uint8:
        raise TypeError(
            f"GT-mean metric: 'img'/'img2' must be uint8 in [0, 255] (got {img_u8.dtype}); "
            "pass float [0,1] arrays as 'img_float'/'img2_float'."
        )
    return img_u8.astype(np.float64) / 255.0


def _adjusted_pair(img, img2, img_float, img2_float, crop_border, input_order, mode, test_y_channel):
    """GT-mean adjusted output and GT as HWC float64 BGR, cropped by ``crop_border`` after the adjustment."""
    if test_y_channel:
        raise ValueError("GT-mean metric: test_y_channel is not supported (the protocol is defined on RGB).")
    if input_order not in ("HWC", "CHW"):
        raise ValueError(f"GT-mean metric: wrong input_order {input_order!r}; expected 'HWC' or 'CHW'.")
    out, gt = _float01(img, img_float, input_order), _float01(img2, img2_float, input_order)
    adjusted, _ = gt_mean_adjust(out, gt, mode)
    if crop_border:
        adjusted = adjusted[crop_border:-crop_border, crop_border:-crop_border]
        gt = gt[crop_border:-crop_border, crop_border:-crop_border]
    return adjusted, gt


def _gt_mean_metric(score: Callable[..., float]) -> Callable[..., float]:
    """Register ``score(adjusted, gt, **options)`` as a BasicSR metric of the GT-mean protocol.

    The metric takes BasicSR's arguments: ``img``/``img2`` output / GT uint8 BGR, optional float BGR [0, 1]
    versions ``img_float``/``img2_float``, ``crop_border`` (applied after the adjustment), ``input_order``,
    ``mode`` of :func:`gt_mean_adjust`; ``score`` gets the adjusted output and GT as HWC float64 BGR.
    """

    @functools.wraps(score)
    def metric(
        img: np.ndarray,
        img2: np.ndarray,
        crop_border: int = 0,
        input_order: str = "HWC",
        mode: str = "bt601",
        img_float: np.ndarray | None = None,
        img2_float: np.ndarray | None = None,
        test_y_channel: bool = False,
        **kwargs,
    ) -> float:
        adjusted, gt = _adjusted_pair(img, img2, img_float, img2_float, crop_border, input_order, mode, test_y_channel)
        return score(adjusted, gt, **kwargs)

    return METRIC_REGISTRY.register()(metric)


@_gt_mean_metric
def calculate_psnr_gtmean(adjusted: np.ndarray, gt: np.ndarray, **kwargs) -> float:
    """GT-mean PSNR in dB: ``10 log10(1 / mean((gt - r')^2))`` on float data, all 3 channels; ``inf`` if equal."""
    mse = np.mean((gt - adjusted) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


@_gt_mean_metric
def calculate_ssim_gtmean(adjusted: np.ndarray, gt: np.ndarray, **kwargs) -> float:
    """GT-mean SSIM: BasicSR's MATLAB-style per-channel SSIM on ``rint(255 r')`` vs ``rint(255 gt)`` (uint8)."""
    return float(calculate_ssim(to_uint8(adjusted), to_uint8(gt), crop_border=0))


def get_lpips_net(alexnet_weights: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The per-process cached LPIPS-Alex net (see :func:`glare_nat_models.pretrained.build_lpips_alex`).

    ``alexnet_weights``: local torchvision AlexNet file, ``'random'`` or ``None`` (env ``GLARE_NAT_ALEXNET``, then
    ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``). Raises FileNotFoundError when nothing is found.
    """
    path = resolve_weights(alexnet_weights, "GLARE_NAT_ALEXNET", ALEXNET_FILE, "LPIPS (AlexNet)")
    key = (str(path.resolve()) if path is not None else "random", str(torch.device(device)))
    if key not in _LPIPS_CACHE:
        _LPIPS_CACHE[key] = build_lpips_alex(path).to(device)
    return _LPIPS_CACHE[key]


@torch.no_grad()
def lpips_distance(img_rgb: np.ndarray, img2_rgb: np.ndarray, net: torch.nn.Module) -> float:
    """LPIPS between two (H,W,3) **RGB** uint8 images, mapped to [-1,1] by ``x / 127.5 - 1`` (official)."""
    if img_rgb.shape != img2_rgb.shape or img_rgb.ndim != 3 or img_rgb.shape[2] != 3:
        raise ValueError(f"LPIPS: expected two (H, W, 3) images of equal shape, got {img_rgb.shape}, {img2_rgb.shape}.")
    device = next(net.parameters()).device

    def _t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float()[None].to(device) / 127.5 - 1

    return float(net(_t(img_rgb), _t(img2_rgb)).item())


def _uint8_bgr(img: np.ndarray, input_order: str, crop_border: int) -> np.ndarray:
    img = reorder_image(np.asarray(img), input_order=input_order)
    if img.dtype != np.uint8:
        raise TypeError(f"LPIPS metric: expected uint8 images, got {img.dtype}.")
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border]
    return img


@METRIC_REGISTRY.register()
def calculate_lpips(
    img: np.ndarray,
    img2: np.ndarray,
    crop_border: int = 0,
    input_order: str = "HWC",
    alexnet_weights: str | None = None,
    device: str = "cpu",
    **kwargs,
) -> float:
    """AlexNet LPIPS v0.1 between uint8 BGR output ``img`` and GT ``img2`` (lower is better; 0 for equal images).

    Options: ``alexnet_weights`` (local torchvision AlexNet file; see :func:`get_lpips_net`), ``device``.
    """
    net = get_lpips_net(alexnet_weights, device)
    a, b = _uint8_bgr(img, input_order, crop_border), _uint8_bgr(img2, input_order, crop_border)
    return lpips_distance(a[..., ::-1], b[..., ::-1], net)


@_gt_mean_metric
def calculate_lpips_gtmean(
    adjusted: np.ndarray, gt: np.ndarray, alexnet_weights: str | None = None, device: str = "cpu", **kwargs
) -> float:
    """LPIPS on the GT-mean adjusted output, as the official GLARE scripts report it (``rint(255 r')`` vs GT).

    Options: ``alexnet_weights``, ``device`` as :func:`calculate_lpips`.
    """
    net = get_lpips_net(alexnet_weights, device)
    return lpips_distance(to_uint8(adjusted)[..., ::-1], to_uint8(gt)[..., ::-1], net)
