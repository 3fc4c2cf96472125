"""NAT refiners: transformer block, code uncertainty, masks/schedules, LatentNAT decoding, DecoderNAT."""

from __future__ import annotations

import math

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from torch.utils._python_dispatch import TorchDispatchMode

from glare_nat_arch.nat_arch import DecoderNAT, LatentNAT, masked_ce_loss
from glare_nat_arch.nat_uncertainty import (
    calibrate_dist_temp,
    calibrate_tau,
    code_uncertainty,
    histogram_entropy,
    initial_mask,
    knn_codes,
    mask_schedule,
    normalized_entropy,
    sample_train_mask,
    still_masked_counts,
)
from glare_nat_arch.quantize import VectorQuantizer, chunked_code_distances, squared_code_distances
from glare_nat_arch.transformer import TransformerBlock, TransformerStack, sincos_pos_embed_2d
from tests.tolerance import (
    assert_close_for,
    assert_same_codes,
    code_distance_scale,
    code_distance_tolerance,
    tolerance,
)

K = 32  # tiny codebook
COND = 4


def tiny_latent_nat(**kw) -> LatentNAT:
    opts = dict(dim=32, depth=2, heads=2, dropout=0.0, cond_channels=COND, knn=8, dist_temp=0.05, tau=0.0)
    opts.update(kw)
    torch.manual_seed(0)
    return LatentNAT(K, **opts).eval()


