"""Shared transformer building blocks for the NAT refiners (docs/nat.md "Architecture", "Decoder NAT (NAT-III)").

One pre-LN block (multi-head self-attention through ``F.scaled_dot_product_attention`` + GELU MLP), a
size-agnostic fixed 2-D sin-cos position embedding, a positional-encoding generator (PEG, depthwise 3x3
conv on the token grid) and a stack of blocks with a final LayerNorm. Attention never materialises an
N x N matrix in this code: the kernel choice (flash / memory-efficient / math) is left to PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = [
    "sincos_pos_embed_2d",
    "gather_rows",
    "MultiHeadSelfAttention",
    "Mlp",
    "TransformerBlock",
    "PEG",
    "TransformerStack",
    "init_transformer_weights",
]


def sincos_pos_embed_2d(
    h: int, w: int, dim: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE convention), row-major token order.

    The first ``dim/2`` channels encode the row index, the last ``dim/2`` the column index; each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000^(-i / (dim/4))``.

    Returns:
        ``(h*w) x dim`` tensor; token ``y*w + x`` sits at row ``y``, column ``x``.
    """
    if dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter))
    ys = torch.arange(h, device=device, dtype=torch.float64)
    xs = torch.arange(w, device=device, dtype=torch.float64)
    out_y = ys[:, None] * omega[None]  # h x dim/4
    out_x = xs[:, None] * omega[None]  # w x dim/4
    emb_y = torch.cat([out_y.sin(), out_y.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    emb_x = torch.cat([out_x.sin(), out_x.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([emb_y, emb_x], dim=2).reshape(h * w, dim).to(dtype)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, i]]`` for ``x`` ``B x N x d`` and ``index`` ``B x Q`` (int64) -> ``B x Q x d``."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class MultiHeadSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention via SDPA (no mask, so fused kernels stay eligible).

    Input / output: ``B x N x dim``. With ``queries`` (``B x Q x dim``, rows of the same normalised tokens) only
    those rows attend (to all ``N`` tokens) and the output is ``B x Q x dim``: the same rows as the full call, at
    ``Q / N`` of the query cost.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"MultiHeadSelfAttention: dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, queries: Tensor | None = None) -> Tensor:
        d, heads = x.shape[-1], self.heads
        if queries is None:  # q, k, v each B x heads x N x head_dim
            q, k, v = rearrange(self.qkv(x), "b n (three h e) -> three b h n e", three=3, h=heads).unbind(0)
        else:
            w, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(queries, w[:d], None if bias is None else bias[:d])
            q = rearrange(q, "b q (h e) -> b h q e", h=heads)  # B x heads x Q x head_dim
            kv = F.linear(x, w[d:], None if bias is None else bias[d:])
            k, v = rearrange(kv, "b n (two h e) -> two b h n e", two=2, h=heads).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h q e -> b q (h e)")))


class Mlp(nn.Module):
    """``Linear(dim, hidden) -> GELU -> Dropout -> Linear(hidden, dim) -> Dropout`` on ``B x N x dim``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled():
            h = self.act(h)
        else:  # inference: the same GELU kernel in place, one B x N x hidden allocation less per block
            h = torch.ops.aten.gelu_(h, approximate=self.act.approximate)
        return self.drop(self.fc2(self.drop(h)))


class TransformerBlock(nn.Module):
    """Pre-LN block: ``x += MHSA(LN(x)); x += MLP(LN(x))``. Shape ``B x N x dim`` in and out.

    ``adaln``: per-token adaLN-Zero (DiT, applied token by token): ``(shift, scale, gate) x 2 = Linear(SiLU(c))``
    from a ``B x N x dim`` conditioning ``c``; ``x += gate1 * MHSA(LN(x) * (1 + scale1) + shift1)`` and likewise for
    the MLP. The modulation is zero-initialised, so the block starts as the identity.

    ``xattn``: a cross-attention sub-layer between attention and MLP, ``x += XA(LN(x), c)`` with ``c`` a
    ``B x M x dim`` context token set (the same attention module: queries from the tokens, keys / values from ``c``).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        adaln: bool = False,
        xattn: bool = False,
    ) -> None:
        super().__init__()
        if adaln and xattn:
            raise ValueError("TransformerBlock: adaln and xattn are alternatives")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if adaln else None
        self.norm_x = nn.LayerNorm(dim) if xattn else None
        self.xattn = MultiHeadSelfAttention(dim, heads, dropout) if xattn else None

    def zero_modulation(self) -> None:
        """adaLN-Zero: the modulation outputs 0 (identity block) until trained."""
        if self.ada is not None:
            nn.init.zeros_(self.ada[1].weight)
            nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, query_idx: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """``B x N x dim`` -> ``B x N x dim``; with ``query_idx`` (``B x Q`` int64) only those tokens' outputs,
        ``B x Q x dim`` (equal to the full call's rows up to float rounding). ``cond`` (``B x N x dim``) is required
        by (and only used by) an ``adaln`` block."""
        if (cond is not None) != (self.ada is not None or self.xattn is not None):
            raise ValueError("TransformerBlock: cond must be given exactly when the block is adaln or xattn")
        if self.ada is None:
            if query_idx is None:
                x = x + self.attn(self.norm1(x))
            else:
                normed = self.norm1(x)
                x = gather_rows(x, query_idx) + self.attn(normed, gather_rows(normed, query_idx))
            if self.xattn is not None:
                x = x + self.xattn(cond, self.norm_x(x))  # queries: the (kept) tokens; keys / values: the context
            return x + self.mlp(self.norm2(x))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(cond).chunk(6, dim=-1)
        normed = self.norm1(x) * (1 + scale1) + shift1
        if query_idx is None:
            x = x + gate1 * self.attn(normed)
        else:
            rows = [gather_rows(t, query_idx) for t in (x, normed, gate1, shift2, scale2, gate2)]
            x, q, gate1, shift2, scale2, gate2 = rows
            x = x + gate1 * self.attn(normed, q)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class PEG(nn.Module):
    """Positional-encoding generator: ``x + DWConv3x3(x)`` on the token grid (size-agnostic).

    Input / output: ``B x (h*w) x dim`` tokens in row-major order; ``hw = (h, w)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        b, n, d = x.shape
        h, w = hw
        if n != h * w:
            raise ValueError(f"PEG: {n} tokens do not form a {h}x{w} grid")
        grid = x.transpose(1, 2).reshape(b, d, h, w)
        return x + self.conv(grid).flatten(2).transpose(1, 2)


class TransformerStack(nn.Module):
    """``depth`` pre-LN blocks, an optional PEG after block ``peg_after`` (1-based), then a final LayerNorm.

    With ``long_skips`` (U-ViT / AutoNAT), the output of each of the first ``depth // 2`` blocks is kept and fed to
    its mirror block of the second half: before block ``depth - 1 - i`` the tokens become
    ``Linear(2 dim -> dim)([x || skip_i])`` (for odd ``depth`` the middle block has no skip).

    Input / output: ``B x (h*w) x dim`` tokens; the grid size ``hw`` is needed only by the PEG.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        peg_after: int | None = 1,
        long_skips: bool = False,
        adaln: bool = False,
        xattn: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"TransformerStack: depth must be >= 1, got {depth}")
        if peg_after is not None and not 1 <= peg_after <= depth:
            raise ValueError(f"TransformerStack: peg_after must be in [1, {depth}] or None, got {peg_after}")
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, adaln, xattn) for _ in range(depth)
        )
        self.peg_after = peg_after
        self.peg = PEG(dim) if peg_after is not None else None
        n_skips = depth // 2 if long_skips else 0
        self.skip_proj = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(n_skips)) if n_skips else None
        self.norm = nn.LayerNorm(dim)
        self.apply(init_transformer_weights)
        for blk in self.blocks:
            blk.zero_modulation()

    def forward(
        self, x: Tensor, hw: tuple[int, int], query_idx: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """``B x N x dim`` -> ``B x N x dim``, or ``B x Q x dim`` at ``query_idx`` (``B x Q`` int64): the last
        block then runs its queries and MLP on those tokens only (all tokens stay keys and values), exact up to
        float rounding because nothing after the last block mixes tokens (unless the PEG comes last).
        ``cond``: ``B x N x dim`` per-token conditioning of ``adaln`` stacks, ``B x M x dim`` context of ``xattn``."""
        depth = len(self.blocks)
        last = depth - 1
        restrict_last = query_idx is not None and not (self.peg is not None and self.peg_after == last + 1)
        n_skips = len(self.skip_proj) if self.skip_proj is not None else 0
        skips: list[Tensor] = []
        for i, blk in enumerate(self.blocks):
            j = depth - 1 - i  # the mirror of block i
            if n_skips and j < n_skips:
                x = self.skip_proj[j](torch.cat([x, skips.pop()], dim=-1))
            x = blk(x, query_idx if (restrict_last and i == last) else None, cond)
            if i < n_skips:
                skips.append(x)
            if self.peg is not None and i + 1 == self.peg_after:
                x = self.peg(x, hw)
        if query_idx is not None and not restrict_last:
            x = gather_rows(x, query_idx)
        return self.norm(x)


def init_transformer_weights(m: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorms (ViT/MaskGIT convention)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1:
        # depthwise PEG conv: small init so the PEG starts close to the identity
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
