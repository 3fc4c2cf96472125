"""NAT building blocks: transformer, code uncertainty, masks and schedules, masked CE and training masks."""

from __future__ import annotations

import math

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glare_nat_arch.nat_arch import LatentNAT
from glare_nat_arch.nat_head import masked_ce_loss
from glare_nat_arch.nat_uncertainty import (
    calibrate_dist_temp,
    calibrate_tau,
    code_uncertainty,
    histogram_entropy,
    initial_mask,
    knn_codes,
    mask_schedule,
    sample_train_mask,
    still_masked_counts,
)
from glare_nat_arch.quantize import VectorQuantizer, chunked_code_distances, squared_code_distances
from glare_nat_arch.transformer import TransformerBlock, TransformerStack, sincos_pos_embed_2d
from tests.nat_helpers import K, MaxTensorSize, dyadic, inputs, tiny_latent_nat
from tests.tolerance import (
    assert_close_for,
    assert_same_codes,
    code_distance_scale,
    code_distance_tolerance,
)


# ---------------------------------------------------------------- transformer
def test_sincos_pos_embed_2d_layout():
    pe = sincos_pos_embed_2d(3, 5, 8)
    assert pe.shape == (15, 8)
    # row 0, col 0: sin = 0, cos = 1 in both halves
    assert torch.allclose(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    # first half depends on the row only, second half on the column only
    grid = pe.reshape(3, 5, 8)
    assert torch.equal(grid[:, 0, :4], grid[:, 4, :4]) and torch.equal(grid[0, :, 4:], grid[2, :, 4:])
    assert torch.allclose(grid[2, 0, 0], torch.tensor(math.sin(2.0)))
    assert len({tuple(r.tolist()) for r in pe}) == 15
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_pos_embed_2d(2, 2, 6)


def test_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    stack = TransformerStack(16, depth=2, heads=4, peg_after=1)
    y = stack(torch.randn(2, 12, 16), (3, 4))
    assert y.shape == (2, 12, 16)
    assert calls == [(2, 4, 12, 4), (2, 4, 12, 4)]


def test_long_sequence_never_materialises_n_by_n():
    n = 4096
    blk = TransformerBlock(32, heads=2).eval()
    with torch.no_grad(), MaxTensorSize() as rec:
        y = blk(torch.randn(1, n, 32))
    assert y.shape == (1, n, 32)
    assert rec.max_numel < n * n // 8, f"an op produced {rec.max_numel} elements (N*N = {n * n})"
    assert any("scaled_dot_product" in op for op in rec.ops)


def test_transformer_stack_query_rows_match_and_cost_less():
    """``TransformerStack(query_idx)`` returns the full output's rows (float32 rounding) with a Q-row last block."""
    torch.manual_seed(0)
    stack = TransformerStack(32, depth=3, heads=4, peg_after=1).eval()
    x = torch.randn(2, 20, 32)
    idx = torch.tensor([[3, 0, 19], [5, 5, 7]])
    with torch.no_grad(), MaxTensorSize() as rec:
        part = stack(x, (4, 5), query_idx=idx)
    full = stack(x, (4, 5))
    assert torch.allclose(part, full.gather(1, idx[..., None].expand(-1, -1, 32)), atol=1e-5)
    assert (2, 3, 128) in rec.shapes and (2, 20, 128) in rec.shapes  # last MLP on 3 rows, earlier ones on 20


# ---------------------------------------------------------------- uncertainty
def test_knn_codes_match_brute_force_and_other_chunk_sizes():
    """Another formula (``cdist``) and other chunk sizes round differently: the nearest codes agree wherever the
    distances separate them by more than rounding, the distances agree within it."""
    x_hat, codebook, _, _ = inputs(h=5, w=6)
    rows = x_hat.permute(0, 2, 3, 1).reshape(-1, 3)
    tol = code_distance_tolerance(rows, codebook)
    dist, idx, codes = knn_codes(x_hat, codebook, 8, chunk=7)
    full = torch.cdist(rows, codebook) ** 2
    assert_same_codes(codes.reshape(-1), full.argmin(1), full, tol, min_decided=1.0)
    assert torch.allclose(dist.reshape(-1, 8), full.topk(8, largest=False).values, atol=1e-5)
    assert torch.equal(idx[..., 0], codes)  # read off the same top-k
    assert (dist.diff(dim=-1) >= 0).all()
    d2, i2, c2 = knn_codes(x_hat, codebook, 8, chunk=4096)
    assert_same_codes(c2, codes, full.reshape(2, 5, 6, -1), tol.reshape(2, 5, 6), min_decided=1.0)
    assert_same_codes(i2, idx, full.reshape(2, 5, 6, -1), tol.reshape(2, 5, 6), min_decided=1.0)
    assert_close_for(d2, dist, reduction=5, scale=float(code_distance_scale(rows, codebook).max()))


def test_knn_codes_break_ties_and_nan_like_the_quantisers_argmin():
    """``codes`` comes from the sorted top-k except at ties and non-finite distances, where argmin (first index)
    decides: duplicated codes (exact ties), a NaN latent and a codebook with an inf entry all give argmin's index.
    Latents and codes on a dyadic grid: every path computes the same exact distances, so ties are real ties."""
    book = dyadic(40, 3, seed=5)
    book = torch.cat([book, book[:10]])  # codes 40..49 duplicate 0..9: every latent nearest to one of them ties
    z = torch.cat([book[:10].t().reshape(1, 3, 2, 5), dyadic(1, 3, 2, 5, seed=6)], dim=2)
    z[0, :, 3, 4] = float("nan")
    for cb in (book, torch.cat([book, torch.tensor([[float("inf"), 0.0, 0.0]])])):
        rows = z.permute(0, 2, 3, 1).reshape(-1, 3)
        ref = squared_code_distances(rows, cb, (cb**2).sum(1)).argmin(1).reshape(1, 4, 5)
        for k, chunk in ((1, 3), (2, 7), (8, 4096)):
            dist, idx, codes = knn_codes(z, cb, k, chunk=chunk)
            assert torch.equal(codes, ref), (k, chunk)
            assert dist.shape == (1, 4, 5, k) and idx.shape == (1, 4, 5, k)
        if cb is book:
            assert torch.equal(ref[0, :2].reshape(-1), torch.arange(10))  # the ties were real: first index won
        else:
            assert (ref == 50).sum() >= 3  # NaN distances to the inf code win argmin: topk alone would disagree


def test_chunked_code_distances_match_the_one_shot_formula_within_rounding():
    """Chunks of 5 rows and one block of 23 run the same operations, but BLAS may pick other kernels by row count
    (MKL on AVX-512 CPUs: 1 ulp apart): distances agree within rounding, nearest codes wherever decided; on exactly
    representable inputs every kernel gives the same distances."""
    g = torch.Generator().manual_seed(6)
    rows, cb = torch.randn(23, 3, generator=g) * 50, torch.randn(64, 3, generator=g) * 50
    ref = squared_code_distances(rows, cb, (cb**2).sum(1))
    got = torch.cat([d.clone() for _, d in chunked_code_distances(rows, cb, 5)])  # buffers reused: copy each
    tol = code_distance_tolerance(rows, cb)
    assert_close_for(got, ref, reduction=5, scale=float(code_distance_scale(rows, cb).max()))
    assert_same_codes(got.argmin(1), ref.argmin(1), ref, tol, min_decided=1.0)
    rows, cb = dyadic(23, 3, seed=7), dyadic(64, 3, seed=8)
    ref = squared_code_distances(rows, cb, (cb**2).sum(1))
    assert torch.equal(torch.cat([d.clone() for _, d in chunked_code_distances(rows, cb, 5)]), ref)


def test_knn_codes_pick_the_quantisers_code_even_under_autocast():
    """v0 must be the VQGAN quantiser's nearest code (the decoder relies on it): both use one distance, in float32
    with autocast off. Under bf16 autocast a bf16 matmul would pick other codes among 8192 close 3-D codes."""
    g = torch.Generator().manual_seed(3)
    vq = VectorQuantizer(8192, 3)
    vq.embedding.weight.data = torch.randn(8192, 3, generator=g)
    z = torch.randn(2, 3, 20, 24, generator=g)
    ref = vq.nearest_indices(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = knn_codes(z, vq.embedding.weight, 4, chunk=100)[2]
        bf16 = (z.permute(0, 2, 3, 1).reshape(-1, 3) @ vq.embedding.weight.t()).dtype
    assert bf16 == torch.bfloat16  # autocast is really on for a plain matmul here
    # chunks of 100 rows against the quantiser's one block: the same codes wherever rounding cannot decide
    rows, book = z.permute(0, 2, 3, 1).reshape(-1, 3), vq.embedding.weight
    dist = squared_code_distances(rows, book, (book**2).sum(1)).reshape(2, 20, 24, -1)
    assert_same_codes(codes, ref, dist, code_distance_tolerance(rows, book).reshape(2, 20, 24))


def test_entropy_in_unit_interval_and_tracks_ambiguity():
    codebook = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0], [9.0, 0, 0]])
    # one latent on a code (unambiguous), one half-way between two codes (ambiguous)
    z = torch.tensor([[0.0, 0, 0], [0.5, 0, 0]]).t().reshape(1, 3, 1, 2)
    unc = code_uncertainty(z, codebook, dist_temp=0.1, knn=4)
    assert ((unc.entropy >= 0) & (unc.entropy <= 1)).all()
    assert unc.entropy[0, 0, 0] < 0.01 and unc.entropy[0, 0, 1] > 0.45
    assert torch.allclose(unc.margin, torch.tensor([[[1.0, 0.0]]]), atol=1e-6)
    rnd = code_uncertainty(*inputs()[:2], dist_temp=0.5, knn=8)
    assert ((rnd.entropy >= 0) & (rnd.entropy <= 1)).all() and rnd.entropy.shape == (2, 7, 9)