def inputs(b: int = 2, h: int = 7, w: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(K, 3, generator=g)
    x_hat = torch.randn(b, 3, h, w, generator=g)
    color_map = torch.randn(b, 3, h, w, generator=g)
    cond = torch.rand(b, COND, h, w, generator=g)
    return x_hat, codebook, color_map, cond


class MaxTensorSize(TorchDispatchMode):
    """Records the largest tensor any aten op produces, the op names and the output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.ops: set[str] = set()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.max_numel = max(self.max_numel, o.numel())
                self.shapes.add(tuple(o.shape))
        return out


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


def _dyadic(*shape: int, seed: int) -> torch.Tensor:
    """Values k/4, |k| <= 8: squared distances of such vectors are exact in float32 along any path."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float() / 4


def test_knn_codes_break_ties_and_nan_like_the_quantisers_argmin():
    """``codes`` comes from the sorted top-k except at ties and non-finite distances, where argmin (first index)
    decides: duplicated codes (exact ties), a NaN latent and a codebook with an inf entry all give argmin's index.
    Latents and codes on a dyadic grid: every path computes the same exact distances, so ties are real ties."""
    book = _dyadic(40, 3, seed=5)
    book = torch.cat([book, book[:10]])  # codes 40..49 duplicate 0..9: every latent nearest to one of them ties
    z = torch.cat([book[:10].t().reshape(1, 3, 2, 5), _dyadic(1, 3, 2, 5, seed=6)], dim=2)
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
    rows, cb = _dyadic(23, 3, seed=7), _dyadic(64, 3, seed=8)
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


# ---------------------------------------------------------------- LatentNAT network
def test_registry_and_default_size():
    assert "LatentNAT" in ARCH_REGISTRY and "DecoderNAT" in ARCH_REGISTRY
    net = build_network({"type": "LatentNAT", "codebook_size": 8192})
    n_params = sum(p.numel() for p in net.parameters())
    assert 14e6 < n_params < 16.5e6  # nat.md §3.5: about 15M
    assert net.mask_token_id == 8192 and net.tok_emb.weight.shape == (8193, 384)


@pytest.mark.parametrize("merge,h,w", [(2, 7, 9), (2, 8, 6), (1, 5, 3)])
def test_logits_only_at_query_positions_any_size(merge, h, w):
    net = tiny_latent_nat(merge=merge)
    x_hat, codebook, color_map, cond = inputs(h=h, w=w)
    tokens = torch.randint(0, K + 1, (2, h, w), generator=torch.Generator().manual_seed(0))
    query = tokens == K
    rows = []
    net.head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    logits = net(tokens, x_hat, color_map, cond, torch.rand(2, h, w), query)
    assert logits.shape == (int(query.sum()), K)
    assert rows == [int(query.sum())]
    assert net.features(tokens, x_hat, color_map, cond, torch.rand(2, h, w)).shape == (2, h, w, 32)


def test_bad_inputs_name_the_argument():
    net = tiny_latent_nat()
    x_hat, codebook, color_map, cond = inputs()
    with pytest.raises(ValueError, match="cond must have shape"):
        net.refine(x_hat, codebook, color_map, cond[:, :2])
    with pytest.raises(ValueError, match="codebook must be 32 x 3"):
        net.refine(x_hat, codebook[:5], color_map, cond)
    with pytest.raises(ValueError, match="remask_scope"):
        LatentNAT(K, remask_scope="everything")


def test_mask_hides_latent_removes_x_hat_at_masked_positions():
    x_hat, _, color_map, cond = inputs()
    tokens = torch.randint(0, K, (2, 7, 9), generator=torch.Generator().manual_seed(3))
    tokens[:, 2:4, 3:6] = K
    query = tokens == K
    bumped = x_hat.clone()
    bumped[:, :, 2:4, 3:6] += 1.0
    ent = torch.rand(2, 7, 9)
    for hides, same in ((True, True), (False, False)):
        net = tiny_latent_nat(mask_hides_latent=hides)
        a = net(tokens, x_hat, color_map, cond, ent, query)
        b = net(tokens, bumped, color_map, cond, ent, query)
        assert torch.equal(a, b) is same


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


# ---------------------------------------------------------------- Algorithm B
def test_nothing_masked_returns_flow_output_bit_identical():
    net = tiny_latent_nat(tau=1.0)
    x_hat, codebook, color_map, cond = inputs()
    rows = []
    net.head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    out = net.refine(x_hat, codebook, color_map, cond)
    assert out["z_out"] is x_hat and out["rounds"] == 0 and rows == []
    assert torch.equal(out["codes"], out["codes_init"])
    assert torch.equal(out["z_q"], codebook[out["codes_init"]].permute(0, 3, 1, 2))
    assert out["mask_init"].sum() == 0 and out["n0"].tolist() == [0, 0]


@pytest.mark.parametrize("conf", ["logp", "neg_entropy", "margin"])
def test_masks_shrink_commits_equal_n0_and_committed_tokens_stay(conf):
    net = tiny_latent_nat(conf=conf, rho_max=0.5)
    x_hat, codebook, color_map, cond = inputs()
    rows = []
    net.head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    out = net.refine(x_hat, codebook, color_map, cond)
    m0, masks, toks = out["mask_init"], out["masks"], out["tokens"]
    assert out["n0"].tolist() == [31, 31]  # tau = 0 masks everything, capped at floor(0.5 * 63)
    assert len(masks) == 4 and out["rounds"] == 4 and not masks[-1].any()
    prev_mask, prev_tok = m0, torch.where(m0, K, out["codes_init"])
    commits = torch.zeros(2, dtype=torch.long)
    expected_left = [[n, n] for n in (28, 21, 11, 0)]  # floor(31 * cos(pi t / 8)), t = 1..3, then 0
    for t, (m, tok) in enumerate(zip(masks, toks)):
        assert rows[t] == int(prev_mask.sum())  # logits only for the still-masked positions
        assert not (m & ~prev_mask).any()  # only shrinks
        assert m.reshape(2, -1).sum(1).tolist() == expected_left[t]
        assert torch.equal(tok[~prev_mask], prev_tok[~prev_mask])  # committed tokens never change
        assert (tok[m] == K).all() and (tok[~m] < K).all()
        commits += (prev_mask & ~m).reshape(2, -1).sum(1)
        prev_mask, prev_tok = m, tok
    assert torch.equal(commits, out["n0"])
    assert torch.equal(out["codes"], toks[-1])
    assert torch.equal(out["codes"][~m0], out["codes_init"][~m0])
    keep = ~m0[:, None].expand_as(x_hat)
    assert torch.equal(out["z_out"][keep], x_hat[keep])
    assert torch.equal(out["z_out"][~keep], out["z_q"][~keep])
    assert torch.equal(out["mask_union"], m0)
    assert ((out["uncertainty"] >= 0) & (out["uncertainty"] <= 1)).all()


def test_greedy_refine_is_deterministic_and_sampling_follows_generator():
    x_hat, codebook, color_map, cond = inputs()
    net = tiny_latent_nat()
    a, b = net.refine(x_hat, codebook, color_map, cond), net.refine(x_hat, codebook, color_map, cond)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["z_out"], b["z_out"])
    samp = tiny_latent_nat(sample_temp=1.0, choice_temp=4.5)
    s1 = samp.refine(x_hat, codebook, color_map, cond, torch.Generator().manual_seed(7))
    s2 = samp.refine(x_hat, codebook, color_map, cond, torch.Generator().manual_seed(7))
    s3 = samp.refine(x_hat, codebook, color_map, cond, torch.Generator().manual_seed(8))
    assert torch.equal(s1["codes"], s2["codes"])
    assert not torch.equal(s1["codes"], s3["codes"])
    assert not torch.equal(s1["codes"], a["codes"])
    assert not s1["masks"][-1].any() and torch.equal(s1["codes"][~s1["mask_init"]], a["codes_init"][~a["mask_init"]])


