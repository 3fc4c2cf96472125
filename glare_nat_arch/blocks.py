"""Convolutional building blocks of GLARE's VQGAN-style encoder and decoder (taming-transformers layout).

Every sub-module keeps the attribute names of the official GLARE code (``LowLevelAI/GLARE``,
``code/models/modules/encoder_decoder.py``), so the official checkpoints load with ``strict=True``:

- ``ResnetBlock``: ``norm1, conv1, norm2, conv2`` and ``nin_shortcut`` (1x1) when the width changes.
- ``AttnBlock``: ``norm, q, k, v, proj_out`` (1x1 convs). The attention itself runs through
  :func:`torch.nn.functional.scaled_dot_product_attention`; no N x N map is built here.
- ``Encoder``: ``conv_in``, ``down.{i}.block.{j}``, ``down.{i}.attn.{j}``, ``down.{i}.downsample.conv``,
  ``mid.{block_1,attn_1,block_2}``, ``norm_out``, ``conv_out``.
- ``Decoder``: ``conv_in``, ``mid.*``, ``up.{i}.block.{j}``, ``up.{i}.attn.{j}``, ``up.{i}.upsample.conv``,
  ``norm_out``, ``conv_out``. ``up`` is indexed by resolution (``up.0`` is full resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VQGANSize",
    "OFFICIAL_SIZE",
    "Normalize",
    "swish",
    "ResnetBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "Encoder",
    "Decoder",
]


def Normalize(channels: int, num_groups: int = 32) -> nn.GroupNorm:  # noqa: N802 (official name)
    """GroupNorm with 32 groups and eps 1e-6, as in the official code."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: Tensor) -> Tensor:
    """``x * sigmoid(x)`` (the official ``nonlinearity``), as the fused ``F.silu`` kernel: one pass over the
    tensor and no intermediate ``sigmoid(x)`` tensor (same values up to float rounding)."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1 when widths differ) skip.

    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W). No time embedding (``temb_ch = 0``).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


def _conv1x1_tokens(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    """Apply a 1x1 ``conv`` to channel-last tokens: (B, N, C_in) -> (B, N, C_out) (same math as the conv)."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class AttnBlock(nn.Module):
    """Single-head global spatial self-attention with a residual connection.

    Shapes: (B, C, H, W) -> (B, C, H, W). softmax(q k^T / sqrt(C)) v over the N = H*W positions, computed by
    ``scaled_dot_product_attention`` (memory-efficient kernels; the N x N map is never materialised here).
    q, k, v and proj_out are the official 1x1 convs; they are applied to channel-last tokens so the attention
    inputs are contiguous without extra copies.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1, 1, 0)
        self.k = nn.Conv2d(in_channels, in_channels, 1, 1, 0)
        self.v = nn.Conv2d(in_channels, in_channels, 1, 1, 0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, C)
        q = _conv1x1_tokens(self.q, tokens).unsqueeze(1)  # (B, 1, N, C): one head
        k = _conv1x1_tokens(self.k, tokens).unsqueeze(1)
        v = _conv1x1_tokens(self.v, tokens).unsqueeze(1)
        del tokens
        out = F.scaled_dot_product_attention(q, k, v)  # scale defaults to C ** -0.5, as official
        del q, k, v
        out = _conv1x1_tokens(self.proj_out, out.squeeze(1))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Zero-pad (left 0, right 1, top 0, bottom 1), then a 3x3 stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and ``attn`` (AttnBlocks, empty or one per block)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: Tensor) -> Tensor:
        """The level's blocks in call order (block 0, attn 0, block 1, ...): (B, C_in, H, W) -> (B, C_out, H, W)."""
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the bottleneck width (keys ``block_1, attn_1, block_2``)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