def test_dist_temp_is_median_gap_on_constructed_example():
    codebook = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [7.0, 0, 0]])
    xs = torch.tensor([0.0, 0.5, 3.0, 7.0, 2.0])  # gaps d(2)-d(1): 1, 0, 4, 16, 0 -> median 1
    z = torch.stack([xs, torch.zeros(5), torch.zeros(5)]).reshape(1, 3, 1, 5)
    assert calibrate_dist_temp(z, codebook) == pytest.approx(1.0)
    xs2 = torch.tensor([0.0, 3.0, 7.0, 0.25])  # gaps 1, 4, 16, 0.5 (0.5625-0.0625) -> median 2.5 (numpy)
    z2 = torch.stack([xs2, torch.zeros(4), torch.zeros(4)]).reshape(1, 3, 1, 4)
    assert calibrate_dist_temp([z2[..., :2], z2[..., 2:]], codebook) == pytest.approx(np.median([1, 4, 16, 0.5]))


def test_tau_calibration_is_entropy_quantile_and_stored_in_state_dict():
    x_hat, codebook, _, _ = inputs()
    net = tiny_latent_nat(dist_temp=None, tau=None)
    with pytest.raises(RuntimeError, match="not calibrated"):
        net.refine(*inputs())
    cal = net.calibrate([x_hat[:1], x_hat[1:]], codebook, rho_target=0.25)
    ent = code_uncertainty(x_hat, codebook, cal["dist_temp"], knn=8).entropy
    assert cal["tau"] == pytest.approx(float(np.quantile(ent.numpy(), 0.75)), abs=1e-6)
    assert cal["tau"] == pytest.approx(calibrate_tau(x_hat, codebook, cal["dist_temp"], knn=8, rho_target=0.25))
    fresh = tiny_latent_nat(dist_temp=None, tau=None)
    fresh.load_state_dict(net.state_dict())
    assert float(fresh.tau) == pytest.approx(cal["tau"]) and float(fresh.dist_temp) == pytest.approx(cal["dist_temp"])
    assert 0.15 < fresh.refine(x_hat, codebook, *inputs()[2:])["mask_init"].float().mean() < 0.35