def _head_decision_gaps(net: LatentNAT, out: dict, logits: list[torch.Tensor]) -> tuple[float, float]:
    """Smallest gap of the decisions greedy decoding took on the head's ``logits`` (one block per round): the
    top-2 logit gap of every query row and, per round and sample, the confidence gap at the commit boundary;
    and the tolerance of two head computations on different row blocks (fc, GELU, LN, tied product, log-softmax)."""
    assert net.conf == "logp" and net.remask_scope == "new_only" and len(logits) == out["rounds"]
    gaps, scale = [], 0.0
    for query, mask, block in zip([out["mask_init"]] + out["masks"][:-1], out["masks"], logits):
        top2 = block.topk(2, dim=1).values
        gaps.append((top2[:, 0] - top2[:, 1]).min())
        conf = block.log_softmax(1).max(1).values
        scale = max(scale, float(block.abs().max()), float(conf.abs().max()))
        for rows, left in zip(conf.split(query.reshape(2, -1).sum(1).tolist()), mask.reshape(2, -1).sum(1)):
            if 0 < left < rows.numel():  # the lowest `left` confidences stay masked
                ranked = rows.sort().values
                gaps.append(ranked[left] - ranked[left - 1])
    return float(torch.stack(gaps).min()), tolerance(torch.float32, net.codebook_size, layers=6) * scale


def test_refine_never_builds_the_full_query_by_codebook_logits():
    """Small distance and head blocks decode what one block decodes: the codebook search is exact on dyadic
    latents and codes (any blocking), and this example's head choices are about 10 rounding tolerances apart at
    least (hundreds of random choices would bring near-ties)."""
    _, _, color_map, cond = inputs(b=2, h=6, w=7)
    x_hat, codebook = _dyadic(2, 3, 6, 7, seed=17), _dyadic(K, 3, seed=117)
    kw = dict(tau=0.0, rho_max=0.5, dim=12)  # no multiple of dim (qkv, MLP, unmerge) is K: (rows x K) is the head
    big = tiny_latent_nat(**kw, head_chunk=4096, chunk=4096)
    logits = []
    big.head.register_forward_hook(lambda mod, args, res: logits.append(res.detach().clone()))
    whole = big.refine(x_hat, codebook, color_map, cond)
    gap, tol = _head_decision_gaps(big, whole, logits)
    assert gap > 2 * tol, (gap, tol)  # so any kernel takes the same decisions
    small = tiny_latent_nat(**kw, head_chunk=8, chunk=16)
    with torch.no_grad(), MaxTensorSize() as rec:
        out = small.refine(x_hat, codebook, color_map, cond)
    n_q = int(out["mask_init"].sum())
    rows_by_k = [s[0] for s in rec.shapes if len(s) == 2 and s[1] == K]  # (rows x codebook) blocks
    assert n_q == 2 * 21 and rows_by_k and max(rows_by_k) == 16  # never N_q x K (42 x 32) at once
    assert torch.equal(out["codes"], whole["codes"]) and torch.equal(out["masks"][0], whole["masks"][0])
    assert torch.allclose(out["soft_codes"], whole["soft_codes"], atol=1e-6)
    assert torch.allclose(out["uncertainty"], whole["uncertainty"], atol=1e-6)


def test_remask_scope_all_may_revise_committed_tokens():
    x_hat, codebook, color_map, cond = inputs()
    out = tiny_latent_nat(remask_scope="all").refine(x_hat, codebook, color_map, cond)
    m0 = out["mask_init"]
    assert not out["masks"][-1].any() and (out["codes"] < K).all()
    assert (out["mask_union"] & ~m0).any()  # positions outside M0 were re-masked
    assert (out["codes"] != out["codes_init"])[~m0].any()  # ... and revised
    keep = ~out["mask_union"][:, None].expand_as(x_hat)
    assert torch.equal(out["z_out"][keep], x_hat[keep]) and torch.equal(out["z_out"][~keep], out["z_q"][~keep])
    sizes = [int(m.sum()) for m in out["masks"]]
    assert sizes == sorted(sizes, reverse=True)