@dataclass(frozen=True)
class VQGANSize:
    """The size of a VQGAN-style encoder / decoder, shared by GLARE's ``E_NL``, ``D_NL``, ``E_c`` and ``D_MF``
    (official defaults). The registered networks take these as flat option keys and build one ``VQGANSize``.

    Attributes:
        ch: base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: width multipliers; ``len(ch_mult) - 1`` stride-2 down- / upsamples, ``f = 2 ** (len(ch_mult) - 1)``.
        num_res_blocks: ResnetBlocks per encoder level (the decoder has one more per level).
        attn_resolutions: nominal resolutions (``resolution / 2**level``) whose blocks get an AttnBlock each.
        resolution: nominal input size (bookkeeping for ``attn_resolutions`` only; any input size works).
        z_channels: bottleneck channels.
        dropout: dropout inside the ResnetBlocks.

    Shapes: image (B, C, H, W) with H, W multiples of ``f`` <-> latent (B, z_channels, H / f, W / f); level ``i``
    features (B, ch * ch_mult[i], H / 2**i, W / 2**i).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (64,)
    resolution: int = 256
    z_channels: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:  # YAML gives lists: store tuples (hashable, immutable)
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))

    @property
    def downscale(self) -> int:
        """``f = 2 ** (len(ch_mult) - 1)``: image side / latent side."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_options(cls, owner: str, **options: Any) -> VQGANSize:
        """The size from a registered network's flat option keys (the fields above; missing ones take the official
        defaults). Any other key raises a ``TypeError`` naming ``owner`` and every unknown key."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            allowed = ", ".join(f.name for f in fields(cls))
            raise TypeError(f"{owner}: unexpected option(s) {unknown}; the VQGAN size keys are {allowed}")
        return cls(**options)


#: the official GLARE VQGAN size (the default of every network here)
OFFICIAL_SIZE = VQGANSize()
#: the size of the registered networks' ``TINY`` instances (tests): three levels (f = 4), no attention
TINY_SIZE = {"ch": 32, "ch_mult": (1, 1, 1), "num_res_blocks": 1, "attn_resolutions": (), "resolution": 32}


class Encoder(nn.Module):
    """taming-transformers encoder (GLARE's ``E_NL`` and the body of ``E_c``).

    Args:
        size: :class:`VQGANSize` (widths, levels, attention, bottleneck ``z_channels``, dropout).
        in_channels: image channels.
        double_z: bottleneck of ``2 * z_channels`` channels.

    Input (B, in_channels, H, W) with H, W multiples of ``f = size.downscale``.
    Output (B, z_channels, H / f, W / f), and with ``return_skips=True`` also the pre-downsample features
    ``[level0 (B, ch*ch_mult[0], H, W), level1 (B, ch*ch_mult[1], H/2, W/2), ...]`` (one per downsample).
    """

    def __init__(self, size: VQGANSize = OFFICIAL_SIZE, in_channels: int = 3, double_z: bool = False):
        super().__init__()
        self.size = size
        ch, ch_mult, num_res_blocks, dropout = size.ch, size.ch_mult, size.num_res_blocks, size.dropout
        attn_resolutions, resolution, z_channels = size.attn_resolutions, size.resolution, size.z_channels
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[i_level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, 1, 1)

    def forward(self, x: Tensor, return_skips: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """See the class docstring."""
        h = self.conv_in(x)
        skips: list[Tensor] = []
        for i_level, level in enumerate(self.down):
            h = level(h)
            if i_level != self.num_resolutions - 1:
                skips.append(h)
                h = level.downsample(h)
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return (h, skips) if return_skips else h


LevelHook = Callable[[int, Tensor], Tensor]


class Decoder(nn.Module):
    """taming-transformers decoder (GLARE's ``D_NL``; also the backbone of the multi-feature decoder ``D_MF``).

    Args: ``size`` (:class:`VQGANSize`) and ``out_ch`` (the RGB head width).

    ``forward(z)`` with z (B, z_channels, h, w) returns ``(rgb (B, out_ch, h*f, w*f) or None, feats)``. ``feats``
    holds the features after the res-blocks of every level below the bottleneck, before its upsample, coarse to
    fine: for three levels ``[n1 (B, ch*ch_mult[1], H/2, W/2), n0 (B, ch*ch_mult[0], H, W)]``.
    """

    def __init__(self, size: VQGANSize = OFFICIAL_SIZE, out_ch: int = 3):
        super().__init__()
        self.size = size
        ch, ch_mult, num_res_blocks, dropout = size.ch, size.ch_mult, size.num_res_blocks, size.dropout
        attn_resolutions, resolution, z_channels = size.attn_resolutions, size.resolution, size.z_channels
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, dropout)
        up: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, 1, 1)

    def run_backbone(
        self,
        z: Tensor,
        level_hook: LevelHook | None = None,
        collect: bool = True,
        mid_hook: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """conv_in -> mid -> up levels. Returns the last-level feature (B, ch*ch_mult[0], H, W) and ``feats``.

        ``level_hook(i_level, h) -> h`` (optional) runs after the blocks of every level below the bottleneck,
        before its upsample; ``feats`` collects ``h`` before the hook (empty when ``collect`` is False).
        ``mid_hook(h) -> h`` (optional) runs on the bottleneck feature (B, ch*ch_mult[-1], h, w) right after
        ``mid`` (the decoder NAT's insertion point, docs/nat.md "Decoder NAT (NAT-III)").
        """
        h = self.mid(self.conv_in(z))
        if mid_hook is not None:
            h = mid_hook(h)
        feats: list[Tensor] = []
        for i_level in reversed(range(self.num_resolutions)):
            if i_level != self.num_resolutions - 1:
                h = self.up[i_level + 1].upsample(h)
            h = self.up[i_level](h)
            if i_level != self.num_resolutions - 1:
                if collect:
                    feats.append(h)
                if level_hook is not None:
                    h = level_hook(i_level, h)
        return h, feats

    def forward(self, z: Tensor, return_rgb: bool = True) -> tuple[Tensor | None, list[Tensor]]:
        """See the class docstring."""
        h, feats = self.run_backbone(z)
        rgb = self.conv_out(swish(self.norm_out(h))) if return_rgb else None
        return rgb, feats
