"""Code-space uncertainty, masks and schedules for the latent NAT refiner (docs/nat.md "Mask schedules").

Everything works on plain tensors (no BasicSR import):

* :func:`knn_codes` - chunked squared distances from each latent vector to the codebook, keeping the
  ``k`` nearest codes (never a full ``N x K`` matrix) plus the argmin (the quantiser's code).
* :func:`code_uncertainty` - ``p0 = softmax(-d / T_d)`` over those codes, normalised entropy, margin, and the
  uncertainty score that masks (the entropy, or a margin score: ``uncertainty.source``).
* :func:`initial_mask` - ``M0 = [H > tau]`` capped at the ``rho_max * N`` highest-entropy positions.
* :func:`mask_schedule` - ``gamma(t/T)`` for ``t = 1..T`` (fraction of ``N0`` still masked).
* :func:`halton_rank` - the rank of each grid position in a 2-D Halton visiting order (``decode.order: halton``).
* :func:`calibrate_dist_temp`, :func:`calibrate_tau` - ``T_d`` = median 2nd-1st gap, ``tau`` = quantile.
* :func:`sample_train_mask` - training mask, top-``m`` of ``beta * H + Gumbel``.
* :func:`topk_mask` - per-sample top-``count`` selection shared by all of the above.

Shapes: latents ``B x C x h x w``; codebook ``K x C``; per-position maps ``B x h x w``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glare_nat_arch.quantize import autocast_off, chunked_code_distances

__all__ = [
    "SCHEDULES",
    "UNCERTAINTY_SOURCES",
    "FLOW_MC_SAMPLES",
    "FLOW_MC_HEAT",
    "histogram_entropy",
    "CodeUncertainty",
    "knn_codes",
    "nearest_codes",
    "code_probs",
    "normalized_entropy",
    "code_uncertainty",
    "topk_mask",
    "initial_mask",
    "mask_schedule",
    "halton_rank",
    "still_masked_counts",
    "gumbel_noise",
    "quantile",
    "calibrate_dist_temp",
    "calibrate_tau",
    "sample_train_mask",
]

SCHEDULES = ("cosine", "linear", "square", "cubic", "arccos", "root")
#: Per-position uncertainty scores :func:`code_uncertainty` computes from the flow output alone (docs/nat.md).
UNCERTAINTY_SOURCES = ("entropy", "margin")
#: ``flow_mc`` (docs/nat.md "Uncertainty sources"): codes of ``FLOW_MC_SAMPLES`` flow samples at heat ``FLOW_MC_HEAT``.
FLOW_MC_SAMPLES = 8
FLOW_MC_HEAT = 0.8


def _check_latent(z: Tensor, codebook: Tensor, name: str = "latent") -> None:
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be K x C, got shape {tuple(codebook.shape)}")
    if z.dim() != 4 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{name} must be B x {codebook.shape[1]} x h x w (codebook dim {codebook.shape[1]}), got {tuple(z.shape)}"
        )


def knn_codes(z: Tensor, codebook: Tensor, k: int, chunk: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
    """Squared distances to the ``k`` nearest codes, computed in row chunks.

    Distances are the quantiser's (:func:`~glare_nat_arch.quantize.squared_code_distances`, float32 or wider,
    autocast off), so ``codes`` equals :meth:`VectorQuantizer.nearest_indices` (argmin, first index on ties): exactly
    when both search in row blocks of the same size, otherwise wherever two codes are not within float rounding of
    a tie (another block size may round the distances differently in the last bit).
    ``codes`` is read off the sorted top-k where the nearest code is unique (``dist[..., 0] < dist[..., 1]``) and
    comes from ``argmin`` only at ties (or for ``k = 1``, or a codebook with non-finite entries): no second pass
    over the ``chunk x K`` block for most rows, the same indices as argmin over the same distances.

    Args:
        z: ``B x C x h x w`` latents.
        codebook: ``K x C`` code vectors.
        k: number of nearest codes kept (clamped to ``K``).
        chunk: rows (positions) per distance block; memory is two ``chunk x K`` float buffers.

    Returns:
        ``dist`` ``B x h x w x k`` (ascending), ``idx`` ``B x h x w x k`` (int64), ``codes`` ``B x h x w`` (int64).
    """
    _check_latent(z, codebook)
    b, c, h, w = z.shape
    k = min(int(k), codebook.shape[0])
    dtype = torch.promote_types(z.dtype, torch.float32)
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, c).to(dtype)
    emb = codebook.detach().to(dtype)
    n = rows.shape[0]
    dists = rows.new_empty(n, k)
    idxs = torch.empty(n, k, dtype=torch.long, device=rows.device)
    codes = torch.empty(n, dtype=torch.long, device=rows.device)
    # topk's order among equal values is unspecified and a NaN distance (non-finite code) ranks differently in
    # topk and argmin: argmin decides those rows
    from_topk = k >= 2 and bool(torch.isfinite(emb).all())
    with torch.no_grad(), autocast_off(rows.device.type):
        for start, d in chunked_code_distances(rows, emb, chunk):
            part = slice(start, start + d.shape[0])
            if k == 1:
                torch.argmin(d, dim=1, out=codes[part])
                torch.gather(d, 1, codes[part, None], out=dists[part])
                idxs[part] = codes[part, None]
                continue
            torch.topk(d, k, dim=1, largest=False, sorted=True, out=(dists[part], idxs[part]))
            if not from_topk:
                torch.argmin(d, dim=1, out=codes[part])
                continue
            codes[part] = idxs[part, 0]
            tie = ~(dists[part, 0] < dists[part, 1])  # equal nearest distances, or NaN (non-finite latent)
            if bool(tie.any()):
                codes[part][tie] = d[tie].argmin(1)
    return dists.reshape(b, h, w, k), idxs.reshape(b, h, w, k), codes.reshape(b, h, w)


def nearest_codes(z: Tensor, codebook: Tensor, chunk: int = 2048) -> Tensor:
    """Nearest-code indices ``B x h x w`` of ``B x C x h x w`` latents (e.g. teacher codes of ``E_vq(I_n)``)."""
    return knn_codes(z, codebook, 1, chunk)[2]


def code_probs(dist: Tensor, dist_temp: float) -> Tensor:
    """``softmax(-dist / dist_temp)`` over the last dim (the kept nearest codes)."""
    if not dist_temp > 0:
        raise ValueError(f"dist_temp must be > 0, got {dist_temp}")
    return torch.softmax(-dist / dist_temp, dim=-1)


def normalized_entropy(probs: Tensor, work: Tensor | None = None) -> Tensor:
    """Entropy of the distributions on the last dim divided by ``log(n)``, clamped to ``[0, 1]``.

    ``work``: a buffer shaped like ``probs`` for the ``p log p`` terms (no autograd through it; same values)."""
    n = probs.shape[-1]
    if n < 2:
        raise ValueError(f"normalized_entropy needs at least 2 outcomes, got {n}")
    terms = torch.special.xlogy(probs, probs) if work is None else torch.special.xlogy(probs, probs, out=work)
    ent = -terms.sum(-1)
    return (ent / math.log(n)).clamp(0.0, 1.0)


def histogram_entropy(codes: Tensor) -> Tensor:
    """Normalised entropy of the empirical code histogram over ``S`` samples (docs/nat.md ``flow_mc``).

    Args:
        codes: ``S x B x h x w`` integer codes (``S >= 2``).

    Returns:
        ``B x h x w`` in ``[0, 1]``: ``-sum_k p_k log p_k / log S`` with ``p_k`` the share of samples on code ``k``
        (0 when all samples agree, 1 when all differ). Computed as ``-mean_s log(n_s / S)``, ``n_s`` the samples that
        share sample ``s``'s code (an ``S x S`` comparison, no histogram over ``K``).
    """
    s = codes.shape[0]
    if s < 2:
        raise ValueError(f"histogram_entropy needs at least 2 samples, got {s}")
    same = (codes[:, None] == codes[None]).sum(1).to(torch.float64)  # S x B x h x w: n_s
    ent = -(torch.log(same / s)).mean(0) / math.log(s)
    return ent.clamp(0.0, 1.0).to(torch.float32)


@dataclass
class CodeUncertainty:
    """Flow-output code distribution summary (all ``B x h x w`` unless noted)."""

    codes: Tensor  # v0: nearest code, int64
    entropy: Tensor  # normalised entropy of p0 in [0, 1]
    margin: Tensor  # d_(2) - d_(1) >= 0
    knn_idx: Tensor  # B x h x w x k nearest code ids
    probs: Tensor  # B x h x w x k, p0 over knn_idx
    score: Tensor  # the uncertainty in [0, 1] that masks and conditions (UNCERTAINTY_SOURCES)


def code_uncertainty(
    z: Tensor, codebook: Tensor, dist_temp: float, knn: int = 64, chunk: int = 2048, source: str = "entropy"
) -> CodeUncertainty:
    """Predictive code distribution of the flow output (docs/nat.md) and its uncertainty score.

    Args:
        z: ``B x C x h x w`` flow output ``x_hat``.
        codebook: ``K x C``.
        dist_temp: distance temperature ``T_d`` (> 0).
        knn: nearest codes kept (``K >= 2`` required).
        source: what ``score`` is (docs/nat.md): ``entropy`` (the normalised entropy ``H``, default) or ``margin``
            (``exp(-(d_(2) - d_(1)) / T_d)``: the top-2 probability ratio ``p(2) / p(1)`` of ``p0``, 1 at a tie, so
            it depends on the two nearest codes only, not on the density of the other ``knn - 2``).
    """
    if codebook.shape[0] < 2:
        raise ValueError(f"codebook needs at least 2 codes, got {codebook.shape[0]}")
    if source not in UNCERTAINTY_SOURCES:
        raise ValueError(f"uncertainty source {source!r} is not supported; choose one of {UNCERTAINTY_SOURCES}")
    dist, idx, codes = knn_codes(z, codebook, max(2, knn), chunk)
    probs = code_probs(dist, dist_temp)
    entropy = normalized_entropy(probs)
    margin = (dist[..., 1] - dist[..., 0]).clamp_min(0.0)
    score = entropy if source == "entropy" else torch.exp(-margin / dist_temp)
    return CodeUncertainty(codes=codes, entropy=entropy, margin=margin, knn_idx=idx, probs=probs, score=score)


def topk_mask(scores: Tensor, counts: Tensor, largest: bool = True) -> Tensor:
    """Per-row selection of the ``counts[b]`` highest (or lowest) scores.

    Args:
        scores: ``B x N``; exclude candidates with ``-inf`` (largest) / ``+inf`` (smallest).
        counts: ``B`` integer counts, each ``<=`` the number of valid candidates in its row.

    Returns:
        ``B x N`` bool mask with exactly ``counts[b]`` True entries per row.
    """
    b, n = scores.shape
    counts = counts.to(device=scores.device, dtype=torch.long).clamp(0, n)
    out = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    k = int(counts.max()) if b else 0
    if k == 0:
        return out
    idx = scores.topk(k, dim=1, largest=largest, sorted=True).indices
    keep = torch.arange(k, device=scores.device)[None] < counts[:, None]
    return out.scatter_(1, idx, keep)


def initial_mask(entropy: Tensor, tau: float, rho_max: float = 0.5) -> Tensor:
    """``M0 = [H > tau]``, keeping at most ``floor(rho_max * N)`` highest-entropy positions per sample.

    Args:
        entropy: ``B x h x w`` normalised entropy.
    Returns:
        ``B x h x w`` bool.
    """
    if not 0.0 <= rho_max <= 1.0:
        raise ValueError(f"rho_max must be in [0, 1], got {rho_max}")
    b = entropy.shape[0]
    flat = entropy.reshape(b, -1)
    above = flat > tau
    cap = int(math.floor(rho_max * flat.shape[1] + 1e-9))
    counts = above.sum(1).clamp(max=cap)
    scores = flat.masked_fill(~above, float("-inf"))
    return topk_mask(scores, counts, largest=True).reshape(entropy.shape)


def mask_schedule(schedule: str | Sequence[float], iters: int) -> list[float]:
    """``gamma(t/T)`` for ``t = 1..T``: the fraction of ``N0`` still masked after round ``t`` (last is 0).

    Args:
        schedule: one of :data:`SCHEDULES` (docs/nat.md), or explicit ratios ``r_1..r_{T-1}`` (a ``T``-th
            value, if given, must be 0), each in ``[0, 1]``.
        iters: ``T >= 1``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if isinstance(schedule, str):
        fns = {
            "cosine": lambda r: math.cos(math.pi * r / 2),
            "linear": lambda r: 1.0 - r,
            "square": lambda r: 1.0 - r**2,
            "cubic": lambda r: 1.0 - r**3,
            "arccos": lambda r: math.acos(r) / (math.pi / 2),
            "root": lambda r: 1.0 - math.sqrt(r),
        }
        if schedule not in fns:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES} or a list of ratios")
        vals = [fns[schedule](t / iters) for t in range(1, iters)]
    else:
        vals = [float(v) for v in schedule]
        if len(vals) == iters and vals and vals[-1] == 0.0:
            vals = vals[:-1]
        if len(vals) != iters - 1:
            raise ValueError(f"schedule list needs {iters - 1} ratios (r_1..r_(T-1)) for iters={iters}, got {schedule}")
        if any(not 0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"schedule ratios must lie in [0, 1], got {schedule}")
    return [min(1.0, max(0.0, v)) for v in vals] + [0.0]


