"""Paired augmentations on ``(H, W, C)`` float32 arrays, and input checks with clear errors.

Randomness comes from Python's ``random`` module by default, the generator BasicSR seeds
(``set_random_seed`` in the main process, ``worker_init_fn`` in loader workers); pass a
``random.Random`` to make a call reproducible on its own.

GLARE's Stage-II "random resize, then crop" (official ``LoL_Dataset_RIDCP`` with ``use_resize_crop``):
with short side ``S`` and crop ``P``, draw an integer ``T`` in ``[P, S]``, resize both images bicubically
by ``T / S`` (short side becomes ``T``), then take the paired ``P x P`` crop. :func:`random_resize_short_side`
generalises the range to ``[lo, hi]`` (defaults ``lo = P``, ``hi = S``). Where ``S < lo`` the official
code upscales to ``P + 1``; here the short side becomes ``lo`` (the same purpose: make the crop fit).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "check_crop_fits",
    "check_same_size",
    "draw_short_side",
    "img_to_tensor",
    "paired_random_crop",
    "random_flips",
    "random_resize_short_side",
    "random_resize_pair_8bit_lq",
    "resize_short_side",
]

_Rng = random.Random  # the ``random`` module has the same interface


def check_same_size(lq: np.ndarray, gt: np.ndarray, lq_path: object, gt_path: object) -> None:
    """Raise ``ValueError`` naming both files and both sizes unless ``lq`` and ``gt`` have the same H, W."""
    if lq.shape[:2] != gt.shape[:2]:
        raise ValueError(
            f"pair size mismatch: low-light '{lq_path}' is {lq.shape[1]}x{lq.shape[0]} (WxH) but "
            f"ground truth '{gt_path}' is {gt.shape[1]}x{gt.shape[0]}"
        )


def check_crop_fits(img: np.ndarray, size: int, path: object) -> None:
    """Raise ``ValueError`` naming the file if ``img`` (H, W, C) is smaller than a ``size`` x ``size`` crop."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image '{path}' is {w}x{h} (WxH), smaller than the training crop gt_size={size}")


def draw_short_side(short: int, lo: int, hi: int | None = None, rng: _Rng | None = None) -> int:
    """Target short side for the random resize: uniform integer in ``[lo, min(hi, short)]``, at least ``lo``.

    ``hi=None`` means the image's own short side (GLARE). If ``short <= lo`` the result is ``lo``.
    """
    rng = rng or random
    top = short if hi is None else min(hi, short)
    return lo if top <= lo else rng.randint(lo, top)


def resize_short_side(imgs: Sequence[np.ndarray], target: int) -> list[np.ndarray]:
    """Resize every ``(H, W, C)`` image bicubically so its short side is ``target`` (aspect kept).

    All images must share H, W (a pair). Values are not clipped (bicubic may overshoot [0, 1] slightly,
    as in the official code, where the float GT is not re-clamped).
    """
    h, w = imgs[0].shape[:2]
    short = min(h, w)
    if target == short:
        return list(imgs)
    factor = target / short
    size = (max(target, round(w * factor)), max(target, round(h * factor)))  # cv2 wants (W, H)
    out = []
    for img in imgs:
        res = cv2.resize(img, size, interpolation=cv2.INTER_CUBIC)
        out.append(res[:, :, None] if res.ndim == 2 else res)
    return out


def random_resize_short_side(
    imgs: Sequence[np.ndarray], lo: int, hi: int | None = None, rng: _Rng | None = None
) -> list[np.ndarray]:
    """GLARE's random resize: short side drawn by :func:`draw_short_side`, then bicubic resize of all images."""
    short = min(imgs[0].shape[:2])
    return resize_short_side(imgs, draw_short_side(short, lo, hi, rng))


def random_resize_pair_8bit_lq(
    lq: np.ndarray, gt: np.ndarray, lo: int, hi: int | None = None, rng: _Rng | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """GLARE's random resize of a training pair, as the official data loader does it.

    The low-light image is resized as 8-bit (OpenCV's bicubic on uint8 rounds and saturates), so it stays on the
    ``k / 255`` grid a camera produces: a float resize would give dark pixels values between the 8-bit steps,
    which the log transform of the encoder input amplifies. The GT is resized in float and not clipped.
    ``lq``, ``gt``: (H, W, C) float32 in [0, 1] (an 8-bit source round-trips exactly); returns float32 arrays.
    """
    target = draw_short_side(min(lq.shape[:2]), lo, hi, rng)
    lq8 = (np.clip(lq, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    (lq8,) = resize_short_side([lq8], target)
    (gt,) = resize_short_side([gt], target)
    return lq8.astype(np.float32) / 255.0, gt


def paired_random_crop(imgs: Sequence[np.ndarray], size: int, rng: _Rng | None = None) -> list[np.ndarray]:
    """Crop the same random ``size`` x ``size`` window from every ``(H, W, C)`` image (all of equal H, W).

    Call :func:`check_crop_fits` first for an error that names the file.
    """
    rng = rng or random
    h, w = imgs[0].shape[:2]
    if h < size or w < size:
        raise ValueError(f"crop {size}x{size} does not fit an image of {w}x{h} (WxH)")
    top = rng.randint(0, h - size)
    left = rng.randint(0, w - size)
    return [img[top : top + size, left : left + size] for img in imgs]


def random_flips(
    imgs: Sequence[np.ndarray],
    hflip: bool = True,
    vflip: bool = False,
    rot90: bool = False,
    rng: _Rng | None = None,
) -> list[np.ndarray]:
    """Apply the same random flips to every image (BasicSR ``augment`` semantics).

    Each enabled operation happens with probability 0.5: horizontal flip, vertical flip, and a
    transpose of H and W (``rot90``; with both flips it yields all 8 dihedral variants, as BasicSR's
    ``use_rot``). Returns views; :func:`img_to_tensor` makes them contiguous.
    """
    rng = rng or random
    do_h = hflip and rng.random() < 0.5
    do_v = vflip and rng.random() < 0.5
    do_t = rot90 and rng.random() < 0.5
    out = []
    for img in imgs:
        if do_h:
            img = img[:, ::-1]
        if do_v:
            img = img[::-1]
        if do_t:
            img = img.transpose(1, 0, 2)
        out.append(img)
    return out


def img_to_tensor(img: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` float array -> contiguous ``(C, H, W)`` float32 tensor (no copy of channel order)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