def test_early_stop_and_soft_feedback():
    x_hat, codebook, color_map, cond = inputs()
    one = tiny_latent_nat(early_stop=1).refine(x_hat, codebook, color_map, cond)
    assert one["rounds"] == 1 and not one["masks"][0].any()
    soft = tiny_latent_nat(feedback="soft").refine(x_hat, codebook, color_map, cond)
    hard = tiny_latent_nat().refine(x_hat, codebook, color_map, cond)
    assert torch.equal(soft["codes"], hard["codes"])
    m = soft["mask_init"][:, None].expand_as(x_hat)
    assert torch.equal(soft["z_out"][~m], x_hat[~m])
    assert torch.equal(soft["z_out"][m], soft["soft_codes"][m])
    assert not torch.allclose(soft["z_out"][m], hard["z_out"][m])
    # soft codes are convex combinations of codes: inside the codebook's bounding box
    lo, hi = codebook.min(0).values[None, :, None, None], codebook.max(0).values[None, :, None, None]
    assert ((soft["soft_codes"] >= lo - 1e-5) & (soft["soft_codes"] <= hi + 1e-5)).all()


# ---------------------------------------------------------------- DecoderNAT
def tiny_decoder_nat(**kw) -> DecoderNAT:
    opts = dict(in_channels=8, dim=32, depth=2, heads=2, cond_channels=COND, tau3=0.5)
    opts.update(kw)
    torch.manual_seed(0)
    return DecoderNAT(**opts)


def decoder_inputs(h: int = 7, w: int = 9):
    g = torch.Generator().manual_seed(4)
    return (
        torch.randn(2, 8, h, w, generator=g),
        torch.rand(2, COND, h, w, generator=g),
        torch.rand(2, h, w, generator=g),
    )


@pytest.mark.parametrize("residual", ["masked_only", "all"])
def test_decoder_nat_is_identity_at_init(residual):
    net = tiny_decoder_nat(residual=residual)
    h, cond, u = decoder_inputs()
    out, mask = net(h, cond, u)
    assert torch.equal(out, h)
    assert mask.shape == (2, 4, 5) and mask.dtype == torch.bool
    assert 0 < int(mask.sum()) <= 2 * 10  # capped at rho3_max = 0.5 of 20 patches


def test_decoder_nat_mask_from_uncertainty_and_changes_only_masked_patches():
    net = tiny_decoder_nat()
    h, cond, u = decoder_inputs()
    pu = net.patch_uncertainty(u)
    assert torch.allclose(pu[:, 0, 0], u[:, :2, :2].mean((1, 2)))
    assert torch.allclose(pu[:, 3, 4], u[:, 6, 8])  # replicate-padded corner patch
    torch.nn.init.normal_(net.out.weight, std=0.1)
    out, mask = net(h, cond, u)
    up = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None, :7, :9].expand_as(h)
    assert torch.equal(out[~up], h[~up])
    assert (out[up] != h[up]).all()
    given = torch.zeros_like(mask)
    assert torch.equal(net(h, cond, u, given)[0], h)
    with pytest.raises(ValueError, match="patch mask"):
        net(h, cond, u, given[:, :2])


def test_decoder_nat_gradients_reach_every_parameter():
    net = tiny_decoder_nat()
    h, cond, u = decoder_inputs()
    target = torch.randn_like(h)
    out, mask = net(h, cond, u)
    (out - target).pow(2).mean().backward()
    assert net.out.weight.grad.abs().sum() > 0  # zero-init output layer learns first
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    out, _ = net(h, cond, u)
    (out - target).pow(2).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_decoder_nat_tau3_calibration():
    net = tiny_decoder_nat(tau3=None)
    h, cond, u = decoder_inputs()
    with pytest.raises(RuntimeError, match="tau3 is not calibrated"):
        net(h, cond, u)
    tau3 = net.calibrate(u, rho_target=0.25)
    assert tau3 == pytest.approx(float(np.quantile(net.patch_uncertainty(u).numpy(), 0.75)), abs=1e-6)
    assert 0.15 <= net(h, cond, u)[1].float().mean() <= 0.3


def test_first_round_keeps_the_least_confident_positions_masked():
    net = tiny_latent_nat()
    x_hat, codebook, color_map, cond = inputs()
    out = net.refine(x_hat, codebook, color_map, cond)
    m0, m1 = out["mask_init"], out["masks"][0]
    tokens = torch.where(m0, K, out["codes_init"])
    with torch.no_grad():
        logp = net(tokens, x_hat, color_map, cond, out["entropy"], m0).log_softmax(-1)
    conf = torch.zeros(m0.shape)
    conf[m0] = logp.max(-1).values
    committed = m0 & ~m1
    for i in range(2):  # every still-masked position is less confident than every committed one
        assert committed[i].any() and m1[i].any()
        assert conf[i][m1[i]].max() <= conf[i][committed[i]].min()
    assert torch.equal(out["tokens"][0][committed], logp.argmax(-1)[committed[m0]])