def _radical_inverse(i: Tensor, base: int) -> tuple[Tensor, int]:
    """Van der Corput radical inverse ``phi_base(i) = num / den`` of the non-negative integers ``i``, exactly (integer
    numerators, one denominator ``base^D``); the loop runs over the ``D`` digits, each step over all of ``i``."""
    num, den, i = torch.zeros_like(i), 1, i.clone()
    while bool((i > 0).any()):
        num = num * base + i % base
        i = torch.div(i, base, rounding_mode="floor")
        den *= base
    return num, den


def halton_rank(h: int, w: int, device: torch.device | str = "cpu", oversample: int = 8) -> Tensor:
    """Rank of every position of an ``h x w`` grid (row-major, ``h w`` long ids) in a 2-D Halton visiting order.

    The Halton points ``(phi_2(i), phi_3(i))``, ``i = 0, 1, ...`` (column, row) fall into grid cells; a cell's rank
    is the order of its first visit. The first ``2^a 3^b`` points put one point in each cell of a ``2^a x 3^b``
    division of the image, so every prefix of the order is spread evenly over it (a confidence order clusters).
    ``oversample * h w`` points are drawn; cells they miss (rare) follow in row-major order. Deterministic: the same
    ``(h, w)`` always gives the same ranks.
    """
    n = h * w
    i = torch.arange(oversample * n, dtype=torch.long)
    (num2, den2), (num3, den3) = _radical_inverse(i, 2), _radical_inverse(i, 3)
    col, row = torch.div(num2 * w, den2, rounding_mode="floor"), torch.div(num3 * h, den3, rounding_mode="floor")
    first = torch.full((n,), oversample * n, dtype=torch.long) + torch.arange(n)  # unvisited: after all visits
    first.scatter_reduce_(0, row * w + col, i, reduce="amin")
    return first.argsort().argsort().to(device)


