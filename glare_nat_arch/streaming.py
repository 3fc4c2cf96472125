"""Row-streamed inference of large resolution levels: the same math in a fraction of the memory (results equal up
to float rounding, see below).

What is guaranteed: the same computation up to float rounding (a strip may run another convolution kernel than
the whole map), hence outputs within float tolerance of the plain path and, wherever a latent is not within that
tolerance of a tie, the same codes.

At inference the full-resolution levels of GLARE's encoder and decoders hold most of the memory: a level's
256-channel upsampled input, its GroupNorm output and its convolution outputs are whole maps (117-234 MiB each at
600x400), and oneDNN adds scratch of about the same size to every large convolution. This module runs such a level
strip by strip (``rows`` output rows at a time) and keeps only what the math needs whole:

- GroupNorm needs whole-image statistics, so they are taken first (one reduction pass over the input), then the
  normalisation, the activation and the next 3x3 convolution run per strip on a window with a one-row halo
  (zero rows at the image borders, as the convolution's padding): the normalised map is never whole.
- A :class:`~glare_nat_arch.blocks.Upsample` (nearest x2, 3x3 conv) feeding a streamed level is never materialised
  either: :class:`UpsampleRows` computes the rows each strip asks for from the half-resolution map (twice: once
  for the GroupNorm statistics, once for the block; cheaper in memory than the 2C-channel full-resolution map).
- A :class:`~glare_nat_arch.blocks.ResnetBlock` keeps two whole maps (its output and ``conv1``'s output), and
  adds ``conv2``'s strips to the output in place: the shortcut (identity, or the 1x1 ``nin_shortcut`` computed from
  the same strips) is the accumulator.

Users: :class:`~glare_nat_arch.blocks.Encoder` / :class:`~glare_nat_arch.blocks.Decoder` (levels, heads,
``conv_in``), :meth:`~glare_nat_arch.aft.WarpBlock.forward_streamed` (the fusion's offsets and deformable sampling
per strip) and :meth:`~glare_nat_arch.glare_arch.GLAREFlowNet.defers_finest` (the schedule that recomputes the
finest skip instead of keeping it). Results equal the whole-map computation up to float rounding
(``tests/test_streaming.py``): feature maps within a relative 1e-5 in float32, and the same VQ codes downstream
wherever two codes are not within that rounding of a tie (a near-tie may go either way). Streaming applies only
without autograd, in eval mode, without autocast and on CPU, to levels without attention whose maps exceed
``min_mb`` (:class:`RowStreaming`); everything else runs the plain modules. The loops here run over strips of rows
and the blocks of a level, never over pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RowStreaming",
    "row_strips",
    "TensorRows",
    "UpsampleRows",
    "group_norm_affine",
    "norm_act_window",
    "conv_rows",
    "rows_with_halo",
    "stream_resblock",
    "stream_level",
    "stream_norm_act_conv",
    "stream_conv",
    "set_row_streaming",
]


@dataclass(frozen=True)
class RowStreaming:
    """When and how to stream: levels whose largest map (input or output) exceeds ``min_mb`` MiB run ``rows``
    output rows at a time. Only at inference (no autograd, eval mode, no autocast) and on CPU."""

    min_mb: float = 64.0
    rows: int = 16

    def __post_init__(self) -> None:
        if self.rows < 1 or self.min_mb < 0:
            raise ValueError(f"RowStreaming: rows must be >= 1 and min_mb >= 0, got rows={self.rows}, {self.min_mb}")

    def applies(self, shape: Sequence[int], ref: Tensor, training: bool) -> bool:
        """Whether a map of ``shape`` (B, C, H, W) with ``ref``'s dtype and device is streamed now."""
        if training or torch.is_grad_enabled() or ref.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return False
        b, c, h, w = shape
        return b * c * h * w * ref.element_size() > self.min_mb * 2**20


def row_strips(height: int, rows: int) -> list[tuple[int, int]]:
    """``[(r0, r1), ...]`` covering ``range(height)`` in strips of ``rows`` rows (the last one may be shorter)."""
    return [(r, min(r + rows, height)) for r in range(0, height, rows)]


class TensorRows:
    """A whole map (B, C, H, W) as a row source. ``owned=True``: the caller hands the tensor over, so a block may
    accumulate its output into it in place (:meth:`take`)."""

    def __init__(self, x: Tensor, owned: bool = False):
        self.x: Tensor | None = x
        self.owned = owned
        self.shape = tuple(x.shape)
        self.whole = x.is_contiguous()  # statistics in one reduction over the stored map (else per strip)

    @property
    def ref(self) -> Tensor:
        assert self.x is not None, "row source already released"
        return self.x

    def rows(self, a: int, b: int) -> Tensor:
        """Rows ``[a, b)``: (B, C, b - a, W), a view."""
        return self.ref[:, :, a:b]

    def take(self) -> Tensor:
        """The map itself, to become a block's output: the tensor when owned, else a copy (the caller's is kept)."""
        x = self.ref if self.owned else self.ref.clone()
        self.x = None
        return x

    def release(self) -> None:
        self.x = None