# ------------------------------------------------------- query-only last block
@pytest.mark.parametrize("merge,h,w,depth", [(2, 9, 13, 3), (1, 6, 5, 2), (3, 7, 8, 2), (2, 8, 8, 1)])
def test_query_features_equal_the_full_features_at_the_queries(merge, h, w, depth):
    """The last block on queried tokens only (and only their unmerge) gives the full computation's rows: odd sizes
    (padding), merge 1-3, samples with different query counts, depth 1 (PEG last: no restriction)."""
    torch.manual_seed(0)
    nat = LatentNAT(K, dim=32, depth=depth, heads=2, cond_channels=COND, merge=merge, dropout=0.0).eval().double()
    x_hat, _, color_map, cond = (t.double() for t in inputs(b=2, h=h, w=w))
    tokens = torch.randint(0, K + 1, (2, h, w))
    entropy = torch.rand(2, h, w, dtype=torch.float64)
    query = torch.rand(2, h, w) < 0.2
    query[1] = False
    query[1, -1, -1] = True  # one query in the padded corner of sample 1
    full = nat.features(tokens, x_hat, color_map, cond, entropy)[query]
    fast = nat.query_features(tokens, x_hat, color_map, cond, entropy, query)
    assert fast.shape == full.shape == (int(query.sum()), 32)
    assert (fast - full).abs().max().item() < 1e-12
    assert nat.query_features(tokens, x_hat, color_map, cond, entropy, torch.zeros_like(query)).shape == (0, 32)


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


def test_refine_without_stats_decodes_the_same_codes():
    """``stats=False`` (what GLARE + NAT-II without NAT-III runs) skips the committing entropies / expected codes
    and decodes the same codes and output latent."""
    x_hat, codebook, color_map, cond = inputs()
    net = tiny_latent_nat(tau=0.0, rho_max=0.5)
    with torch.no_grad():
        a = net.refine(x_hat, codebook, color_map, cond)
        b = net.refine(x_hat, codebook, color_map, cond, stats=False)
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["z_out"], b["z_out"])
    assert b["uncertainty"] is None and b["soft_codes"] is None and a["uncertainty"] is not None


def test_refine_projects_the_conditioning_once_and_decodes_the_same(monkeypatch):
    """The conditioning does not depend on the tokens (unless ``mask_hides_latent``): refine projects it once for
    all rounds and decodes exactly what a per-round projection decodes."""
    x_hat, codebook, color_map, cond = inputs()
    for hides in (False, True):
        net = tiny_latent_nat(tau=0.0, rho_max=0.5, mask_hides_latent=hides)
        calls = []
        net.cond_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        with torch.no_grad():
            out = net.refine(x_hat, codebook, color_map, cond)
        assert out["rounds"] == 4 and len(calls) == (4 if hides else 1)
    net = tiny_latent_nat(tau=0.0, rho_max=0.5)
    with torch.no_grad():
        once = net.refine(x_hat, codebook, color_map, cond)
        plain = LatentNAT.query_features
        monkeypatch.setattr(net, "query_features", lambda *a, **kw: plain(net, *a[:6]))  # cond_feat dropped
        per_round = net.refine(x_hat, codebook, color_map, cond)
    assert torch.equal(once["codes"], per_round["codes"]) and torch.equal(once["z_out"], per_round["z_out"])
    with pytest.raises(ValueError, match="mask_hides_latent"):
        tiny_latent_nat(mask_hides_latent=True).cond_features(x_hat, color_map, cond, torch.zeros(2, 7, 9))


