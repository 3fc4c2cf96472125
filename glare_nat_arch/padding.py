"""Padding to a multiple of a network's stride: one function for images, latents and token grids."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["pad_to_multiple"]


def pad_to_multiple(
    x: Tensor, multiple: int, mode: str = "reflect", border: tuple[int, int] = (0, 0)
) -> tuple[Tensor, tuple[int, int]]:
    """The one padding of an image before a network: (B, C, H, W) -> (B, C, H', W') with H', W' multiples of
    ``multiple``, in one ``F.pad``.

    Args:
        x: ``(B, C, H, W)`` tensor.
        multiple: required divisor of the padded H and W (``1`` = only the border).
        mode: ``F.pad`` mode; ``'reflect'`` falls back to ``'replicate'`` when a side is too short to reflect
            (reflection needs pad < size).
        border: ``(bottom, left)`` pixels added first (the official test scripts reflect-pad 20 px at the bottom and
            left, ``val.extra_pad``); the rest of the padding goes to the bottom and right.

    Returns:
        ``(x_pad, (H, W))``: the original image is ``x_pad[..., :H, left : left + W]``.
    """
    if x.dim() != 4:
        raise ValueError(f"pad_to_multiple expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = x.shape[-2:]
    bottom, left = (int(v) for v in border)
    bottom += (-(h + bottom)) % multiple
    right = (-(w + left)) % multiple
    if bottom == 0 and left == 0 and right == 0:
        return x, (h, w)
    if mode == "reflect" and (bottom >= h or max(left, right) >= w):
        mode = "replicate"
    return F.pad(x, (left, right, 0, bottom), mode=mode), (h, w)