def test_initial_mask_threshold_and_cap():
    ent = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2], [0.1, 0.1, 0.1, 0.95, 0.1]]).reshape(2, 1, 5)
    m = initial_mask(ent, tau=0.5, rho_max=0.4)  # cap = floor(0.4 * 5) = 2
    assert m.reshape(2, 5).tolist() == [[True, False, True, False, False], [False, False, False, True, False]]
    assert initial_mask(ent, tau=1.0).sum() == 0


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "name,expected",
    [
        ("cosine", [0.924, 0.707, 0.383, 0.0]),
        ("linear", [0.75, 0.50, 0.25, 0.0]),
        ("square", [0.938, 0.75, 0.438, 0.0]),
        ("arccos", [0.839, 0.667, 0.460, 0.0]),
        ("root", [0.5, 0.293, 0.134, 0.0]),
    ],
)
def test_schedule_matches_nat_md_table(name, expected):
    assert mask_schedule(name, 4) == pytest.approx(expected, abs=1e-3)


def test_schedule_lists_and_errors():
    assert mask_schedule([0.880, 0.746, 0.407], 4) == [0.880, 0.746, 0.407, 0.0]
    assert mask_schedule([0.5, 0.0], 2) == [0.5, 0.0]
    assert mask_schedule("cosine", 1) == [0.0]
    with pytest.raises(ValueError, match="unknown schedule"):
        mask_schedule("cosin", 4)
    with pytest.raises(ValueError, match="needs 3 ratios"):
        mask_schedule([0.5], 4)