def test_inference_buffers_and_inplace_gelu_give_the_autograd_paths_values_bit_for_bit():
    """Without autograd the MLP's GELU runs in place and the head's logits / log-probabilities / entropy terms go
    into reused buffers (``head_chunk`` 8: several chunks share them): the values are those of the plain path."""
    x_hat, codebook, color_map, cond = inputs(b=2, h=12, w=14)
    net = tiny_latent_nat(tau=0.0, rho_max=0.5, head_chunk=8)
    mlp = net.body.blocks[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        fast = mlp(x)
    assert torch.equal(fast, mlp(x))
    with torch.no_grad():
        a = net.refine(x_hat, codebook, color_map, cond)
        only_u = net.refine(x_hat, codebook, color_map, cond, soft_codes=False)
    b = net.refine(x_hat, codebook, color_map, cond)  # autograd on: fresh tensors, out-of-place GELU
    for key in ("codes", "z_out", "uncertainty", "soft_codes"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(only_u["uncertainty"], a["uncertainty"]) and only_u["soft_codes"] is None


# ------------------------------------------------------- ablation knobs (nat.md §6.1)
def test_margin_uncertainty_is_the_top2_probability_ratio_and_drives_the_mask():
    """``uncertainty.source: margin``: score = exp(-(d2 - d1) / T_d) = p0(2nd) / p0(1st), 1 at a tie; tau is its
    quantile and the initial mask is score > tau; the entropy stays reported."""
    codebook = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0], [9.0, 0, 0]])
    z = torch.tensor([[0.0, 0, 0], [0.5, 0, 0]]).t().reshape(1, 3, 1, 2)
    unc = code_uncertainty(z, codebook, dist_temp=0.5, knn=4, source="margin")
    assert torch.allclose(unc.score, torch.tensor([[[math.exp(-2.0), 1.0]]]))
    assert torch.allclose(unc.score, unc.probs[..., 1] / unc.probs[..., 0])
    assert torch.equal(code_uncertainty(z, codebook, 0.5, knn=4).score, unc.entropy)  # default: the entropy
    with pytest.raises(ValueError, match="flow_mc"):
        code_uncertainty(z, codebook, 0.5, knn=4, source="flow_mc")

    x_hat, codebook, color_map, cond = inputs()
    net = tiny_latent_nat(dist_temp=None, tau=None, uncertainty_source="margin")
    cal = net.calibrate(x_hat, codebook, rho_target=0.25)
    score = code_uncertainty(x_hat, codebook, cal["dist_temp"], knn=8, source="margin").score
    assert cal["tau"] == pytest.approx(float(np.quantile(score.numpy(), 0.75)), abs=1e-6)
    out = net.refine(x_hat, codebook, color_map, cond)
    assert torch.equal(out["mask_init"], score > cal["tau"]) and torch.equal(out["score"], score)
    entropy = code_uncertainty(x_hat, codebook, cal["dist_temp"], knn=8).entropy
    assert torch.equal(out["entropy"], entropy) and not torch.equal(out["mask_init"], entropy > cal["tau"])
    with pytest.raises(ValueError, match="uncertainty_source"):
        tiny_latent_nat(uncertainty_source="critic")


@pytest.mark.parametrize("pos,peg", [("sincos2d+peg", True), ("sincos2d", False), ("peg", True)])
def test_position_encoding_choices(pos, peg):
    nat = tiny_latent_nat(pos=pos)
    assert (nat.body.peg is not None) == peg
    assert any(k.startswith("body.peg.") for k in nat.state_dict()) == peg
    x_hat, codebook, color_map, cond = inputs(b=1)
    tokens = torch.randint(0, K + 1, (1, 7, 9))
    ent = torch.rand(1, 7, 9)
    x, _, _ = nat._tokens(tokens, x_hat, color_map, cond, ent)
    with torch.no_grad():
        nat.pos = "peg"
        no_sincos, _, _ = nat._tokens(tokens, x_hat, color_map, cond, ent)
    assert torch.equal(x, no_sincos) == (pos == "peg")  # the sin-cos table is added only when named
    with pytest.raises(ValueError, match="pos"):
        tiny_latent_nat(pos="learned1d")


def test_long_skips_feed_each_block_output_to_its_mirror():
    """U-ViT skips: with every skip projection set to pass the skip through, the input of block depth-1-i is the
    output of block i (LIFO pairing); the middle block of an odd stack has none."""
    torch.manual_seed(0)
    stack = TransformerStack(16, depth=5, heads=2, peg_after=None, long_skips=True).eval()
    assert len(stack.skip_proj) == 2
    with torch.no_grad():
        for proj in stack.skip_proj:
            proj.weight.zero_()
            proj.weight[:, 16:] = torch.eye(16)
            proj.bias.zero_()
    ins, outs = {}, {}
    for i, blk in enumerate(stack.blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0].clone()))
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.clone()))
    with torch.no_grad():
        stack(torch.randn(2, 12, 16), (3, 4))
    assert torch.equal(ins[4], outs[0]) and torch.equal(ins[3], outs[1])
    assert torch.equal(ins[2], outs[1]) and torch.equal(ins[1], outs[0])  # no skip before the middle block
    assert TransformerStack(16, depth=4, heads=2, long_skips=False).skip_proj is None


