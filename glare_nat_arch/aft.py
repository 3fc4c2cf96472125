"""Stage III of GLARE: Adaptive Feature Transformation (AFT) and the multi-feature decoder ``D_MF``.

Layout and key names follow the official ``MultiScaleDecoder2`` (``deformableDecoder_arch.py``):
the :class:`~glare_nat_arch.blocks.Decoder` backbone (``conv_in, mid, up, norm_out``), ``warp.{0,1}``
(:class:`WarpBlock`), ``mix.{0,1}`` (:class:`Mix`), the output head ``residual_conv`` and the unused
``conv_out``, ``scale``, ``bias``, ``enc`` parameters (see :class:`MultiScaleDecoder`).

Fusion at level ``l`` (after its res-blocks, before its upsample), with skip ``s_l`` from the conditional encoder
and NL-decoder feature ``n_l``::

    h_mix  = sigmoid(w) * s_l + (1 - sigmoid(w)) * h          (Mix, AMB)
    u      = DCNv2(n_l; offsets/mask from offset_conv([n_l, h_mix]))   (WarpBlock)
    h_post = h_mix + u * mean(h_mix) / mean(u)                 (means over the whole batch tensor, official)

Index mapping for three levels: ``mix.0``/``warp.0`` at H/2 (``s1``, ``n1``); ``mix.1``/``warp.1`` at H
(``s0``, ``n0``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from glare_nat_arch.blocks import OFFICIAL_SIZE, Decoder, Normalize, VQGANSize, swish
from glare_nat_arch.deform import LeanDCNv2Pack

__all__ = ["Mix", "WarpBlock", "MultiScaleDecoder"]


class Mix(nn.Module):
    """Adaptive mix-up block: ``sigmoid(w) * a + (1 - sigmoid(w)) * b`` with one learnable scalar ``w`` (key ``w``)."""

    def __init__(self, init: float = -0.8):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """``a``, ``b`` (B, C, H, W) -> (B, C, H, W)."""
        m = torch.sigmoid(self.w).to(a.dtype)
        return a * m + b * (1 - m)


class WarpBlock(nn.Module):
    """Deformable warp of the NL-decoder feature guided by the MF-decoder feature.

    ``offset``: Conv3x3 2C -> C on ``cat([n, h])``; ``dcn``: BasicSR ``DCNv2Pack`` (3x3, 4 deformable groups) applied
    to ``n`` with offsets/masks computed from that feature, as :class:`~glare_nat_arch.deform.LeanDCNv2Pack` (same
    keys; ``dcn_impl`` / ``dcn_im2col_budget_mb`` choose its kernel). Shapes: n, h (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(
        self, channels: int, deformable_groups: int = 4, dcn_impl: str = "auto", dcn_im2col_budget_mb: float = 256.0
    ):
        super().__init__()
        self.offset = nn.Conv2d(2 * channels, channels, 3, 1, 1)
        self.dcn = LeanDCNv2Pack(
            channels,
            channels,
            3,
            padding=1,
            deformable_groups=deformable_groups,
            impl=dcn_impl,
            im2col_budget_mb=dcn_im2col_budget_mb,
        )

    def forward(self, n: Tensor, h: Tensor) -> Tensor:
        """``dcn(n; offsets/masks from offset(cat([n, h])))``: n, h (B, C, H, W) -> (B, C, H, W)."""
        return self.dcn(n, self.offset(torch.cat([n, h], dim=1)))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region without autocast on ``device`` (a no-op context where autocast is off or not defined, e.g. meta)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half-precision tensor (autocast output), else unchanged (float32 / float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class _UnusedResBlock(nn.Module):
    """Parameter container with the official ``enc.{i}`` key layout (norm1, conv1, norm2, conv2, 1x1 conv_out)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = Normalize(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = Normalize(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.conv_out = nn.Conv2d(cin, cout, 1, 1, 0)


def _unused_conv_pair(c: int) -> nn.Sequential:
    """Official ``scale.{i}`` / ``bias.{i}`` layout: conv3x3, LeakyReLU, conv3x3, Sigmoid (keys 0.*, 2.*)."""
    return nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(c, c, 3, 1, 1), nn.Sigmoid())


class MultiScaleDecoder(Decoder):
    """``D_MF``: the decoder backbone with AFT fusion of NL-decoder features and conditional-encoder skips.

    Args: backbone ``size`` (:class:`~glare_nat_arch.blocks.VQGANSize`) and ``out_ch`` as
    :class:`~glare_nat_arch.blocks.Decoder`; ``mix_init`` initial ``w`` per fused
    level, coarse to fine (official -1.0, -0.6); ``per_sample_rescale``: if True the rescale ratio
    mean(h)/mean(u) is taken per sample (over C, H, W; the default: what the official training computed with one
    sample per GPU) instead of over the whole batch tensor (False: the official code on one replica, which couples
    the samples of a batch; the golden tensors' B=2 run); ``deformable_groups`` of the DCNs; ``dcn_impl``
    (``auto`` | ``im2col`` | ``tapwise``) and ``dcn_im2col_budget_mb`` select the DCN kernel
    (:mod:`glare_nat_arch.deform`: ``auto`` keeps BasicSR's kernel for training and switches to the memory-lean
    tap-wise sum at inference on large inputs).

    Unused parameters: the official checkpoint also stores ``conv_out`` (the backbone's RGB head), ``scale.{0,1}``,
    ``bias.{0,1}`` and ``enc.{0,1}``, which its forward never calls (5.33M params at official size; ``scale``/
    ``bias``/``enc`` have hard-coded widths 256/128/512 whatever ``ch`` is). They are created as real parameters
    with ``requires_grad=False`` only so that ``strict=True`` loading works, and are never used.

    ``forward(z, nl_feats, skips)``: z (B, z_channels, h, w); ``nl_feats`` = ``[n1, n0]`` (coarse to fine, the
    :class:`~glare_nat_arch.blocks.Decoder` feature order); ``skips`` = ``[s0, s1]`` (fine to coarse, the
    :class:`~glare_nat_arch.blocks.Encoder` order). Returns (B, out_ch, H, W), raw (no clamp, no residual add).
    """

    def __init__(
        self,
        size: VQGANSize = OFFICIAL_SIZE,
        out_ch: int = 3,
        mix_init: Sequence[float] = (-1.0, -0.6),
        per_sample_rescale: bool = True,
        deformable_groups: int = 4,
        dcn_impl: str = "auto",
        dcn_im2col_budget_mb: float = 256.0,
    ):
        super().__init__(size, out_ch)
        ch, ch_mult = size.ch, size.ch_mult
        n_fused = len(ch_mult) - 1
        if len(mix_init) != n_fused:
            raise ValueError(f"mix_init needs {n_fused} values (one per fused level), got {list(mix_init)}")
        self.per_sample_rescale = per_sample_rescale
        fused_widths = [ch * ch_mult[i] for i in reversed(range(n_fused))]  # coarse to fine
        self.warp = nn.ModuleList(WarpBlock(c, deformable_groups, dcn_impl, dcn_im2col_budget_mb) for c in fused_widths)
        self.mix = nn.ModuleList(Mix(m) for m in mix_init)
        self.residual_conv = nn.Conv2d(ch * ch_mult[0], out_ch, 3, 1, 1)
        # Unused official parameters (see class docstring).
        self.scale = nn.ModuleList([_unused_conv_pair(256), _unused_conv_pair(128)])
        self.bias = nn.ModuleList([_unused_conv_pair(256), _unused_conv_pair(128)])
        self.enc = nn.ModuleList([_UnusedResBlock(512, 256), _UnusedResBlock(256, 128)])
        for module in (self.conv_out, self.scale, self.bias, self.enc):
            module.requires_grad_(False)

    def _ratio(self, h: Tensor, u: Tensor) -> Tensor:
        if self.per_sample_rescale:
            return h.mean(dim=(1, 2, 3), keepdim=True) / u.mean(dim=(1, 2, 3), keepdim=True)
        return h.mean() / u.mean()

    def forward(
        self,
        z: Tensor,
        nl_feats: Sequence[Tensor],
        skips: Sequence[Tensor],
        intermediates: dict | None = None,
        mid_hook: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """See the class docstring. If ``intermediates`` is a dict it receives, per fused level ``l``,
        ``level{l}_h_pre``, ``level{l}_h_mix``, ``level{l}_u``, ``level{l}_mean_h_mix``, ``level{l}_mean_u``,
        ``level{l}_std_u`` and ``level{l}_h_post``. ``mid_hook(h) -> h`` (optional) transforms the bottleneck
        feature after ``mid`` (see :meth:`~glare_nat_arch.blocks.Decoder.run_backbone`)."""
        n_fused = len(self.warp)
        if len(nl_feats) != n_fused or len(skips) != n_fused:
            raise ValueError(
                f"MultiScaleDecoder needs {n_fused} NL features and skips, got {len(nl_feats)}/{len(skips)}"
            )

        def fuse(i_level: int, h: Tensor) -> Tensor:
            # Official: the fusion runs in float32 under autocast (D_MF and NL features, DCN offsets and mask cast
            # to float32), so the mean ratio cannot overflow in fp16; the next level's layers autocast again.
            with _autocast_off(h.device):
                return fuse_float32(i_level, _at_least_float32(h))

        def fuse_float32(i_level: int, h: Tensor) -> Tensor:
            j = n_fused - 1 - i_level  # module / NL-feature index (coarse to fine)
            h_mix = self.mix[j](_at_least_float32(skips[i_level]), h)
            u = self.warp[j](_at_least_float32(nl_feats[j]), h_mix)
            h_post = h_mix + u * self._ratio(h_mix, u)
            if intermediates is not None:
                p = f"level{i_level}_"
                intermediates.update(
                    {
                        p + "h_pre": h,
                        p + "h_mix": h_mix,
                        p + "u": u,
                        p + "mean_h_mix": h_mix.mean(),
                        p + "mean_u": u.mean(),
                        p + "std_u": u.std(),
                        p + "h_post": h_post,
                    }
                )
            return h_post

        h, _ = self.run_backbone(z, level_hook=fuse, collect=False, mid_hook=mid_hook)
        return self.residual_conv(swish(self.norm_out(h)))
