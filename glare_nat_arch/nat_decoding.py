"""Masked iterative decoding of :class:`~glare_nat_arch.nat_arch.LatentNAT` (docs/nat.md "Decoding") and its
feedback into GLARE ("Feedback into GLARE"), as the mixin :class:`MaskedDecoding`.

:meth:`MaskedDecoding.refine` runs three named steps on a :class:`DecodeState`:

1. :meth:`~MaskedDecoding.initial_state`: the flow's nearest codes ``v0``, the uncertainty and the initial mask
   ``M0 = [U > tau]`` (capped at ``rho_max``);
2. :meth:`~MaskedDecoding.decode_round`, once per round ``t = 1..T``: predict the masked tokens, commit the
   confident ones, re-mask the rest (schedule or threshold rule);
3. :meth:`~MaskedDecoding.feed_back`: ``z_out`` for the MF-decoder (hard ``C[v^T]`` or soft expected codes) inside
   the ever-masked set, ``x_hat`` elsewhere.

All steps work on whole ``B x N`` tensors (``N = h w`` positions, row-major); the only Python loops run over rounds
and over ``head_chunk``-row blocks of the MLM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from glare_nat_arch.nat_uncertainty import (
    CodeUncertainty,
    gumbel_noise,
    halton_rank,
    initial_mask,
    normalized_entropy,
    still_masked_counts,
    topk_mask,
)
from glare_nat_arch.quantize import autocast_off, squared_code_distances

__all__ = ["DecodeState", "MaskedDecoding"]


@dataclass
class DecodeState:
    """The decoding state of a batch; ``B x N`` tensors over the ``N = h w`` positions (row-major).

    ``v``: current ids (``K`` = ``[MASK]``); ``mask``: positions still masked; ``union``: ever masked; ``soft``:
    ``B x N x code_dim`` expected codes of the committing distributions (None unless wanted); ``commit_ent``: the
    normalised entropy of each committing distribution (None without statistics); ``flow``: ``B x N x code_dim``
    flow latents for ``decode.flow_prior`` (None when it is 0); ``rank``: the ``N`` Halton ranks of the positions
    for ``decode.order: halton`` (None for the confidence order); ``masks`` / ``tokens``: the ``B x h x w`` mask and
    ids after every executed round; ``rounds``: forward passes run.
    """

    v: Tensor
    mask: Tensor
    union: Tensor
    n0: Tensor
    shape: tuple[int, int, int]
    soft: Tensor | None
    commit_ent: Tensor | None
    flow: Tensor | None = None
    rank: Tensor | None = None
    masks: list[Tensor] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)
    rounds: int = 0


class MaskedDecoding:
    """Decoding methods of :class:`~glare_nat_arch.nat_arch.LatentNAT` (uses its options and network methods)."""

    def _confidence(self, logp: Tensor, pred: Tensor) -> Tensor:
        """Confidence ``N_q`` of the chosen ids ``pred`` under ``logp`` (``N_q x K``)."""
        chosen = logp.gather(1, pred[:, None])[:, 0]
        if self.conf == "logp":
            return chosen
        if self.conf == "neg_entropy":
            return (logp.exp() * logp).sum(1)
        others = logp.scatter(1, pred[:, None], float("-inf")).amax(1)
        return chosen - others

    def _with_flow_prior(self, logp: Tensor, flow_rows: Tensor, book: Tensor, book_sq: Tensor) -> Tensor:
        """``log_softmax(logp + flow_prior * log p_flow)`` (``n x K``): the NAT's distribution times the flow's
        code distribution ``p_flow = softmax(-d / dist_temp)`` over all ``K`` codes (``d``: squared distance of the
        flow latent ``flow_rows`` (``n x code_dim``) to each code of ``book`` (``K x code_dim``, float32; ``book_sq``
        its squared norms); the masking entropy uses the ``knn`` nearest).
        Where the NAT is unsure, the code nearest to the flow latent wins; a large weight keeps the flow's codes."""
        with autocast_off(flow_rows.device.type):
            dist = squared_code_distances(flow_rows.float(), book, book_sq)
        logp_flow = torch.log_softmax(-dist / self._calibrated("dist_temp"), dim=-1)
        return torch.log_softmax(logp + self.flow_prior * logp_flow, dim=-1)

    def _decode_rows(
        self,
        hidden: Tensor,
        current: Tensor,
        masked: Tensor,
        codebook: Tensor,
        generator: torch.Generator | None,
        want_soft: bool = True,
        want_entropy: bool = True,
        flow_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Per query row: prediction, confidence, expected code and normalised entropy of ``softmax(logits)``
        (times the flow's code distribution when ``flow_rows``, ``N_q x code_dim``, are given:
        :meth:`_with_flow_prior`).

        Rows (``hidden`` ``N_q x d``) go through the MLM head ``head_chunk`` at a time, so no ``N_q x K`` tensor is
        ever built (memory: a few ``head_chunk x K`` float32 blocks). ``current`` (``N_q``) are the rows' tokens;
        rows with ``masked`` False (``remask_scope='all'``) keep their token as the prediction.

        Returns ``pred`` (int64), ``conf``, ``soft`` (``N_q x code_dim``, None unless ``want_soft``) and ``entropy``
        (None unless ``want_entropy``), all float32 but ``pred``.
        """
        table = self.tok_emb.weight[: self.codebook_size]
        book = codebook.float()
        book_sq = (book**2).sum(1) if flow_rows is not None else None
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
            if flow_rows is not None:
                logp = self._with_flow_prior(logp, flow_rows[rows], book, book_sq)
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
        want_soft = (stats if soft_codes is None else soft_codes) or self.feedback == "soft"
        state, unc = self.initial_state(x_hat, codebook, score, stats, want_soft)
        b, h, w = state.shape
        out: dict[str, Any] = {"codes_init": unc.codes, "entropy": unc.entropy, "margin": unc.margin}
        out.update(score=unc.score, mask_init=state.mask.reshape(b, h, w), n0=state.n0)
        # the conditioning is the same in every round (unless masked positions hide the latent): project it once
        cond_feat = None
        if not self.mask_hides_latent and bool(state.mask.any()):
            cond_feat = self.cond_features(x_hat, color_map, cond, unc.score, state.v.reshape(b, h, w))

        def hidden_of(tokens: Tensor, query: Tensor) -> Tensor:
            return self.query_features(tokens, x_hat, color_map, cond, unc.score, query, cond_feat)

        t_exec = self.iters if self.early_stop is None else self.early_stop
        for t in range(1, t_exec + 1):
            if not bool(state.mask.any()):  # everything committed (n_t is then 0 in both scopes)
                break
            self.decode_round(state, t, t_exec, hidden_of, codebook, generator, stats)
        out.update(self.feed_back(state, x_hat, codebook, unc.score))
        return out

    def initial_state(
        self, x_hat: Tensor, codebook: Tensor, score: Tensor | None, stats: bool, want_soft: bool
    ) -> tuple[DecodeState, CodeUncertainty]:
        """Step 1: flow codes ``v0``, uncertainty ``U`` and ``M0 = [U > tau]`` (at most ``rho_max`` of each image).

        Args:
            x_hat: ``B x code_dim x h x w``; codebook: ``K x code_dim``; score: ``flow_mc`` map ``B x h x w``.

        Returns:
            the state before round 1 (ids ``[MASK]`` on ``M0``, ``v0`` elsewhere) and the flow uncertainty.
        """
        unc = self.uncertainty(x_hat, codebook, score)
        m0 = initial_mask(unc.score, self._calibrated("tau"), self.rho_max)
        b, h, w = unc.codes.shape
        mask = m0.reshape(b, h * w)
        v0 = unc.codes.reshape(b, h * w)
        soft = codebook.to(x_hat.dtype)[v0] if want_soft else None  # B x N x code_dim
        state = DecodeState(
            v=torch.where(mask, self.mask_token_id, v0),
            mask=mask,
            union=mask.clone(),
            n0=mask.sum(1),
            shape=(b, h, w),
            soft=soft,
            commit_ent=unc.score.reshape(b, h * w).clone() if stats else None,
            flow=x_hat.flatten(2).transpose(1, 2) if self.flow_prior > 0 else None,
            rank=halton_rank(h, w, x_hat.device) if self.order == "halton" else None,
        )
        return state, unc

    def decode_round(
        self,
        state: DecodeState,
        t: int,
        t_exec: int,
        hidden_of: Callable[[Tensor, Tensor], Tensor],
        codebook: Tensor,
        generator: torch.Generator | None,
        stats: bool,
    ) -> None:
        """Step 2, round ``t`` of ``t_exec``: predict the queried tokens, commit all but the positions that stay
        masked, update ``state`` in place.

        ``hidden_of(tokens, query)`` gives the ``N_q x dim`` hidden states of the bool ``B x h x w`` ``query``
        positions for ``B x h x w`` ``tokens`` (:meth:`LatentNAT.query_features` with the round's inputs). The
        query is the masked set (``remask_scope='new_only'``) or everything (``'all'``). Stay masked: the
        ``n_t = N0 gamma(t/T)`` least confident (``remask_rule='schedule'``), or those whose NAT entropy exceeds
        ``tau`` (``'threshold'``, none after the last round).
        """
        b, h, w = state.shape
        mask, v = state.mask, state.v
        query = mask if self.remask_scope == "new_only" else torch.ones_like(mask)
        state.rounds += 1
        hidden = hidden_of(v.reshape(b, h, w), query.reshape(b, h, w))
        pred, conf, soft_q, ent_q = self._decode_rows(
            hidden,
            v[query],
            mask[query],
            codebook,
            generator,
            want_soft=state.soft is not None,
            want_entropy=stats or self.remask_rule == "threshold",
            flow_rows=None if state.flow is None else state.flow[query],
        )
        new_mask = self.still_masked(state, query, conf, ent_q, t, t_exec, generator)
        self.commit(state, query, pred, new_mask, soft_q, ent_q)

    def still_masked(
        self,
        state: DecodeState,
        query: Tensor,
        conf: Tensor,
        ent_q: Tensor | None,
        t: int,
        t_exec: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """``M_t`` (bool ``B x N``) from the ``N_q`` query rows' confidence ``conf`` (plus the annealed Gumbel
        noise ``choice_temp (1 - t/T)``), their Halton rank (``order='halton'``: the confidence is ignored) or NAT
        entropy ``ent_q`` (``remask_rule='threshold'``)."""
        if self.choice_temp > 0:  # drawn under either rule, so that the generator advances alike
            conf = conf + self.choice_temp * (1.0 - t / self.iters) * gumbel_noise(conf.shape, conf.device, generator)
        if self.remask_rule == "threshold":  # M_t = {i in M_(t-1): H_NAT(i) > tau}, M_T empty (query = mask here)
            new_mask = torch.zeros_like(state.mask)
            if t < t_exec:
                new_mask[query] = ent_q > self._calibrated("tau")
            return new_mask
        n_t = still_masked_counts(state.n0, state.mask.sum(1), 0.0 if t == t_exec else self.gammas[t - 1])
        scores = torch.full(state.mask.shape, float("inf"), device=conf.device)
        if state.rank is not None:  # decode.order: halton - the earliest Halton positions commit, the latest stay
            conf = -state.rank.to(conf.dtype).expand(state.mask.shape)[query]
        scores[query] = conf
        return topk_mask(scores, n_t, largest=False)

    def commit(
        self,
        state: DecodeState,
        query: Tensor,
        pred: Tensor,
        new_mask: Tensor,
        soft_q: Tensor | None,
        ent_q: Tensor | None,
    ) -> None:
        """Write the round into ``state``: predictions ``pred`` (``N_q``) at the query rows, ``[MASK]`` on
        ``new_mask`` (``B x N``); the newly committed positions keep their expected code ``soft_q`` and NAT entropy
        ``ent_q`` (``N_q x code_dim`` / ``N_q``, when computed)."""
        b, h, w = state.shape
        pred_full = state.v.clone()
        pred_full[query] = pred
        committed = state.mask & ~new_mask
        committed_q = committed[query]
        if state.soft is not None and soft_q is not None:
            state.soft = state.soft.index_put((committed,), soft_q[committed_q].to(state.soft.dtype))
        if state.commit_ent is not None and ent_q is not None:
            state.commit_ent[committed] = ent_q[committed_q].to(state.commit_ent.dtype)
        state.v = torch.where(new_mask, self.mask_token_id, pred_full)
        state.mask = new_mask
        state.union |= new_mask
        state.masks.append(new_mask.reshape(b, h, w).clone())
        state.tokens.append(state.v.reshape(b, h, w).clone())

    def feed_back(self, state: DecodeState, x_hat: Tensor, codebook: Tensor, score: Tensor) -> dict[str, Any]:
        """Step 3: the decoded codes fed back into GLARE (docs/nat.md "Feedback into GLARE").

        Args:
            x_hat: ``B x code_dim x h x w``; codebook: ``K x code_dim``; score: ``B x h x w`` flow uncertainty.

        Returns:
            ``z_out`` (``x_hat`` itself when nothing was masked), ``z_q`` = ``C[v^T]``, ``codes`` v^T, ``masks``,
            ``tokens``, ``mask_union``, ``uncertainty`` (committing entropy where ever masked, else ``score``),
            ``soft_codes`` and ``rounds`` (see :meth:`refine`).
        """
        if bool((state.v == self.mask_token_id).any()):  # pragma: no cover - guarded by n_T = 0
            raise RuntimeError("LatentNAT.refine: [MASK] tokens left after the last round")
        b, h, w = state.shape
        codes = state.v.reshape(b, h, w)
        z_q = codebook.to(x_hat.dtype)[codes].permute(0, 3, 1, 2)
        union_map = state.union.reshape(b, 1, h, w)
        soft_map = None
        if state.soft is not None:
            soft_map = torch.where(union_map, state.soft.reshape(b, h, w, -1).permute(0, 3, 1, 2), z_q)
        if not bool(state.union.any()):
            z_out = x_hat  # N0 = 0: GLARE's own latent, untouched
        else:
            z_out = torch.where(union_map, z_q if self.feedback == "hard" else soft_map, x_hat)
        uncertainty = None
        if state.commit_ent is not None:
            uncertainty = torch.where(state.union, state.commit_ent, score.reshape(b, h * w)).reshape(b, h, w)
        return {
            "z_out": z_out,
            "z_q": z_q,
            "codes": codes,
            "masks": state.masks,
            "tokens": state.tokens,
            "mask_union": state.union.reshape(b, h, w),
            "uncertainty": uncertainty,
            "soft_codes": soft_map,
            "rounds": state.rounds,
        }