class UpsampleRows:
    """The output of ``upsample`` (:class:`~glare_nat_arch.blocks.Upsample`: nearest x2, then a 3x3 conv) on ``x``
    (B, C, H, W), computed for the rows asked for: (B, C, 2H, 2W) without ever holding it whole."""

    def __init__(self, upsample: nn.Module, x: Tensor):
        self.conv: nn.Conv2d = upsample.conv
        self.x: Tensor | None = x
        b, c, h, w = x.shape
        self.shape = (b, self.conv.out_channels, 2 * h, 2 * w)
        self.whole = False

    @property
    def ref(self) -> Tensor:
        assert self.x is not None, "row source already released"
        return self.x

    def rows(self, a: int, b: int) -> Tensor:
        """Rows ``[a, b)`` of the upsampled, convolved map: (B, C_out, b - a, 2W)."""
        x, height = self.ref, self.shape[2]
        lo, hi = max(a - 1, 0), min(b + 1, height)  # rows of the nearest-upsampled map under the 3x3 window
        src = x[:, :, lo // 2 : (hi - 1) // 2 + 1]
        up = F.interpolate(src, scale_factor=2.0, mode="nearest")[:, :, lo % 2 : lo % 2 + hi - lo]
        if lo > a - 1 or hi < b + 1:  # image border: the convolution's zero padding
            up = F.pad(up, (0, 0, lo - (a - 1), b + 1 - hi))
        return F.conv2d(up, self.conv.weight, self.conv.bias, padding=(0, 1))

    def take(self) -> Tensor:
        out = self.rows(0, self.shape[2])
        self.x = None
        return out

    def release(self) -> None:
        self.x = None


RowSource = TensorRows | UpsampleRows


def group_norm_affine(norm: nn.GroupNorm, src: RowSource, strips: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)``, each (B, C, 1, 1), with ``norm(x) = x * scale + shift`` for the whole map.

    Statistics are over each (sample, group) of the whole map, as ``nn.GroupNorm``: one reduction of a stored map,
    or per strip combined exactly in float64 (Chan et al.'s parallel mean/variance) for a computed source.
    """
    b, c = src.shape[:2]
    g = norm.num_groups
    if src.whole:
        var, mean = torch.var_mean(src.ref.reshape(b, g, -1), dim=-1, correction=0)
        mean, var = mean.double(), var.double()
    else:
        count = torch.zeros((), dtype=torch.float64)
        mean = var = None
        for a, z in strips:
            v_k, m_k = torch.var_mean(src.rows(a, z).reshape(b, g, -1), dim=-1, correction=0)
            n_k = float((z - a) * src.shape[3] * (c // g))
            if mean is None:
                count, mean, var = count + n_k, m_k.double(), v_k.double()
                continue
            m_k, v_k = m_k.double(), v_k.double()
            total = count + n_k
            delta = m_k - mean
            var = (var * count + v_k * n_k + delta * delta * count * n_k / total) / total
            mean = mean + delta * n_k / total
            count = total
    rstd = torch.rsqrt(var + norm.eps)  # (B, G)
    gamma = norm.weight.double().view(1, g, c // g)
    beta = norm.bias.double().view(1, g, c // g)
    scale = rstd[:, :, None] * gamma
    shift = beta - mean[:, :, None] * scale
    dtype = src.ref.dtype
    return scale.reshape(b, c, 1, 1).to(dtype), shift.reshape(b, c, 1, 1).to(dtype)


def norm_act_window(
    src: RowSource, r0: int, r1: int, scale: Tensor, shift: Tensor, halo: int = 1
) -> tuple[Tensor, Tensor, int]:
    """``swish(x * scale + shift)`` on rows ``[r0 - halo, r1 + halo)``, zero rows outside the image (the next
    convolution's padding). Returns the window (B, C, r1 - r0 + 2 halo, W), the raw rows read and their first row."""
    height = src.shape[2]
    lo, hi = max(r0 - halo, 0), min(r1 + halo, height)
    x = src.rows(lo, hi)
    pt, pb = lo - (r0 - halo), (r1 + halo) - hi
    b, c, n, w = x.shape
    buf = x.new_empty(b, c, pt + n + pb, w)
    inner = buf[:, :, pt : pt + n]
    torch.addcmul(shift, x, scale, out=inner)
    F.silu(inner, inplace=True)
    buf[:, :, :pt].zero_()
    buf[:, :, pt + n :].zero_()
    return buf, x, lo


def conv_rows(conv: nn.Conv2d, window: Tensor) -> Tensor:
    """A 3x3 (stride 1, padding 1) ``conv`` on a window with its row halo already in place: (B, C_in, n + 2, W)
    -> (B, C_out, n, W)."""
    return F.conv2d(window, conv.weight, conv.bias, padding=(0, conv.padding[1]))


def rows_with_halo(x: Tensor, a: int, b: int, halo: int = 1) -> Tensor:
    """Rows ``[a - halo, b + halo)`` of ``x`` (B, C, H, W), with zero rows outside the image (a 3x3 convolution's
    padding): (B, C, b - a + 2 halo, W)."""
    height = x.shape[2]
    lo, hi = max(a - halo, 0), min(b + halo, height)
    rows = x[:, :, lo:hi]
    if lo == a - halo and hi == b + halo:
        return rows
    return F.pad(rows, (0, 0, lo - (a - halo), b + halo - hi))


def stream_resblock(
    block: nn.Module, src: RowSource, strips: Sequence[tuple[int, int]], work: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A :class:`~glare_nat_arch.blocks.ResnetBlock` (eval, dropout off) on ``src`` (B, C_in, H, W), strip by strip.

    Returns ``(out (B, C_out, H, W), work)``: ``work`` holds ``conv1``'s output and may be passed to the next block
    of the same width (one allocation per level). ``src`` is released once read.
    """
    b, _, height, width = src.shape
    c_out = block.out_channels
    if work is None or tuple(work.shape) != (b, c_out, height, width):
        work = src.ref.new_empty(b, c_out, height, width)
    nin = getattr(block, "nin_shortcut", None) if block.in_channels != c_out else None
    out = src.ref.new_empty(b, c_out, height, width) if nin is not None else None
    scale, shift = group_norm_affine(block.norm1, src, strips)
    for r0, r1 in strips:
        window, raw, lo = norm_act_window(src, r0, r1, scale, shift)
        if out is not None:
            out[:, :, r0:r1] = F.conv2d(raw[:, :, r0 - lo : r1 - lo], nin.weight, nin.bias)
        work[:, :, r0:r1] = conv_rows(block.conv1, window)
        del window, raw
    if out is None:
        out = src.take()  # identity shortcut: conv2's strips are added to the input itself
    src.release()
    hidden = TensorRows(work)
    scale, shift = group_norm_affine(block.norm2, hidden, strips)
    for r0, r1 in strips:
        window, _, _ = norm_act_window(hidden, r0, r1, scale, shift)
        out[:, :, r0:r1] += conv_rows(block.conv2, window)
        del window
    return out, work


def stream_level(blocks: Sequence[nn.Module], src: RowSource, rows: int) -> Tensor:
    """The ResnetBlocks of one level (no attention) on ``src``, streamed: (B, C_in, H, W) -> (B, C_out, H, W)."""
    strips = row_strips(src.shape[2], rows)
    work = None
    for block in blocks:
        h, work = stream_resblock(block, src, strips, work)
        src = TensorRows(h, owned=True)
        del h
    del work
    return src.take()


def stream_norm_act_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, rows: int) -> Tensor:
    """``conv(swish(norm(x)))`` for a 3x3 ``conv`` (a decoder's output head), streamed: (B, C, H, W) ->
    (B, C_out, H, W) without the whole normalised map."""
    src = TensorRows(x)
    strips = row_strips(x.shape[2], rows)
    scale, shift = group_norm_affine(norm, src, strips)
    b, _, height, width = x.shape
    out = x.new_empty(b, conv.out_channels, height, width)
    for r0, r1 in strips:
        window, _, _ = norm_act_window(src, r0, r1, scale, shift)
        out[:, :, r0:r1] = conv_rows(conv, window)
    return out


def stream_conv(conv: nn.Conv2d, x: Tensor, rows: int) -> Tensor:
    """A 3x3 ``conv`` (stride 1, padding 1) of ``x`` (B, C, H, W), ``rows`` output rows at a time: (B, C_out, H, W).
    For a large output from few input channels (an encoder's ``conv_in``), whose whole-map kernel needs scratch
    the size of its output."""
    b, _, height, width = x.shape
    out = x.new_empty(b, conv.out_channels, height, width)
    for r0, r1 in row_strips(height, rows):
        out[:, :, r0:r1] = conv_rows(conv, rows_with_halo(x, r0, r1))
    return out


def set_row_streaming(module: nn.Module, config: RowStreaming | None) -> None:
    """Set (or with None switch off) row streaming on every encoder / decoder inside ``module``."""
    from glare_nat_arch.blocks import Decoder, Encoder  # blocks imports this module

    for m in module.modules():
        if isinstance(m, Encoder | Decoder):
            m.row_streaming = config
