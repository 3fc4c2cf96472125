"""NAT-II, the latent NAT (MaskGIT-style non-autoregressive transformer) of GLARE (docs/nat.md "Latent NAT").

:class:`LatentNAT` refines the flow output's nearest codes at uncertain positions by entropy-masked iterative
parallel decoding (:mod:`glare_nat_arch.nat_decoding`, docs/nat.md "Decoding") and feeds the result back ("Feedback
into GLARE"). NAT-III lives in :mod:`glare_nat_arch.decoder_nat_arch`, the MLM head and loss in
:mod:`glare_nat_arch.nat_head`, the options in :mod:`glare_nat_arch.nat_options`.

An ordinary BasicSR arch: tensors in, tensors out; the codebook is passed in as a ``K x C`` tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from einops import rearrange
from torch import Tensor, nn

from glare_nat_arch.nat_decoding import MaskedDecoding
from glare_nat_arch.nat_head import MLMHead, masked_ce_loss, nan_or
from glare_nat_arch.nat_options import NAT2Options, explicit_value, parse_options
from glare_nat_arch.nat_uncertainty import (
    CodeUncertainty,
    calibrate_dist_temp,
    calibrate_tau,
    code_uncertainty,
    mask_schedule,
    quantile,
    sample_train_mask,
)
from glare_nat_arch.padding import pad_to_multiple
from glare_nat_arch.transformer import TransformerStack, init_transformer_weights, sincos_pos_embed_2d

__all__ = ["LatentNAT", "XATTN_POOL"]

#: Context pooling of ``cond_mode: xattn`` (the f=4 grid pooled to h/4 x w/4).
XATTN_POOL = 4


@ARCH_REGISTRY.register()
class LatentNAT(MaskedDecoding, nn.Module):
    """NAT-II: masked-token transformer over the f=4 code grid, run on a ``merge x merge``-merged grid.

    Token ids are ``0..K-1`` (codes) and ``K`` (``[MASK]``). Per position the input is
    ``LN(E_tok[V] + W_c [x_hat || color_map || cond || H])``; positions are merged by a ``merge``-strided
    conv, a pre-LN transformer (2-D sin-cos + PEG) runs on the merged grid, a 1x1 conv + PixelShuffle
    unmerges, and the tied MLM head gives logits over the ``K`` codes at query positions only.

    Args:
        codebook_size: ``K`` (8192 for GLARE).
        options: the ``network_g.nat2`` block (:class:`~glare_nat_arch.nat_options.NAT2Options`, or its YAML
            mapping, validated here; None = the documented defaults). ``model`` sizes the transformer and chooses
            ``pos`` / ``cond_mode`` / ``tok_init`` / ``mask_hides_latent``; ``uncertainty`` the flow distribution
            (``knn``, ``dist_temp``), the masking score (``source``: ``entropy`` | ``margin`` | ``flow_mc``, the
            latter passed in as ``score``, see :meth:`GLARENATFlowNet.nat2_score`) and the initial mask (``tau``,
            ``rho_max``); ``decode`` the rounds (``iters``, ``schedule``, ``conf``, temperatures, ``remask_rule`` /
            ``remask_scope``, ``early_stop``); ``feedback.mode`` hard (``C[v^T]``) or soft (expected code).
            Numeric ``dist_temp`` / ``tau`` are explicit: they win over calibrated values loaded from a checkpoint;
            ``auto`` keeps the loaded (or :meth:`calibrate`d) value, NaN until calibrated.
        code_dim: code / latent channels (3).
        cond_channels: channels of the conditional encoder's ``cond_feat`` (64).
        chunk: positions per distance block in the codebook search (memory ``chunk x K`` floats).
        head_chunk: query rows per MLM-head block in :meth:`refine` (memory ``head_chunk x K`` floats).
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {
        "codebook_size": 16,
        "cond_channels": 8,
        "options": {
            "model": {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.0},
            "uncertainty": {"knn": 8, "dist_temp": 1.0, "tau": 0.5},
        },
    }

    def __init__(
        self,
        codebook_size: int,
        options: NAT2Options | Mapping[str, Any] | None = None,
        code_dim: int = 3,
        cond_channels: int = 64,
        chunk: int = 1024,
        head_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"LatentNAT: codebook_size must be >= 2, got {codebook_size}")
        self.options = parse_options(NAT2Options, options, "LatentNAT.options")
        m, u, d = self.options.model, self.options.uncertainty, self.options.decode
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.cond_channels = cond_channels
        self.merge = self.options.grid.merge
        self.pos, self.tok_init, self.cond_mode = m.pos, m.tok_init, m.cond_mode
        self.mask_hides_latent = m.mask_hides_latent
        self.iters, self.schedule, self.early_stop = d.iters, d.ratios, d.early_stop
        self.gammas = mask_schedule(self.schedule, self.iters)
        self.conf, self.sample_temp, self.choice_temp = d.conf, d.sample_temp, d.choice_temp
        self.remask_scope, self.remask_rule = d.remask_scope, d.remask_rule
        self.flow_prior, self.order = d.flow_prior, d.order
        self.knn, self.uncertainty_source, self.rho_max = u.knn, u.source, u.rho_max
        self.rho_target = u.rho_target
        self.feedback = self.options.feedback.mode
        self.chunk = chunk
        self.head_chunk = max(1, int(head_chunk))
        # calibrated scalars travel with the checkpoint; NaN means "not calibrated yet"
        self.register_buffer("dist_temp", nan_or(explicit_value(u.dist_temp)))
        self.register_buffer("tau", nan_or(explicit_value(u.tau)))
        dim, merge = m.dim, self.merge

        self.tok_emb = nn.Embedding(codebook_size + 1, dim)
        self.cond_proj = nn.Conv2d(2 * code_dim + cond_channels + 1, dim, 1)
        self.embed_norm = nn.LayerNorm(dim)
        self.embed_drop = nn.Dropout(m.dropout)
        self.merge_conv = nn.Conv2d(dim, dim, merge, stride=merge)
        peg_after = 1 if "peg" in self.pos.split("+") else None
        adaln = self.cond_mode == "adaln"
        self.cond_merge = nn.Conv2d(dim, dim, merge, stride=merge) if adaln else None
        self.body = TransformerStack(
            dim,
            m.depth,
            m.heads,
            m.mlp_ratio,
            m.dropout,
            peg_after,
            long_skips=m.uvit_skips,
            adaln=adaln,
            xattn=self.cond_mode == "xattn",
        )
        self.unmerge = nn.Sequential(nn.Conv2d(dim, dim * merge * merge, 1), nn.PixelShuffle(merge))
        self.head = MLMHead(dim, codebook_size)
        self.head.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.tok_emb.weight, std=0.02)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Load, then explicit ``uncertainty.dist_temp`` / ``tau`` options win over the checkpoint's calibrated
        values (``auto`` keeps them)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in ("dist_temp", "tau"):
            value = explicit_value(getattr(self.options.uncertainty, name))
            if value is not None:
                getattr(self, name).fill_(value)

    @property
    def mask_token_id(self) -> int:
        """Id of ``[MASK]`` (= ``codebook_size``)."""
        return self.codebook_size

    @torch.no_grad()
    def init_token_embedding(self, codebook: Tensor, generator: torch.Generator | None = None) -> bool:
        """``tok_init='codebook_lift'``: code rows ``E_tok[k] = W_lift e_k + R_k`` (docs/nat.md), with the codes
        standardised per channel, ``W_lift`` (``dim x code_dim``) and ``R`` ~ N(0, 0.02^2); the ``[MASK]`` row
        keeps its value. A no-op returning False for ``tok_init='random'``. Call once, on fresh weights, before
        training (``GLARENATModel`` does when it builds a NAT-II that no checkpoint fills).

        Args:
            codebook: ``K x code_dim`` (the frozen VQGAN's codes).
        """
        self._check_codebook(codebook)
        if self.tok_init != "codebook_lift":
            return False
        weight = self.tok_emb.weight
        book = codebook.detach().to(device=weight.device, dtype=torch.float32)
        book = (book - book.mean(0)) / book.std(0).clamp_min(1e-12)
        w_lift = torch.randn(weight.shape[1], self.code_dim, generator=generator, device="cpu") * 0.02
        rest = torch.randn(self.codebook_size, weight.shape[1], generator=generator, device="cpu") * 0.02
        rows = book @ w_lift.to(book.device).t() + rest.to(book.device)
        weight[: self.codebook_size] = rows.to(weight.dtype)
        return True

    # ------------------------------------------------------------------ network
    def _check_inputs(self, tokens: Tensor, x_hat: Tensor, color_map: Tensor, cond: Tensor, entropy: Tensor) -> None:
        if tokens.dim() != 3 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"LatentNAT: tokens must be an integer B x h x w tensor, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        b, h, w = tokens.shape
        expect = {
            "x_hat": (x_hat, (b, self.code_dim, h, w)),
            "color_map": (color_map, (b, self.code_dim, h, w)),
            "cond": (cond, (b, self.cond_channels, h, w)),
            "entropy": (entropy, (b, h, w)),
        }
        for name, (t, shape) in expect.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"LatentNAT: {name} must have shape {shape} (from tokens), got {tuple(t.shape)}")

    def cond_features(
        self, x_hat: Tensor, color_map: Tensor, cond: Tensor, entropy: Tensor, tokens: Tensor | None = None
    ) -> Tensor:
        """The projected conditioning ``B x dim x h x w`` = ``cond_proj([x_hat, color_map, cond, entropy])``.

        With ``mask_hides_latent`` ``x_hat`` and the entropy are zeroed where ``tokens`` holds ``[MASK]`` (so
        ``tokens`` is needed); otherwise the result does not depend on the tokens, and :meth:`refine` computes it
        once for all rounds (passed to :meth:`query_features` as ``cond_feat``)."""
        if tokens is not None:
            self._check_inputs(tokens, x_hat, color_map, cond, entropy)
        ent = entropy[:, None].to(x_hat.dtype)
        if self.mask_hides_latent:
            if tokens is None:
                raise ValueError("LatentNAT.cond_features: mask_hides_latent needs the tokens")
            visible = (tokens != self.mask_token_id)[:, None].to(x_hat.dtype)
            x_hat, ent = x_hat * visible, ent * visible
        return self.cond_proj(torch.cat([x_hat, color_map.to(x_hat.dtype), cond.to(x_hat.dtype), ent], dim=1))

    def _tokens(
        self, tokens: Tensor, *flow: Tensor, cond_feat: Tensor | None = None
    ) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """Embedded, merged tokens ``B x (h' w') x dim`` with position embedding, the merged grid ``(h', w')`` and,
        for ``cond_mode='adaln'``, the merged conditioning ``B x (h' w') x dim`` (else None). ``flow``: ``x_hat``,
        ``color_map``, ``cond``, ``entropy`` as :meth:`features` takes them; ``cond_feat``: a precomputed
        :meth:`cond_features` (token-independent only, i.e. without ``mask_hides_latent``)."""
        x_hat, color_map, cond, entropy = flow
        if cond_feat is None:
            c = self.cond_features(x_hat, color_map, cond, entropy, tokens)
        elif self.mask_hides_latent:
            raise ValueError("LatentNAT: with mask_hides_latent the conditioning depends on the tokens (no cond_feat)")
        else:
            self._check_inputs(tokens, x_hat, color_map, cond, entropy)
            c = cond_feat
        e = self.tok_emb(tokens.long())
        if self.cond_mode == "additive":
            e = e + c.permute(0, 2, 3, 1)
        e = self.embed_drop(self.embed_norm(e)).permute(0, 3, 1, 2)  # B x d x h x w
        m = self.merge_conv(pad_to_multiple(e, self.merge, "replicate")[0])  # B x d x h' x w'
        hm, wm = m.shape[-2:]
        x = rearrange(m, "b d h w -> b (h w) d")
        if "sincos2d" in self.pos.split("+"):
            x = x + sincos_pos_embed_2d(hm, wm, m.shape[1], m.device, m.dtype)
        if self.cond_mode == "additive":
            return x, (hm, wm), None
        if self.cond_mode == "adaln":
            return (
                x,
                (hm, wm),
                rearrange(self.cond_merge(pad_to_multiple(c, self.merge, "replicate")[0]), "b d h w -> b (h w) d"),
            )
        ctx = F.avg_pool2d(c, XATTN_POOL, ceil_mode=True)  # B x d x h/4 x w/4: the low-light context set
        hc, wc = ctx.shape[-2:]
        ctx = rearrange(ctx, "b d h w -> b (h w) d") + sincos_pos_embed_2d(hc, wc, ctx.shape[1], ctx.device, ctx.dtype)
        return x, (hm, wm), ctx

    def features(self, tokens: Tensor, x_hat: Tensor, color_map: Tensor, cond: Tensor, entropy: Tensor) -> Tensor:
        """Per-position hidden states ``B x h x w x dim`` (before the MLM head).

        Args:
            tokens: ``B x h x w`` ids in ``[0, K]`` (``K`` = ``[MASK]``).
            x_hat, color_map: ``B x code_dim x h x w``; cond: ``B x cond_channels x h x w``;
            entropy: ``B x h x w`` normalised entropy of the flow distribution.
        """
        b, h, w = tokens.shape
        x, (hm, wm), ctok = self._tokens(tokens, x_hat, color_map, cond, entropy)
        x = self.body(x, (hm, wm), cond=ctok)
        x = self.unmerge(rearrange(x, "b (h w) d -> b d h w", h=hm))[:, :, :h, :w]
        return x.permute(0, 2, 3, 1)

    def query_features(
        self,
        tokens: Tensor,
        x_hat: Tensor,
        color_map: Tensor,
        cond: Tensor,
        entropy: Tensor,
        query_mask: Tensor,
        cond_feat: Tensor | None = None,
    ) -> Tensor:
        """``features(...)[query_mask]`` (``N_q x dim``, row-major ``(b, y, x)`` order) at a fraction of the cost.

        Only the merged tokens that cover a query position go through the last transformer block's queries and
        MLP and through the unmerge (all tokens stay keys and values, so the result equals the full computation up
        to float rounding). ``cond_feat``: :meth:`cond_features` computed once by the caller (same values).
        """
        b, h, w = tokens.shape
        x, (hm, wm), ctok = self._tokens(tokens, x_hat, color_map, cond, entropy, cond_feat=cond_feat)
        m = self.merge
        padded = F.pad(query_mask, (0, wm * m - w, 0, hm * m - h))
        # B x N': the merged tokens whose m x m positions hold a query
        need = rearrange(padded, "b (hm dy) (wm dx) -> b (hm wm) (dy dx)", dy=m, dx=m).any(-1)
        counts = need.sum(1)
        q_max = int(counts.max()) if b else 0
        if q_max == 0:
            return x.new_zeros(0, x.shape[-1])
        # B x Q token indices, queried tokens first (stable order), padded with repeats that are dropped below
        order = torch.sort((~need).to(torch.int8), dim=1, stable=True).indices[:, :q_max]
        hq = self.body(x, (hm, wm), query_idx=order, cond=ctok)  # B x Q x d
        conv = self.unmerge[0]
        y = F.linear(hq, conv.weight.flatten(1), conv.bias)  # the 1x1 conv per queried token: B x Q x (d m m)
        y = rearrange(y, "b q (c dy dx) -> b q c dy dx", dy=m, dx=m)
        full = y.new_zeros(b, hm * wm, y.shape[2], m, m)
        valid = torch.arange(q_max, device=x.device)[None] < counts[:, None]
        rows = torch.arange(b, device=x.device)[:, None].expand(b, q_max)
        full[rows[valid], order[valid]] = y[valid]
        # PixelShuffle layout: channel c * m * m + dy * m + dx -> (c, y * m + dy, x * m + dx)
        grid = rearrange(full, "b (hm wm) c dy dx -> b (hm dy) (wm dx) c", hm=hm)
        return grid[:, :h, :w][query_mask]

    def logits(
        self, tokens: Tensor, x_hat: Tensor, color_map: Tensor, cond: Tensor, entropy: Tensor, query_mask: Tensor
    ) -> Tensor:
        """Logits over the ``K`` codes at the query positions only.

        Args:
            query_mask: bool ``B x h x w``; usually the currently masked positions.

        Returns:
            ``N_q x K`` with ``N_q = query_mask.sum()``, rows in row-major ``(b, y, x)`` order (the order of
            ``tensor[query_mask]``).
        """
        if query_mask.shape != tokens.shape or query_mask.dtype != torch.bool:
            raise ValueError(f"LatentNAT: query_mask must be a bool tensor shaped like tokens {tuple(tokens.shape)}")
        hidden = self.query_features(tokens, x_hat, color_map, cond, entropy, query_mask)
        return self.head(hidden, self.tok_emb.weight[: self.codebook_size])

    forward = logits

    # ------------------------------------------------------------ uncertainty
    def _calibrated(self, name: str) -> float:
        value = float(getattr(self, name))
        if math.isnan(value):
            raise RuntimeError(
                f"LatentNAT.{name} is not calibrated: give network_g.nat2.uncertainty.{name} a number or call "
                "LatentNAT.calibrate(flow_outputs, codebook) on training flow outputs first"
            )
        return value

    def uncertainty(self, x_hat: Tensor, codebook: Tensor, score: Tensor | None = None) -> CodeUncertainty:
        """Flow-output code distribution (docs/nat.md): ``codes`` v0, ``entropy``, ``margin`` and ``score`` (the
        uncertainty of ``uncertainty_source`` that masks and conditions), each ``B x h x w``.

        ``score``: the ``flow_mc`` map (``B x h x w``), required for that source and refused for the others."""
        self._check_codebook(codebook)
        t_d = self._calibrated("dist_temp")
        flow_mc = self.uncertainty_source == "flow_mc"
        unc = code_uncertainty(
            x_hat, codebook, t_d, self.knn, self.chunk, "entropy" if flow_mc else self.uncertainty_source
        )
        if not flow_mc:
            if score is not None:
                raise ValueError(
                    "LatentNAT: a score map is only taken for uncertainty_source='flow_mc', not "
                    f"{self.uncertainty_source!r}"
                )
            return unc
        if score is None:
            raise ValueError(
                "LatentNAT: uncertainty_source='flow_mc' needs the flow samples' code-histogram entropy as score=; "
                "run NAT-II through GLARENATFlowNet / GLARENATNet, which compute it (nat2_score)"
            )
        if tuple(score.shape) != tuple(unc.entropy.shape):
            raise ValueError(f"LatentNAT: score must be {tuple(unc.entropy.shape)}, got {tuple(score.shape)}")
        return dataclasses.replace(unc, score=score.to(unc.entropy.dtype))

    def _check_codebook(self, codebook: Tensor) -> None:
        if tuple(codebook.shape) != (self.codebook_size, self.code_dim):
            raise ValueError(
                f"LatentNAT: codebook must be {self.codebook_size} x {self.code_dim}, got {tuple(codebook.shape)}"
            )

    @torch.no_grad()
    def calibrate(
        self,
        flow_outputs: Tensor | Iterable[Tensor],
        codebook: Tensor,
        rho_target: float = 0.25,
        set_dist_temp: bool = True,
        set_tau: bool = True,
        scores: Iterable[Tensor] | None = None,
    ) -> dict[str, float]:
        """Set ``dist_temp`` (median 2nd-1st code gap) and ``tau`` (``1 - rho_target`` quantile of the uncertainty).

        Args:
            flow_outputs: ``B x code_dim x h x w`` flow outputs on training images (a tensor or an iterable).
            scores: ``flow_mc`` only: the score maps of the same images (``tau`` is their quantile).
        """
        self._check_codebook(codebook)
        batches = [flow_outputs] if isinstance(flow_outputs, Tensor) else list(flow_outputs)
        if set_dist_temp:
            self.dist_temp.fill_(calibrate_dist_temp(batches, codebook, self.chunk))
        if set_tau and self.uncertainty_source == "flow_mc":
            if scores is None:
                raise ValueError("LatentNAT.calibrate: uncertainty_source='flow_mc' needs scores= (nat2_score maps)")
            self.tau.fill_(quantile(torch.cat([t.reshape(-1).float().cpu() for t in scores]), 1.0 - rho_target))
        elif set_tau:
            self.tau.fill_(
                calibrate_tau(
                    batches,
                    codebook,
                    self._calibrated("dist_temp"),
                    self.knn,
                    rho_target,
                    self.chunk,
                    self.uncertainty_source,
                )
            )
        return {"dist_temp": float(self.dist_temp), "tau": float(self.tau)}

    #: Training mask ``B x h x w`` (docs/nat.md): :func:`~glare_nat_arch.nat_uncertainty.sample_train_mask`.
    train_mask = staticmethod(sample_train_mask)

    masked_ce_loss = staticmethod(masked_ce_loss)
