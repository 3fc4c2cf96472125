"""NAT-III, the decoder NAT (docs/nat.md "Decoder NAT (NAT-III)"): a zero-initialised, mask-aware feature
transformer on a decoder feature map; the identity at initialisation. An ordinary BasicSR arch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from einops import rearrange, repeat
from torch import Tensor, nn

from glare_nat_arch.nat_head import nan_or
from glare_nat_arch.nat_options import NAT3Options, explicit_value, parse_options
from glare_nat_arch.nat_uncertainty import initial_mask, quantile
from glare_nat_arch.padding import pad_to_multiple
from glare_nat_arch.transformer import TransformerStack, init_transformer_weights, sincos_pos_embed_2d

__all__ = ["DecoderNAT"]


@ARCH_REGISTRY.register()
class DecoderNAT(nn.Module):
    """NAT-III: mask-aware feature transformer on a decoder feature map (docs/nat.md "Decoder NAT (NAT-III)").

    ``patch x patch`` patches of the ``B x C x h x w`` features become tokens (``Linear(C p^2 -> dim)``);
    masked patches take a learnable mask embedding; 2-D sin-cos positions and a projection of the patchified
    ``[cond_feat || U]`` are added everywhere; ``depth`` pre-LN blocks; a zero-initialised ``Linear(dim ->
    C p^2)`` gives ``delta``; ``h' = h + up(m) * delta`` (``residual='masked_only'``) or ``h + delta``
    (``'all'``). Odd sizes are replicate-padded and cropped back. At initialisation ``h' == h`` exactly.

    Args:
        in_channels: ``C`` (512 at H/4 in GLARE's MF-decoder).
        options: the ``network_g.nat3`` block (:class:`~glare_nat_arch.nat_options.NAT3Options` or its YAML
            mapping; None = defaults): ``model`` (``dim``, ``depth``, ``heads``, ``patch``), ``mask`` (``tau3``:
            a number wins over a checkpoint's calibrated value, ``auto`` keeps it, NaN until calibrated or pass
            ``mask`` to ``forward``; ``rho3_max``: cap on the masked patch fraction) and ``residual``.
        cond_channels: channels of ``cond_feat`` (64).
        mlp_ratio, dropout: transformer MLP width and dropout (not options).
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {
        "in_channels": 32,
        "cond_channels": 8,
        "options": {"enable": True, "model": {"dim": 16, "depth": 1, "heads": 2, "patch": 2}, "mask": {"tau3": 0.5}},
    }

    def __init__(
        self,
        in_channels: int = 512,
        options: NAT3Options | Mapping[str, Any] | None = None,
        cond_channels: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.options = parse_options(NAT3Options, options, "DecoderNAT.options")
        m = self.options.model
        dim, patch = m.dim, m.patch
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.patch = patch
        self.rho3_max = self.options.mask.rho3_max
        self.residual = self.options.residual
        self.register_buffer("tau3", nan_or(explicit_value(self.options.mask.tau3)))
        p2 = patch * patch
        self.patch_embed = nn.Linear(in_channels * p2, dim)
        self.cond_embed = nn.Linear((cond_channels + 1) * p2, dim)
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.body = TransformerStack(dim, m.depth, m.heads, mlp_ratio, dropout, peg_after=None)
        self.out = nn.Linear(dim, in_channels * p2)
        self.patch_embed.apply(init_transformer_weights)
        self.cond_embed.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.mask_emb, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Load, then an explicit ``mask.tau3`` option wins over the checkpoint's calibrated value."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = explicit_value(self.options.mask.tau3)
        if value is not None:
            self.tau3.fill_(value)

    def _padded(self, x: Tensor) -> Tensor:
        """Replicate-pad (B, C, H, W) at the bottom / right to multiples of ``patch``."""
        return pad_to_multiple(x, self.patch, "replicate")[0]

    def patch_uncertainty(self, uncertainty: Tensor) -> Tensor:
        """Mean of ``U`` (``B x h x w``) over each patch: ``B x ceil(h/p) x ceil(w/p)``."""
        return F.avg_pool2d(self._padded(uncertainty[:, None].float()), self.patch)[:, 0]

    def patch_mask(self, uncertainty: Tensor) -> Tensor:
        """``m_j = [u_j > tau3]`` capped at ``rho3_max`` of the patches: bool ``B x h_p x w_p``."""
        tau3 = float(self.tau3)
        if math.isnan(tau3):
            raise RuntimeError(
                "DecoderNAT.tau3 is not calibrated: give network_g.nat3.mask.tau3 a number, call calibrate(), or give "
                "forward() an explicit mask"
            )
        return initial_mask(self.patch_uncertainty(uncertainty), tau3, self.rho3_max)

    @torch.no_grad()
    def calibrate(self, uncertainties: Tensor | Iterable[Tensor], rho_target: float = 0.25) -> float:
        """Set ``tau3`` to the ``1 - rho_target`` quantile of patch uncertainties (``B x h x w`` maps)."""
        maps = [uncertainties] if isinstance(uncertainties, Tensor) else list(uncertainties)
        if not maps:
            raise ValueError("DecoderNAT.calibrate: no uncertainty maps given")
        value = quantile(torch.cat([self.patch_uncertainty(u).reshape(-1).cpu() for u in maps]), 1.0 - rho_target)
        self.tau3.fill_(value)
        return value

    def forward(
        self, h: Tensor, cond_feat: Tensor, uncertainty: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Refine features at masked patches.

        Args:
            h: ``B x C x H x W`` features; cond_feat: ``B x cond_channels x H x W``;
            uncertainty: ``B x H x W`` in ``[0, 1]``;
            mask: optional bool patch mask ``B x ceil(H/p) x ceil(W/p)`` (default: :meth:`patch_mask`).

        Returns:
            ``(h', mask)``: refined ``B x C x H x W`` features and the patch mask used.
        """
        b, c, hh, ww = h.shape
        if c != self.in_channels:
            raise ValueError(f"DecoderNAT: h has {c} channels, expected in_channels={self.in_channels}")
        if tuple(cond_feat.shape) != (b, self.cond_channels, hh, ww):
            raise ValueError(
                f"DecoderNAT: cond_feat must be {(b, self.cond_channels, hh, ww)}, got {tuple(cond_feat.shape)}"
            )
        if tuple(uncertainty.shape) != (b, hh, ww):
            raise ValueError(f"DecoderNAT: uncertainty must be {(b, hh, ww)}, got {tuple(uncertainty.shape)}")
        p = self.patch
        hp, wp = -(-hh // p), -(-ww // p)
        if mask is None:
            mask = self.patch_mask(uncertainty)
        elif tuple(mask.shape) != (b, hp, wp) or mask.dtype != torch.bool:
            raise ValueError(
                f"DecoderNAT: mask must be a bool {(b, hp, wp)} patch mask, got {mask.dtype} {tuple(mask.shape)}"
            )

        patchify = "b c (hp dy) (wp dx) -> b (hp wp) (c dy dx)"  # the pixel_unshuffle channel order
        tok = rearrange(self._padded(h), patchify, dy=p, dx=p)  # B x N x C p^2
        x = self.patch_embed(tok)
        x = torch.where(mask.reshape(b, -1, 1), self.mask_emb.to(x.dtype), x)
        cu = torch.cat([cond_feat.to(h.dtype), uncertainty[:, None].to(h.dtype)], dim=1)
        x = x + self.cond_embed(rearrange(self._padded(cu), patchify, dy=p, dx=p))
        x = x + sincos_pos_embed_2d(hp, wp, x.shape[-1], x.device, x.dtype)
        x = self.out(self.body(x, (hp, wp)))  # B x N x C p^2
        delta = rearrange(x, "b (hp wp) (c dy dx) -> b c (hp dy) (wp dx)", hp=hp, dy=p, dx=p)[:, :, :hh, :ww]
        if self.residual == "all":
            return h + delta, mask
        return torch.where(self.expand_mask(mask, hh, ww), h + delta, h), mask

    def expand_mask(self, mask: Tensor, height: int, width: int) -> Tensor:
        """Patch mask ``B x h_p x w_p`` -> per-pixel bool ``B x 1 x height x width`` (padding cropped)."""
        p = self.patch
        return repeat(mask, "b hp wp -> b 1 (hp dy) (wp dx)", dy=p, dx=p)[..., :height, :width]
