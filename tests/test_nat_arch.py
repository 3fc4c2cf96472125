"""NAT-II (LatentNAT): network, decoding, feedback and the ablation knobs (building blocks: test_nat_uncertainty.py)."""

from __future__ import annotations

import math

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import numpy as np
import pytest
import torch
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY

from glare_nat_arch.nat_arch import LatentNAT
from glare_nat_arch.nat_uncertainty import (
    code_uncertainty,
    initial_mask,
    normalized_entropy,
)
from glare_nat_arch.transformer import TransformerBlock, TransformerStack
from tests.nat_helpers import COND, K, MaxTensorSize, dyadic, inputs, latent_nat, tiny_latent_nat
from tests.tolerance import assert_same_codes, code_distance_tolerance, tolerance


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
        latent_nat(remask_scope="everything")


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
    x_hat, codebook = dyadic(2, 3, 6, 7, seed=17), dyadic(K, 3, seed=117)
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


def test_flow_prior_moves_the_masked_codes_towards_the_flows():
    """``decode.flow_prior``: 0 leaves the NAT's codes; a large weight keeps the flow's codes at every masked
    position (also under revision); in between, the NAT overrides the flow only where it is more confident."""
    x_hat, codebook, color_map, cond = inputs()
    plain = tiny_latent_nat().refine(x_hat, codebook, color_map, cond)
    m0 = plain["mask_init"]
    assert m0.any() and (plain["codes"] != plain["codes_init"])[m0].any()  # the NAT alone changes masked codes
    zero = tiny_latent_nat(flow_prior=0.0).refine(x_hat, codebook, color_map, cond)
    assert torch.equal(zero["codes"], plain["codes"])
    rows = x_hat.permute(0, 2, 3, 1).reshape(-1, 3)  # the prior's distances vs the flow codes' (another formula)
    full, tol = torch.cdist(rows, codebook) ** 2, code_distance_tolerance(rows, codebook)
    for scope in ("new_only", "all"):
        strong = tiny_latent_nat(flow_prior=1e4, remask_scope=scope).refine(x_hat, codebook, color_map, cond)
        assert_same_codes(strong["codes"].reshape(-1), strong["codes_init"].reshape(-1), full, tol, min_decided=1.0)
    changed = [
        int(
            (tiny_latent_nat(flow_prior=lam).refine(x_hat, codebook, color_map, cond)["codes"] != plain["codes_init"])[
                m0
            ].sum()
        )
        for lam in (0.0, 0.1, 1.0, 10.0)
    ]
    assert changed == sorted(changed, reverse=True) and changed[0] > changed[-1], changed


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
    nat = latent_nat(dim=32, depth=depth, heads=2, cond_channels=COND, merge=merge, dropout=0.0).eval().double()
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
    with pytest.raises(ValueError, match=r"uncertainty\.source = 'critic' is not implemented"):
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
    nat = latent_nat(
        dim=32, depth=4, heads=2, cond_channels=COND, dropout=0.0, pos=pos, uvit_skips=True, cond_mode=cond_mode
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