@pytest.mark.parametrize(
    "pos,cond_mode", [("sincos2d", "additive"), ("peg", "adaln"), ("sincos2d+peg", "adaln"), ("peg", "xattn")]
)
def test_query_features_stay_exact_with_long_skips_and_other_positions(pos, cond_mode):
    torch.manual_seed(0)
    nat = LatentNAT(
        K, dim=32, depth=4, heads=2, cond_channels=COND, dropout=0.0, pos=pos, uvit_skips=True, cond_mode=cond_mode
    )
    nat = nat.eval().double()
    with torch.no_grad():  # non-zero modulation, so the adaLN path is exercised
        for p in nat.body.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x_hat, _, color_map, cond = (t.double() for t in inputs(b=2, h=7, w=9))
    tokens = torch.randint(0, K + 1, (2, 7, 9))
    entropy = torch.rand(2, 7, 9, dtype=torch.float64)
    query = torch.rand(2, 7, 9) < 0.3
    full = nat.features(tokens, x_hat, color_map, cond, entropy)[query]
    fast = nat.query_features(tokens, x_hat, color_map, cond, entropy, query)
    assert (fast - full).abs().max().item() < 1e-12


def test_codebook_lift_gives_neighbouring_codes_similar_embeddings():
    _, codebook, _, _ = inputs()
    nat = tiny_latent_nat(tok_init="codebook_lift")
    mask_row = nat.tok_emb.weight[K].clone()
    assert nat.init_token_embedding(codebook, torch.Generator().manual_seed(0))
    emb = nat.tok_emb.weight[:K].detach()
    assert torch.equal(nat.tok_emb.weight[K], mask_row)
    iu = torch.triu_indices(K, K, 1)
    d_code = torch.cdist(codebook, codebook)[iu[0], iu[1]]
    d_emb = torch.cdist(emb, emb)[iu[0], iu[1]]
    corr = torch.corrcoef(torch.stack([d_code, d_emb]))[0, 1]
    assert corr > 0.5  # random rows alone: no relation to the code geometry
    plain = tiny_latent_nat()
    before = plain.tok_emb.weight.detach().clone()
    assert not plain.init_token_embedding(codebook) and torch.equal(plain.tok_emb.weight, before)
    rnd = torch.cdist(before[:K], before[:K])[iu[0], iu[1]]
    assert abs(float(torch.corrcoef(torch.stack([d_code, rnd]))[0, 1])) < 0.3


def test_adaln_conditions_through_the_modulation_only_and_starts_as_identity_blocks():
    """``cond_mode: adaln``: the conditioning is not added to the tokens; each block's zero-initialised modulation
    makes it the identity at first; once trained, changing the low-light features changes the output."""
    x_hat, codebook, color_map, cond = inputs(b=1)
    tokens = torch.randint(0, K + 1, (1, 7, 9))
    ent = torch.rand(1, 7, 9)
    nat = tiny_latent_nat(cond_mode="adaln")
    x, hw, ctok = nat._tokens(tokens, x_hat, color_map, cond, ent)
    assert ctok is not None and ctok.shape == x.shape
    x2, _, ctok2 = nat._tokens(tokens, x_hat, color_map, cond + 1.0, ent)
    assert torch.equal(x, x2) and not torch.equal(ctok, ctok2)  # tokens carry no conditioning
    blk = nat.body.blocks[0]
    assert torch.equal(blk(x, cond=ctok), x)  # adaLN-Zero: identity block at init
    with pytest.raises(ValueError, match="adaln"):
        blk(x)
    with torch.no_grad():
        for b in nat.body.blocks:
            b.ada[1].weight.normal_(0, 0.05)
        f1 = nat.features(tokens, x_hat, color_map, cond, ent)
        f2 = nat.features(tokens, x_hat, color_map, cond + 1.0, ent)
    assert not torch.allclose(f1, f2)
    out = nat.refine(x_hat, codebook, color_map, cond)  # the decoding contract holds in this mode too
    assert not out["masks"][-1].any() and torch.equal(
        out["codes"][~out["mask_init"]], out["codes_init"][~out["mask_init"]]
    )
    assert tiny_latent_nat().cond_merge is None and tiny_latent_nat().body.blocks[0].ada is None