def test_commit_counts_for_n0_3750_match_nat_md():
    n0 = torch.tensor([3750])
    left, commits = n0, []
    for t, g in enumerate(mask_schedule("cosine", 4), start=1):
        new = still_masked_counts(n0, left, 0.0 if t == 4 else g)
        commits.append(int(left - new))
        left = new
    assert commits == [286, 813, 1216, 1435]


# ---------------------------------------------------------------- losses and training masks
def test_masked_ce_ignores_visible_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 9, K, generator=g)
    targets = torch.randint(0, K, (2, 7, 9), generator=g)
    mask = torch.rand(2, 7, 9, generator=g) < 0.3
    loss = masked_ce_loss(logits, targets, mask)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    assert torch.equal(masked_ce_loss(changed, targets, mask), loss)
    assert torch.equal(masked_ce_loss(logits[mask], targets[mask]), loss)
    # label smoothing 0.1: (1 - eps) * CE + eps * mean_k(-log p_k)
    logp = logits[mask].log_softmax(-1)
    manual = (0.9 * -logp.gather(1, targets[mask][:, None])[:, 0] - 0.1 * logp.mean(1)).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    leaf = logits.clone().requires_grad_(True)
    empty = masked_ce_loss(leaf, targets, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0 and leaf.grad is not None


def test_train_mask_counts_bias_and_determinism():
    ent = torch.rand(4, 10, 10, generator=torch.Generator().manual_seed(0))
    m1 = LatentNAT.train_mask(ent, 0.05, 0.6, 4.0, torch.Generator().manual_seed(5))
    m2 = LatentNAT.train_mask(ent, 0.05, 0.6, 4.0, torch.Generator().manual_seed(5))
    assert torch.equal(m1, m2)
    counts = m1.reshape(4, -1).sum(1)
    assert ((counts >= 5) & (counts <= 60)).all()
    top = sample_train_mask(ent, 0.3, 0.3, math.inf, torch.Generator().manual_seed(1))
    flat = ent.reshape(4, -1)
    assert torch.equal(top.reshape(4, -1), flat >= flat.topk(30, dim=1).values[:, -1:])
    assert sample_train_mask(torch.zeros(1, 1, 3), 0.0, 0.0).sum() == 1  # m = max(1, round(rN))
    many = ent[:1].expand(64, 10, 10)
    biased = sample_train_mask(many, 0.2, 0.2, 4.0, torch.Generator().manual_seed(2))
    uniform = sample_train_mask(many, 0.2, 0.2, 0.0, torch.Generator().manual_seed(2))
    assert abs(many[uniform].mean() - ent[0].mean()) < 0.05  # beta = 0: positions unrelated to entropy
    assert many[biased].mean() > many[uniform].mean() + 0.15


def test_train_mask_ratio_distributions():
    ent = torch.zeros(4000, 1, 100)
    counts = {}
    for r_dist in ("uniform", "maskgit_cos", "beta_12_3"):
        m = sample_train_mask(ent, 0.05, 0.6, 0.0, torch.Generator().manual_seed(3), r_dist=r_dist)
        counts[r_dist] = m.reshape(4000, -1).sum(1).double() / 100
    assert abs(counts["uniform"].mean() - 0.325) < 0.01 and counts["uniform"].min() >= 0.05
    assert abs(counts["maskgit_cos"].mean() - 2 / math.pi) < 0.015  # E[cos(pi u / 2)] = 2 / pi
    beta = counts["beta_12_3"]  # Beta(12, 3): mean 0.8, sd 0.1
    assert abs(beta.mean() - 0.8) < 0.01 and abs(beta.std() - 0.1) < 0.01
    with pytest.raises(ValueError, match="r_dist"):
        sample_train_mask(ent[:1], r_dist="beta")


def test_histogram_entropy_of_flow_samples():
    codes = torch.tensor([[3, 3, 3, 3], [1, 2, 3, 4], [5, 5, 6, 6], [7, 7, 7, 8]]).t().reshape(4, 1, 1, 4)  # S = 4
    ent = histogram_entropy(codes)[0, 0]
    p = torch.tensor([0.75, 0.25])
    expected = [0.0, 1.0, 0.5, float(-(p * p.log()).sum() / math.log(4))]
    assert torch.allclose(ent, torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match="2 samples"):
        histogram_entropy(codes[:1])
