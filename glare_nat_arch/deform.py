"""Memory-lean modulated deformable convolution (DCNv2) with BasicSR ``DCNv2Pack``'s parameters and numerics.

``torchvision.ops.deform_conv2d`` (what ``DCNv2Pack`` calls) first builds an im2col buffer of
``kh * kw * C_in * H_out * W_out`` values and then runs one GEMM. For GLARE's AFT warp at full resolution
(``C = 128``) that buffer is 1.1 GB at 600x400 and 9.5 GB at 1080p: the peak memory of the whole network.

:func:`modulated_deform_conv2d` computes the same sum tap by tap::

    out[o, y, x] = bias[o] + sum_{t = (i, j)} sum_c W[o, c, i, j] * mask[g(c), t, y, x]
                                              * bilinear(x_in[c], y*s - p + i*d + dy[g(c), t, y, x],
                                                                  x*s - p + j*d + dx[g(c), t, y, x])

one ``grid_sample`` (bilinear, zeros outside, the same interpolation as the DCN kernels) and one 1x1 convolution
per tap, so it never holds more than one ``C_in x H_out x W_out`` sample besides the output. Offsets and masks use
torchvision's layout: ``offset`` channel ``2 * (g * kh * kw + t) + {0: dy, 1: dx}``, ``mask`` channel
``g * kh * kw + t``. It is differentiable in all inputs (training works), and equal to ``deform_conv2d`` up to
float rounding (``tests/test_deform.py``).

:class:`LeanDCNv2Pack` is a drop-in ``DCNv2Pack`` (same state-dict keys, same offset/mask head) that picks the
implementation per call: ``impl='im2col'`` always runs BasicSR's ``DCNv2Pack.forward`` (torchvision's CPU/CUDA kernel
or BasicSR's compiled op); ``'tapwise'`` always runs :func:`modulated_deform_conv2d`; ``'auto'`` (default) runs
the tap-wise path only without autograd (inference) and only when the im2col buffer would exceed
``im2col_budget_mb``, so training keeps the official kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from basicsr.archs.arch_util import DCNv2Pack
from basicsr.utils import get_root_logger
from torch import Tensor

__all__ = ["DCN_IMPLS", "modulated_deform_conv2d", "im2col_bytes", "LeanDCNv2Pack"]

#: Accepted values of ``impl`` / the ``dcn_impl`` arch option.
DCN_IMPLS = ("auto", "im2col", "tapwise")

#: Offset magnitude above which BasicSR's ``DCNv2Pack`` warns (training diverging).
_OFFSET_WARN = 50.0


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Modulated deformable conv, one kernel tap at a time (see the module docstring).

    Args:
        x: ``B x C_in x H x W``.
        offset: ``B x 2*G*kh*kw x H_out x W_out`` (torchvision layout; ``G`` deformable groups, ``C_in % G == 0``).
        mask: ``B x G*kh*kw x H_out x W_out`` modulation (already sigmoid-ed).
        weight: ``C_out x C_in x kh x kw`` (convolution groups = 1); bias: ``C_out`` or None.

    Returns:
        ``B x C_out x H_out x W_out``; ``H_out = (H + 2 p_h - d_h (kh - 1) - 1) // s_h + 1`` (same for W).
    """
    b, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c_in != c:
        raise ValueError(f"modulated_deform_conv2d: weight expects {c_in} input channels (groups=1), input has {c}")
    taps = kh * kw
    if offset.shape[1] % (2 * taps) or mask.shape[1] * 2 != offset.shape[1]:
        raise ValueError(
            f"modulated_deform_conv2d: offset/mask channels {offset.shape[1]}/{mask.shape[1]} do not fit a "
            f"{kh}x{kw} kernel (need 2*G*{taps} and G*{taps})"
        )
    groups = offset.shape[1] // (2 * taps)
    if c % groups:
        raise ValueError(f"modulated_deform_conv2d: {c} input channels not divisible by {groups} deformable groups")
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if tuple(offset.shape[-2:]) != (ho, wo) or tuple(mask.shape[-2:]) != (ho, wo) or offset.shape[0] != b:
        raise ValueError(
            f"modulated_deform_conv2d: offset {tuple(offset.shape)} / mask {tuple(mask.shape)} must be "
            f"B={b} x . x {ho} x {wo} for input {tuple(x.shape)}"
        )
    # Sampling runs in float32 (float64 for float64 input): reduced-precision pixel coordinates would be off by up
    # to half a pixel at 1080p. The 1x1 convolutions run in the weight's dtype (or autocast's).
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    offset = offset.to(dtype).reshape(b, groups, taps, 2, ho, wo)
    mask = mask.to(dtype).reshape(b * groups, taps, 1, ho, wo)
    x_groups = x.reshape(b * groups, c // groups, h, w).to(dtype)
    base_y = (torch.arange(ho, device=x.device, dtype=dtype) * sh - ph)[:, None]  # R x 1
    base_x = torch.arange(wo, device=x.device, dtype=dtype) * sw - pw  # W_out
    grad = torch.is_grad_enabled() and (x.requires_grad or offset.requires_grad or mask.requires_grad)
    device_type = x.device.type
    cdtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    n = ho * wo
    # out (B x C_out x N) += W_t (C_out x C_in) @ sample_t (B x C_in x N), in place: no per-tap output temporary
    out = (
        weight.new_zeros(b, c_out, n, dtype=cdtype) if bias is None else bias.to(cdtype)[None, :, None].repeat(b, 1, n)
    )
    for t in range(taps):
        i, j = divmod(t, kw)
        py = base_y + i * dh + offset[:, :, t, 0]  # B x G x H_out x W_out, input pixel coordinates
        px = base_x + j * dw + offset[:, :, t, 1]
        # pixel -> normalised coordinates for align_corners=False: u = (2 p + 1) / size - 1
        grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1).reshape(b * groups, ho, wo, 2)
        del py, px
        sample = F.grid_sample(x_groups, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        del grid
        sample = sample * mask[:, t] if grad else sample.mul_(mask[:, t])
        sample = sample.reshape(b, c, n).to(cdtype)
        w_t = weight[:, :, i, j].to(cdtype)
        out = out.baddbmm(w_t.expand(b, -1, -1), sample) if grad else out.baddbmm_(w_t.expand(b, -1, -1), sample)
        del sample
    return out.reshape(b, c_out, ho, wo)


def im2col_bytes(x: Tensor, kernel_size: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Bytes of the im2col buffer ``deform_conv2d`` would allocate for ``x`` (``B x C x H x W``)."""
    return x.shape[0] * x.shape[1] * kernel_size[0] * kernel_size[1] * out_hw[0] * out_hw[1] * x.element_size()


class LeanDCNv2Pack(DCNv2Pack):
    """BasicSR ``DCNv2Pack`` (``forward(x, feat)``: offsets and masks from ``feat``) with a memory-lean path.

    Args: those of ``DCNv2Pack``, plus ``impl`` (``auto`` | ``im2col`` | ``tapwise``, see the module docstring) and
    ``im2col_budget_mb``: ``auto`` switches to the tap-wise path when the im2col buffer would be larger.
    State-dict keys are ``DCNv2Pack``'s (``weight``, ``bias``, ``conv_offset.*``).
    """

    def __init__(self, *args, impl: str = "auto", im2col_budget_mb: float = 256.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if impl not in DCN_IMPLS:
            raise ValueError(f"LeanDCNv2Pack: impl must be one of {DCN_IMPLS}, got {impl!r}")
        if self.groups != 1:
            raise ValueError(f"LeanDCNv2Pack: convolution groups must be 1, got {self.groups}")
        self.impl = impl
        self.im2col_budget_mb = float(im2col_budget_mb)

    def uses_tapwise(self, x: Tensor) -> bool:
        """Whether :meth:`forward` takes the tap-wise path for input ``x`` (``B x C x H x W``)."""
        if self.impl != "auto":
            return self.impl == "tapwise"
        if torch.is_grad_enabled():
            return False
        (sh, sw), (ph, pw), (dh, dw) = _pair(self.stride), _pair(self.padding), _pair(self.dilation)
        kh, kw = _pair(self.kernel_size)
        h, w = x.shape[-2:]
        out_hw = ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)
        return im2col_bytes(x, (kh, kw), out_hw) > self.im2col_budget_mb * 2**20

    def forward(self, x: Tensor, feat: Tensor) -> Tensor:
        """``x`` (``B x C_in x H x W``) warped with offsets/masks from ``feat`` -> ``B x C_out x H_out x W_out``."""
        if not self.uses_tapwise(x):
            return super().forward(x, feat)
        return self.deform(x, self.conv_offset(feat))

    def deform(self, x: Tensor, out: Tensor) -> Tensor:
        """The tap-wise DCN of ``x`` given ``out = conv_offset(feat)`` (``B x 3*G*kh*kw x H_out x W_out``: the two
        offset halves then the mask logits, BasicSR's layout), with DCNv2Pack's warning when the mean offset
        magnitude exceeds 50 (training diverging)."""
        n_off = out.shape[1] * 2 // 3
        offset, mask = out[:, :n_off], torch.sigmoid(out[:, n_off:])  # offset = cat(o1, o2) of DCNv2Pack, no copy
        offset_absmean = offset.abs().mean()
        if offset_absmean > _OFFSET_WARN:
            get_root_logger().warning(f"Offset abs mean is {offset_absmean}, larger than {_OFFSET_WARN:g}.")
        return modulated_deform_conv2d(
            x, offset, mask, self.weight, self.bias, self.stride, self.padding, self.dilation
        )