def test_threshold_remask_rule_keeps_masked_while_the_nat_is_uncertain():
    """``remask_rule: threshold``: after round t < T exactly the masked positions whose NAT distribution has
    normalised entropy > tau stay masked (a subset of the previous mask); the last round commits everything."""
    x_hat, codebook, color_map, cond = inputs()
    nat = tiny_latent_nat(remask_rule="threshold", iters=3, tau=0.6, dist_temp=1.0)
    with torch.no_grad():
        nat.head.norm.weight.mul_(20.0)  # sharper logits: NAT entropies on both sides of tau
        out = nat.refine(x_hat, codebook, color_map, cond)
        m0 = out["mask_init"]
        v0 = torch.where(m0, K, out["codes_init"])
        logits = nat.logits(v0, x_hat, color_map, cond, out["score"], m0)
    ent1 = normalized_entropy(torch.softmax(logits, -1))
    expect = torch.zeros_like(m0)
    expect[m0] = ent1 > 0.6
    assert torch.equal(out["masks"][0], expect) and 0 < int(expect.sum()) < int(m0.sum())
    for prev, cur in zip([m0] + out["masks"][:-1], out["masks"]):
        assert not (cur & ~prev).any()
    assert not out["masks"][-1].any() and out["rounds"] == len(out["masks"]) <= 3
    assert torch.equal(out["codes"][~m0], out["codes_init"][~m0])
    with pytest.raises(ValueError, match="new_only"):
        tiny_latent_nat(remask_rule="threshold", remask_scope="all")


def test_histogram_entropy_of_flow_samples():
    codes = torch.tensor([[3, 3, 3, 3], [1, 2, 3, 4], [5, 5, 6, 6], [7, 7, 7, 8]]).t().reshape(4, 1, 1, 4)  # S = 4
    ent = histogram_entropy(codes)[0, 0]
    p = torch.tensor([0.75, 0.25])
    expected = [0.0, 1.0, 0.5, float(-(p * p.log()).sum() / math.log(4))]
    assert torch.allclose(ent, torch.tensor(expected), atol=1e-6)
    with pytest.raises(ValueError, match="2 samples"):
        histogram_entropy(codes[:1])


def test_flow_mc_source_takes_its_score_from_the_caller():
    x_hat, codebook, color_map, cond = inputs()
    nat = tiny_latent_nat(uncertainty_source="flow_mc", tau=0.5)
    with pytest.raises(ValueError, match="nat2_score"):
        nat.refine(x_hat, codebook, color_map, cond)
    with pytest.raises(ValueError, match="score must be"):
        nat.uncertainty(x_hat, codebook, torch.rand(2, 7, 8))
    score = torch.rand(2, 7, 9, generator=torch.Generator().manual_seed(3))
    out = nat.refine(x_hat, codebook, color_map, cond, score=score)
    assert torch.equal(out["score"], score) and torch.equal(out["mask_init"], initial_mask(score, 0.5, 0.5))
    with pytest.raises(ValueError, match="flow_mc"):
        tiny_latent_nat().uncertainty(x_hat, codebook, score)
    fresh = tiny_latent_nat(uncertainty_source="flow_mc", dist_temp=None, tau=None)
    with pytest.raises(ValueError, match="scores="):
        fresh.calibrate(x_hat, codebook)
    cal = fresh.calibrate(x_hat, codebook, rho_target=0.25, scores=[score[:1], score[1:]])
    assert cal["tau"] == pytest.approx(float(np.quantile(score.numpy(), 0.75)), abs=1e-6)


def test_xattn_attends_to_a_pooled_low_light_context():
    """``cond_mode: xattn``: tokens carry no conditioning; every block cross-attends to the conditioning pooled to
    ceil(h/4) x ceil(w/4) context tokens, so changing the low-light features changes the features."""
    x_hat, codebook, color_map, cond = inputs(b=1)
    tokens = torch.randint(0, K + 1, (1, 7, 9))
    ent = torch.rand(1, 7, 9)
    nat = tiny_latent_nat(cond_mode="xattn")
    x, _, ctx = nat._tokens(tokens, x_hat, color_map, cond, ent)
    assert ctx.shape == (1, 2 * 3, 32)  # ceil(7/4) x ceil(9/4) context tokens of width dim
    x2, _, ctx2 = nat._tokens(tokens, x_hat, color_map, cond + 1.0, ent)
    assert torch.equal(x, x2) and not torch.equal(ctx, ctx2)
    assert all(b.xattn is not None and b.ada is None for b in nat.body.blocks)
    with torch.no_grad():
        f1 = nat.features(tokens, x_hat, color_map, cond, ent)
        f2 = nat.features(tokens, x_hat, color_map, cond + 1.0, ent)
    assert not torch.allclose(f1, f2)
    with pytest.raises(ValueError, match="alternatives"):
        TransformerBlock(32, 2, adaln=True, xattn=True)