def still_masked_counts(n0: Tensor, n_prev: Tensor, gamma: float) -> Tensor:
    """Positions left masked after a round: ``max(0, min(n_prev - 1, floor(N0 * gamma)))`` (docs/nat.md "Decoding").

    Args:
        n0: ``B`` initial masked counts; n_prev: ``B`` counts masked before the round; gamma: schedule value.
        For the last round pass ``gamma = 0``.
    """
    n_t = torch.floor(n0.double() * gamma + 1e-9).long()
    return torch.minimum(n_t, n_prev.long() - 1).clamp_min(0)


def gumbel_noise(shape: Sequence[int], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) noise (float32) drawn from ``generator`` (or the global RNG)."""
    u = torch.rand(tuple(shape), device=device, generator=generator)
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def quantile(values: Tensor, q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of all entries; no size limit unlike ``torch.quantile``."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    flat = values.reshape(-1).double()
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return float(v_lo + (pos - lo) * (v_hi - v_lo))


def _as_batches(latents: Tensor | Iterable[Tensor]) -> Iterable[Tensor]:
    return [latents] if isinstance(latents, Tensor) else latents


def calibrate_dist_temp(latents: Tensor | Iterable[Tensor], codebook: Tensor, chunk: int = 2048) -> float:
    """``T_d`` = median over all positions of ``d_(2) - d_(1)`` (squared distances, docs/nat.md step 4).

    Args:
        latents: one ``B x C x h x w`` tensor or an iterable of them (flow outputs on training images).
    """
    gaps = []
    for z in _as_batches(latents):
        dist = knn_codes(z, codebook, 2, chunk)[0]
        gaps.append((dist[..., 1] - dist[..., 0]).reshape(-1).cpu())
    if not gaps:
        raise ValueError("calibrate_dist_temp: no latents given")
    t_d = quantile(torch.cat(gaps), 0.5)
    if not t_d > 0:
        raise ValueError(f"calibrate_dist_temp: median code gap is {t_d}; the latents sit on duplicated codes")
    return t_d


def calibrate_tau(
    latents: Tensor | Iterable[Tensor],
    codebook: Tensor,
    dist_temp: float,
    knn: int = 64,
    rho_target: float = 0.25,
    chunk: int = 2048,
    source: str = "entropy",
) -> float:
    """``tau`` = the ``(1 - rho_target)`` quantile over all positions of the uncertainty score (docs/nat.md; the
    normalised entropy by default, see :func:`code_uncertainty` for ``source``)."""
    if not 0.0 <= rho_target <= 1.0:
        raise ValueError(f"rho_target must be in [0, 1], got {rho_target}")
    ents = [
        code_uncertainty(z, codebook, dist_temp, knn, chunk, source).score.reshape(-1).cpu()
        for z in _as_batches(latents)
    ]
    if not ents:
        raise ValueError("calibrate_tau: no latents given")
    return quantile(torch.cat(ents), 1.0 - rho_target)


def sample_train_mask(
    entropy: Tensor,
    r_min: float = 0.05,
    r_max: float = 0.6,
    beta_entropy: float = 4.0,
    generator: torch.Generator | None = None,
    r_dist: str = "uniform",
) -> Tensor:
    """Training mask (docs/nat.md): ``m = max(1, round(r N))`` positions = top-``m`` of ``beta H + Gumbel``.

    Args:
        entropy: ``B x h x w`` normalised entropy.
        r_min, r_max: bounds of ``r ~ U(r_min, r_max)`` (``r_dist='uniform'``); ``'maskgit_cos'`` draws
            ``r = cos(pi u / 2)``, ``u ~ U[0, 1)`` and ``'beta_12_3'`` draws ``r ~ Beta(12, 3)`` (AutoNAT) instead;
            both ignore the bounds.
        beta_entropy: 0 = uniform random positions; ``inf`` = pure top-entropy.
        generator: RNG for ``r`` and the Gumbel noise.

    Returns:
        ``B x h x w`` bool, per sample exactly ``m_b`` True.
    """
    if not 0.0 <= r_min <= r_max <= 1.0:
        raise ValueError(f"need 0 <= r_min <= r_max <= 1, got r_min={r_min}, r_max={r_max}")
    b = entropy.shape[0]
    flat = entropy.reshape(b, -1).float()
    n = flat.shape[1]
    u = torch.rand(b, device=flat.device, generator=generator, dtype=torch.float64)
    if r_dist == "uniform":
        r = r_min + (r_max - r_min) * u
    elif r_dist == "maskgit_cos":
        r = torch.cos(math.pi * u / 2)
    elif r_dist == "beta_12_3":  # AutoNAT: Beta(12, 3) = 12th smallest of 14 uniforms (exact, generator-driven)
        r = torch.rand(b, 14, device=flat.device, generator=generator, dtype=torch.float64).sort(dim=1).values[:, 11]
    else:
        raise ValueError(f"unknown r_dist {r_dist!r}; choose 'uniform', 'maskgit_cos' or 'beta_12_3'")
    counts = torch.round(r * n).long().clamp(1, n)
    g = gumbel_noise(flat.shape, flat.device, generator)
    if math.isinf(beta_entropy):  # pure entropy order; the Gumbel draw only breaks ties (lexicographic)
        perm = g.argsort(dim=1)
        order = perm.gather(1, flat.gather(1, perm).argsort(dim=1, descending=True, stable=True))
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=flat.device).expand(b, n))
        scores = -ranks.float()
    else:
        scores = beta_entropy * flat + g
    return topk_mask(scores, counts, largest=True).reshape(entropy.shape)
