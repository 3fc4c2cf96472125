"""NAT (MaskGIT-style non-autoregressive transformer) refiners for GLARE (docs/nat.md "Latent NAT (NAT-II)").

* :class:`LatentNAT` (NAT-II): refines the flow output's nearest codes at uncertain positions by
  entropy-masked iterative parallel decoding (docs/nat.md "Decoding") and feeds the result back ("Feedback into GLARE").
* :class:`DecoderNAT` (NAT-III): a zero-initialised, mask-aware feature transformer on a decoder feature
  map (docs/nat.md "Decoder NAT (NAT-III)"); the identity at initialisation.

Both are ordinary BasicSR archs: tensors in, tensors out; the codebook is passed in as a ``K x C`` tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.nat_uncertainty import (
    UNCERTAINTY_SOURCES,
    CodeUncertainty,
    calibrate_dist_temp,
    calibrate_tau,
    code_uncertainty,
    gumbel_noise,
    initial_mask,
    mask_schedule,
    normalized_entropy,
    quantile,
    sample_train_mask,
    still_masked_counts,
    topk_mask,
)
from glare_nat_arch.transformer import TransformerStack, init_transformer_weights, sincos_pos_embed_2d

__all__ = ["LatentNAT", "DecoderNAT", "MLMHead", "masked_ce_loss", "POS_ENCODINGS", "COND_MODES"]

_CONF_RULES = ("logp", "neg_entropy", "margin")
#: ``cond_mode`` values of :class:`LatentNAT` (docs/nat.md) and the context pooling of ``xattn`` (h/4 x w/4).
COND_MODES = ("additive", "adaln", "xattn")
XATTN_POOL = 4
#: ``pos`` values of :class:`LatentNAT` (docs/nat.md "Options" ``model.pos``).
POS_ENCODINGS = ("sincos2d+peg", "sincos2d", "peg")


def masked_ce_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None, label_smoothing: float = 0.1) -> Tensor:
    """Label-smoothed cross-entropy averaged over masked positions only (docs/nat.md "Training the latent NAT").

    Args:
        logits: ``N_q x K`` logits at the masked positions (as returned by :meth:`LatentNAT.logits`), or,
            when ``mask`` is given, dense ``B x h x w x K`` (or ``B x N x K``) logits.
        targets: ``N_q`` target codes, or dense ``B x h x w`` (``B x N``) when ``mask`` is given.
        mask: optional bool ``B x h x w`` (``B x N``); only its True positions contribute.
        label_smoothing: ``eps``; the target is ``(1 - eps) onehot + eps / K``.

    Returns:
        Scalar loss (0, still attached to ``logits``, when nothing is masked).
    """
    if mask is not None:
        if mask.shape != targets.shape or logits.shape[:-1] != mask.shape:
            raise ValueError(
                f"masked_ce_loss: logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
                f"{tuple(mask.shape)} disagree"
            )
        logits, targets = logits[mask], targets[mask]
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"masked_ce_loss: need N x K logits and N targets, got {tuple(logits.shape)}, {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)


class MLMHead(nn.Module):
    """``Linear -> GELU -> LN``, then logits ``g @ table.T + bias`` (table tied to the token embedding).

    Input ``N_q x d`` hidden states and the ``K x d`` table; output ``N_q x K``.
    """

    def __init__(self, dim: int, num_codes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.bias = nn.Parameter(torch.zeros(num_codes))

    def forward(self, hidden: Tensor, table: Tensor, out: Tensor | None = None) -> Tensor:
        """``out``: an ``N_q x K`` buffer to write the logits into (inference: no autograd through ``out=``)."""
        g = self.norm(self.act(self.fc(hidden)))
        bias, weight = self.bias.to(g.dtype), table.t().to(g.dtype)
        if out is not None:
            return torch.addmm(bias, g, weight, out=out)
        return torch.addmm(bias, g, weight)  # one N_q x K allocation


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {tuple(allowed)}")
    return value


def _nan_or(value: float | None) -> Tensor:
    return torch.tensor(float("nan") if value is None else float(value), dtype=torch.float64)


@ARCH_REGISTRY.register()
class LatentNAT(nn.Module):
    """NAT-II: masked-token transformer over the f=4 code grid, run on a ``merge x merge``-merged grid.

    Token ids are ``0..K-1`` (codes) and ``K`` (``[MASK]``). Per position the input is
    ``LN(E_tok[V] + W_c [x_hat || color_map || cond || H])``; positions are merged by a ``merge``-strided
    conv, a pre-LN transformer (2-D sin-cos + PEG) runs on the merged grid, a 1x1 conv + PixelShuffle
    unmerges, and the tied MLM head gives logits over the ``K`` codes at query positions only.

    Args:
        codebook_size: ``K`` (8192 for GLARE).
        dim, depth, heads, mlp_ratio, dropout: transformer size (defaults NAT-II-S, docs/nat.md "Architecture").
        cond_channels: channels of the conditional encoder's ``cond_feat`` (64).
        code_dim: code / latent channels (3).
        merge: token-merge factor (2 default; 1 = native grid).
        pos: position encoding of the merged grid: ``sincos2d+peg`` (fixed 2-D sin-cos, plus a PEG after block 1),
            ``sincos2d`` or ``peg`` (one of the two).
        uvit_skips: U-ViT long skips between mirrored blocks (:class:`TransformerStack` ``long_skips``).
        cond_mode: ``additive`` (``W_c [...]`` added to every token embedding, docs/nat.md) | ``adaln`` (the same
            projection, merged like the tokens, drives a per-token adaLN-Zero in every block; +6 dim^2 per token
            per block) | ``xattn`` (every block cross-attends to the projection average-pooled ``xattn_pool x
            xattn_pool`` on the f=4 grid, with 2-D sin-cos positions; +N' M dim per block).
        tok_init: ``random`` (trunc-normal 0.02) | ``codebook_lift``: after :meth:`init_token_embedding`, code rows
            start as ``W_lift e_k + R_k`` (docs/nat.md), so neighbouring codes start with similar embeddings.
        mask_hides_latent: zero the ``x_hat`` and ``H`` conditioning slots at ``[MASK]`` positions.
        iters: decoding rounds ``T``; schedule: ``gamma`` name or ratios (see ``mask_schedule``).
        conf: confidence rule ``logp`` | ``neg_entropy`` | ``margin``.
        sample_temp: 0 = argmax, else sample ``softmax(logits / sample_temp)``.
        choice_temp: Gumbel temperature ``tau_c`` on the confidence, annealed ``tau_c (1 - t/T)``.
        remask_scope: ``new_only`` (committed tokens are final) | ``all`` (any token may be re-masked).
        remask_rule: ``schedule`` (keep the ``N0 gamma(t/T)`` least confident masked) | ``threshold`` (the slides'
            literal rule, docs/nat.md "Decoding": a masked position stays masked while the normalised entropy of its NAT
            distribution exceeds ``tau_t = tau``, constant hence non-decreasing; ``M_T`` is empty; ``remask_scope``
            ``new_only`` only).
        early_stop: run rounds ``t <= early_stop`` only, committing every still-masked token at the last.
        knn: nearest codes kept for the flow distribution; dist_temp: ``T_d`` (None until calibrated).
        uncertainty_source: the per-position uncertainty that masks and conditions: ``entropy`` (normalised
            entropy of the flow distribution) | ``margin`` (``exp(-(d_(2) - d_(1)) / T_d)``, docs/nat.md) |
            ``flow_mc`` (code histogram entropy of flow samples: the flow lives outside this module, so callers pass
            it as ``score``; :meth:`GLARENATFlowNet.nat2_score` computes it).
        tau: threshold of the initial mask on that uncertainty (None = 'auto', set by :meth:`calibrate`).
        rho_max: cap on the initially masked fraction.
        feedback: ``hard`` (``C[v^T]``) | ``soft`` (expected code under the committing distribution).
        chunk: positions per distance block in the codebook search (memory ``chunk x K`` floats).
        head_chunk: query rows per MLM-head block in :meth:`refine` (memory ``head_chunk x K`` floats).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int = 384,
        depth: int = 6,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        cond_channels: int = 64,
        code_dim: int = 3,
        merge: int = 2,
        pos: str = "sincos2d+peg",
        uvit_skips: bool = False,
        cond_mode: str = "additive",
        tok_init: str = "random",
        mask_hides_latent: bool = False,
        iters: int = 4,
        schedule: str | Sequence[float] = "cosine",
        conf: str = "logp",
        sample_temp: float = 0.0,
        choice_temp: float = 0.0,
        remask_scope: str = "new_only",
        remask_rule: str = "schedule",
        early_stop: int | None = None,
        knn: int = 64,
        dist_temp: float | None = None,
        uncertainty_source: str = "entropy",
        tau: float | None = None,
        rho_max: float = 0.5,
        feedback: str = "hard",
        chunk: int = 1024,
        head_chunk: int = 1024,
    ) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"LatentNAT: codebook_size must be >= 2, got {codebook_size}")
        if merge < 1:
            raise ValueError(f"LatentNAT: merge must be >= 1, got {merge}")
        if early_stop is not None and not 1 <= early_stop <= iters:
            raise ValueError(f"LatentNAT: early_stop must be None or in [1, iters={iters}], got {early_stop}")
        if sample_temp < 0 or choice_temp < 0:
            raise ValueError(
                f"LatentNAT: temperatures must be >= 0, got sample_temp={sample_temp}, choice_temp={choice_temp}"
            )
        if dist_temp is not None and not dist_temp > 0:
            raise ValueError(f"LatentNAT: dist_temp must be > 0 or None, got {dist_temp}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.cond_channels = cond_channels
        self.merge = merge
        self.pos = _choice("pos", pos, POS_ENCODINGS)
        self.tok_init = _choice("tok_init", tok_init, ("random", "codebook_lift"))
        self.cond_mode = _choice("cond_mode", cond_mode, COND_MODES)
        self.mask_hides_latent = bool(mask_hides_latent)
        self.iters = iters
        self.schedule = list(schedule) if not isinstance(schedule, str) else schedule
        self.gammas = mask_schedule(self.schedule, iters)
        self.conf = _choice("conf", conf, _CONF_RULES)
        self.sample_temp = float(sample_temp)
        self.choice_temp = float(choice_temp)
        self.remask_scope = _choice("remask_scope", remask_scope, ("new_only", "all"))
        self.remask_rule = _choice("remask_rule", remask_rule, ("schedule", "threshold"))
        if self.remask_rule == "threshold" and self.remask_scope != "new_only":
            raise ValueError("LatentNAT: remask_rule='threshold' keeps M_t inside M_(t-1): use remask_scope='new_only'")
        self.early_stop = early_stop
        self.knn = knn
        self.uncertainty_source = _choice("uncertainty_source", uncertainty_source, (*UNCERTAINTY_SOURCES, "flow_mc"))
        self.rho_max = float(rho_max)
        self.feedback = _choice("feedback", feedback, ("hard", "soft"))
        self.chunk = chunk
        self.head_chunk = max(1, int(head_chunk))
        # calibrated scalars travel with the checkpoint; NaN means "not calibrated yet"
        self.register_buffer("dist_temp", _nan_or(dist_temp))
        self.register_buffer("tau", _nan_or(tau))

        self.tok_emb = nn.Embedding(codebook_size + 1, dim)
        self.cond_proj = nn.Conv2d(2 * code_dim + cond_channels + 1, dim, 1)
        self.embed_norm = nn.LayerNorm(dim)
        self.embed_drop = nn.Dropout(dropout)
        self.merge_conv = nn.Conv2d(dim, dim, merge, stride=merge)
        peg_after = 1 if "peg" in self.pos.split("+") else None
        adaln = self.cond_mode == "adaln"
        self.cond_merge = nn.Conv2d(dim, dim, merge, stride=merge) if adaln else None
        self.body = TransformerStack(
            dim,
            depth,
            heads,
            mlp_ratio,
            dropout,
            peg_after,
            long_skips=bool(uvit_skips),
            adaln=adaln,
            xattn=self.cond_mode == "xattn",
        )
        self.unmerge = nn.Sequential(nn.Conv2d(dim, dim * merge * merge, 1), nn.PixelShuffle(merge))
        self.head = MLMHead(dim, codebook_size)
        self.head.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.tok_emb.weight, std=0.02)

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
        self,
        tokens: Tensor,
        x_hat: Tensor,
        color_map: Tensor,
        cond: Tensor,
        entropy: Tensor,
        cond_feat: Tensor | None = None,
    ) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """Embedded, merged tokens ``B x (h' w') x dim`` with position embedding, the merged grid ``(h', w')`` and,
        for ``cond_mode='adaln'``, the merged conditioning ``B x (h' w') x dim`` (else None). ``cond_feat``: a
        precomputed :meth:`cond_features` (token-independent only, i.e. without ``mask_hides_latent``)."""
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
        m = self.merge_conv(self._pad_to_merge(e))  # B x d x h' x w'
        hm, wm = m.shape[-2:]
        x = m.flatten(2).transpose(1, 2)
        if "sincos2d" in self.pos.split("+"):
            x = x + sincos_pos_embed_2d(hm, wm, m.shape[1], m.device, m.dtype)
        if self.cond_mode == "additive":
            return x, (hm, wm), None
        if self.cond_mode == "adaln":
            return x, (hm, wm), self.cond_merge(self._pad_to_merge(c)).flatten(2).transpose(1, 2)
        ctx = F.avg_pool2d(c, XATTN_POOL, ceil_mode=True)  # B x d x h/4 x w/4: the low-light context set
        hc, wc = ctx.shape[-2:]
        ctx = ctx.flatten(2).transpose(1, 2) + sincos_pos_embed_2d(hc, wc, ctx.shape[1], ctx.device, ctx.dtype)
        return x, (hm, wm), ctx

    def _pad_to_merge(self, t: Tensor) -> Tensor:
        """Replicate-pad ``B x C x h x w`` at the bottom / right to multiples of ``merge``."""
        ph, pw = (-t.shape[-2]) % self.merge, (-t.shape[-1]) % self.merge
        return F.pad(t, (0, pw, 0, ph), mode="replicate") if ph or pw else t

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
        x = self.unmerge(x.transpose(1, 2).reshape(b, -1, hm, wm))[:, :, :h, :w]
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
        x, (hm, wm), ctok = self._tokens(tokens, x_hat, color_map, cond, entropy, cond_feat)
        m = self.merge
        padded = F.pad(query_mask, (0, wm * m - w, 0, hm * m - h))
        need = padded.reshape(b, hm, m, wm, m).any(4).any(2).reshape(b, hm * wm)  # merged tokens covering a query
        counts = need.sum(1)
        q_max = int(counts.max()) if b else 0
        if q_max == 0:
            return x.new_zeros(0, x.shape[-1])
        # B x Q token indices, queried tokens first (stable order), padded with repeats that are dropped below
        order = torch.sort((~need).to(torch.int8), dim=1, stable=True).indices[:, :q_max]
        hq = self.body(x, (hm, wm), query_idx=order, cond=ctok)  # B x Q x d
        conv = self.unmerge[0]
        y = F.linear(hq, conv.weight.flatten(1), conv.bias).reshape(b, q_max, -1, m, m)  # 1x1 conv per token
        full = y.new_zeros(b, hm * wm, y.shape[2], m, m)
        valid = torch.arange(q_max, device=x.device)[None] < counts[:, None]
        rows = torch.arange(b, device=x.device)[:, None].expand(b, q_max)
        full[rows[valid], order[valid]] = y[valid]
        # PixelShuffle layout: channel c * m * m + dy * m + dx -> (c, y * m + dy, x * m + dx)
        grid = full.reshape(b, hm, wm, -1, m, m).permute(0, 1, 4, 2, 5, 3).reshape(b, hm * m, wm * m, -1)
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
                f"LatentNAT.{name} is not calibrated: pass {name}=... to the constructor (network options) or call "
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

    # ------------------------------------------------------------------ decode
    def _confidence(self, logp: Tensor, pred: Tensor) -> Tensor:
        """Confidence ``N_q`` of the chosen ids ``pred`` under ``logp`` (``N_q x K``)."""
        chosen = logp.gather(1, pred[:, None])[:, 0]
        if self.conf == "logp":
            return chosen
        if self.conf == "neg_entropy":
            return (logp.exp() * logp).sum(1)
        others = logp.scatter(1, pred[:, None], float("-inf")).amax(1)
        return chosen - others

    def _decode_rows(
        self,
        hidden: Tensor,
        current: Tensor,
        masked: Tensor,
        codebook: Tensor,
        generator: torch.Generator | None,
        want_soft: bool = True,
        want_entropy: bool = True,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Per query row: prediction, confidence, expected code and normalised entropy of ``softmax(logits)``.

        Rows (``hidden`` ``N_q x d``) go through the MLM head ``head_chunk`` at a time, so no ``N_q x K`` tensor is
        ever built (memory: a few ``head_chunk x K`` float32 blocks). ``current`` (``N_q``) are the rows' tokens;
        rows with ``masked`` False (``remask_scope='all'``) keep their token as the prediction.

        Returns ``pred`` (int64), ``conf``, ``soft`` (``N_q x code_dim``, None unless ``want_soft``) and ``entropy``
        (None unless ``want_entropy``), all float32 but ``pred``.
        """
        table = self.tok_emb.weight[: self.codebook_size]
        book = codebook.float()
        preds: list[Tensor] = []
        confs: list[Tensor] = []
        softs: list[Tensor] = []
        ents: list[Tensor] = []
        # inference: every chunk's logits, log-probabilities and entropy terms go into two buffers allocated once (a
        # fresh N_q x K block per chunk costs page faults on CPU, see chunked_code_distances); same values
        bufs = None
        eager = not torch.is_grad_enabled() and not torch.is_autocast_enabled(hidden.device.type)
        if eager and hidden.shape[0] > 0:  # (out= runs outside autocast's casts: buffers in float32 mode only)
            rows_max = min(self.head_chunk, hidden.shape[0])
            bufs = [hidden.new_empty(rows_max, self.codebook_size, dtype=torch.float32) for _ in range(2)]
        for start in range(0, hidden.shape[0], self.head_chunk):
            rows = slice(start, start + self.head_chunk)
            part = hidden[rows]
            if bufs is None:
                logp = torch.log_softmax(self.head(part, table), dim=-1, dtype=torch.float32)
                work = None
            else:
                work, logp = (b[: part.shape[0]] for b in bufs)
                logits = self.head(part, table, work if part.dtype == torch.float32 else None)  # else a new block
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=logp)
            if self.sample_temp > 0:
                pred = (logp / self.sample_temp + gumbel_noise(logp.shape, logp.device, generator)).argmax(1)
            else:
                pred = logp.argmax(1)
            pred = torch.where(masked[rows], pred, current[rows])
            confs.append(self._confidence(logp, pred))
            preds.append(pred)
            if want_soft or want_entropy:
                probs = logp.exp_()  # logp is not needed any more: reuse its memory
                if want_soft:
                    softs.append(probs @ book)
                if want_entropy:
                    ents.append(normalized_entropy(probs, work))
        if not preds:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            soft = empty.new_zeros(0, book.shape[1]) if want_soft else None
            return current.new_zeros(0), empty, soft, (empty if want_entropy else None)
        soft = torch.cat(softs) if want_soft else None
        return torch.cat(preds), torch.cat(confs), soft, (torch.cat(ents) if want_entropy else None)

    def refine(
        self,
        x_hat: Tensor,
        codebook: Tensor,
        color_map: Tensor,
        cond: Tensor,
        generator: torch.Generator | None = None,
        stats: bool = True,
        score: Tensor | None = None,
        soft_codes: bool | None = None,
    ) -> dict[str, Any]:
        """Entropy-masked iterative refinement (docs/nat.md "Decoding") and feedback ("Feedback into GLARE").

        Call ``eval()`` first for deterministic decoding (dropout). Greedy (``sample_temp = choice_temp = 0``)
        decoding is deterministic; otherwise the noise comes from ``generator``. ``stats=False`` skips what only
        NAT-III and the statistics read (``uncertainty`` and, with ``feedback='hard'``, ``soft_codes`` are then
        None): the entropy and expected code of each committing distribution (``N_q x K`` work per round).
        ``soft_codes`` (default: ``stats``) decides the expected codes alone: NAT-III needs ``uncertainty`` only.

        Args:
            x_hat: ``B x code_dim x h x w`` flow output; codebook: ``K x code_dim``;
            color_map: ``B x code_dim x h x w``; cond: ``B x cond_channels x h x w``;
            score: the ``flow_mc`` uncertainty map ``B x h x w`` (that source only, see :meth:`uncertainty`).

        Returns:
            dict with ``z_out`` (``B x code_dim x h x w``, MF-decoder input; ``x_hat`` itself when nothing is
            masked), ``z_q`` (``C[v^T]``), ``codes_init`` (v0) and ``codes`` (v^T) ``B x h x w`` int64,
            ``mask_init`` (M0), ``masks`` (list, mask after each executed round), ``tokens`` (list, ids ``V^(t)``
            after each round, ``K`` where masked), ``mask_union`` (every
            position ever masked), ``entropy`` / ``margin`` of the flow distribution, ``score`` (the uncertainty
            that masked: ``entropy`` unless ``uncertainty_source='margin'``), ``uncertainty`` (normalised entropy
            of the committing distribution where masked, else ``score``; NAT-III's U),
            ``soft_codes`` (expected code under the committing distribution where masked, else ``C[v^T]``),
            ``n0`` (``B``), ``rounds`` (forward passes run).
        """
        self._check_codebook(codebook)
        unc = self.uncertainty(x_hat, codebook, score)
        v0, ent = unc.codes, unc.score  # the uncertainty that masks and conditions (the entropy by default)
        m0 = initial_mask(ent, self._calibrated("tau"), self.rho_max)
        b, h, w = v0.shape
        n = h * w
        n0 = m0.reshape(b, -1).sum(1)
        k_mask = self.mask_token_id
        out: dict[str, Any] = {"codes_init": v0, "entropy": unc.entropy, "margin": unc.margin, "score": ent}
        out.update(mask_init=m0, n0=n0)

        v = torch.where(m0, k_mask, v0).reshape(b, n)
        mask = m0.reshape(b, n)
        union = mask.clone()
        code_rows = codebook.to(x_hat.dtype)
        want_soft = (stats if soft_codes is None else soft_codes) or self.feedback == "soft"
        soft = code_rows[v0.reshape(b, n)] if want_soft else None  # B x N x c
        commit_ent = ent.reshape(b, n).clone() if stats else None
        masks: list[Tensor] = []
        history: list[Tensor] = []
        rounds = 0
        t_exec = self.iters if self.early_stop is None else self.early_stop
        # the conditioning is the same in every round (unless masked positions hide the latent): project it once
        cond_feat = None
        if not self.mask_hides_latent and bool(mask.any()):
            cond_feat = self.cond_features(x_hat, color_map, cond, ent, v.reshape(b, h, w))
        for t in range(1, t_exec + 1):
            if not bool(mask.any()):  # everything committed (n_t is then 0 in both scopes)
                break
            query = mask if self.remask_scope == "new_only" else torch.ones_like(mask)
            rounds += 1
            tokens = v.reshape(b, h, w)
            hidden = self.query_features(tokens, x_hat, color_map, cond, ent, query.reshape(b, h, w), cond_feat)
            by_threshold = self.remask_rule == "threshold"
            pred, conf, soft_q, ent_q = self._decode_rows(
                hidden,
                v[query],
                mask[query],
                codebook,
                generator,
                want_soft=want_soft,
                want_entropy=stats or by_threshold,
            )
            if self.choice_temp > 0:
                conf = conf + self.choice_temp * (1.0 - t / self.iters) * gumbel_noise(
                    conf.shape, conf.device, generator
                )

            if by_threshold:  # M_t = {i in M_(t-1): H_NAT(i) > tau}, M_T empty (query = mask here)
                new_mask = torch.zeros_like(mask)
                if t < t_exec:
                    new_mask[query] = ent_q > self._calibrated("tau")
            else:
                n_t = still_masked_counts(n0, mask.sum(1), 0.0 if t == t_exec else self.gammas[t - 1])
                scores = torch.full((b, n), float("inf"), device=conf.device)
                scores[query] = conf
                new_mask = topk_mask(scores, n_t, largest=False)

            pred_full = v.clone()
            pred_full[query] = pred
            committed = mask & ~new_mask
            committed_q = committed[query]
            if soft is not None and soft_q is not None:
                soft = soft.index_put((committed,), soft_q[committed_q].to(soft.dtype))
            if commit_ent is not None and ent_q is not None:
                commit_ent[committed] = ent_q[committed_q].to(commit_ent.dtype)
            v = torch.where(new_mask, k_mask, pred_full)
            mask = new_mask
            union |= new_mask
            masks.append(mask.reshape(b, h, w).clone())
            history.append(v.reshape(b, h, w).clone())
        if bool((v == k_mask).any()):  # pragma: no cover - guarded by n_T = 0
            raise RuntimeError("LatentNAT.refine: [MASK] tokens left after the last round")

        codes = v.reshape(b, h, w)
        z_q = code_rows[codes].permute(0, 3, 1, 2)
        union_map = union.reshape(b, 1, h, w)
        soft_map = None
        if soft is not None:
            soft_map = torch.where(union_map, soft.reshape(b, h, w, -1).permute(0, 3, 1, 2), z_q)
        if not bool(union.any()):
            z_out = x_hat  # N0 = 0: GLARE's own latent, untouched
        else:
            z_out = torch.where(union_map, z_q if self.feedback == "hard" else soft_map, x_hat)
        out.update(
            z_out=z_out,
            z_q=z_q,
            codes=codes,
            masks=masks,
            tokens=history,
            mask_union=union.reshape(b, h, w),
            uncertainty=None
            if commit_ent is None
            else torch.where(union, commit_ent, ent.reshape(b, n)).reshape(b, h, w),
            soft_codes=soft_map,
            rounds=rounds,
        )
        return out


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
        dim, depth, heads, mlp_ratio, dropout: transformer size.
        cond_channels: channels of ``cond_feat`` (64).
        patch: patch size (2).
        tau3: patch-uncertainty threshold (None until calibrated, or pass ``mask`` to ``forward``).
        rho3_max: cap on the masked patch fraction.
        residual: ``masked_only`` | ``all``.
    """

    def __init__(
        self,
        in_channels: int = 512,
        dim: int = 384,
        depth: int = 4,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        cond_channels: int = 64,
        patch: int = 2,
        tau3: float | None = None,
        rho3_max: float = 0.5,
        residual: str = "masked_only",
    ) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"DecoderNAT: patch must be >= 1, got {patch}")
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.patch = patch
        self.rho3_max = float(rho3_max)
        self.residual = _choice("residual", residual, ("masked_only", "all"))
        self.register_buffer("tau3", _nan_or(tau3))
        p2 = patch * patch
        self.patch_embed = nn.Linear(in_channels * p2, dim)
        self.cond_embed = nn.Linear((cond_channels + 1) * p2, dim)
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.body = TransformerStack(dim, depth, heads, mlp_ratio, dropout, peg_after=None)
        self.out = nn.Linear(dim, in_channels * p2)
        self.patch_embed.apply(init_transformer_weights)
        self.cond_embed.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.mask_emb, std=0.02)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _pad(self, x: Tensor) -> Tensor:
        ph, pw = (-x.shape[-2]) % self.patch, (-x.shape[-1]) % self.patch
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def patch_uncertainty(self, uncertainty: Tensor) -> Tensor:
        """Mean of ``U`` (``B x h x w``) over each patch: ``B x ceil(h/p) x ceil(w/p)``."""
        return F.avg_pool2d(self._pad(uncertainty[:, None].float()), self.patch)[:, 0]

    def patch_mask(self, uncertainty: Tensor) -> Tensor:
        """``m_j = [u_j > tau3]`` capped at ``rho3_max`` of the patches: bool ``B x h_p x w_p``."""
        tau3 = float(self.tau3)
        if math.isnan(tau3):
            raise RuntimeError(
                "DecoderNAT.tau3 is not calibrated: pass tau3=... to the constructor, call calibrate(), or give "
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

        tok = F.pixel_unshuffle(self._pad(h), p).flatten(2).transpose(1, 2)  # B x N x C p^2
        x = self.patch_embed(tok)
        x = torch.where(mask.reshape(b, -1, 1), self.mask_emb.to(x.dtype), x)
        cu = torch.cat([cond_feat.to(h.dtype), uncertainty[:, None].to(h.dtype)], dim=1)
        x = x + self.cond_embed(F.pixel_unshuffle(self._pad(cu), p).flatten(2).transpose(1, 2))
        x = x + sincos_pos_embed_2d(hp, wp, x.shape[-1], x.device, x.dtype)
        x = self.out(self.body(x, (hp, wp)))  # B x N x C p^2
        delta = F.pixel_shuffle(x.transpose(1, 2).reshape(b, -1, hp, wp), p)[:, :, :hh, :ww]
        if self.residual == "all":
            return h + delta, mask
        return torch.where(self.expand_mask(mask, hh, ww), h + delta, h), mask

    def expand_mask(self, mask: Tensor, height: int, width: int) -> Tensor:
        """Patch mask ``B x h_p x w_p`` -> per-pixel bool ``B x 1 x height x width`` (padding cropped)."""
        p = self.patch
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None, :height, :width]
