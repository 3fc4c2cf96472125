"""Stage-I VQGAN and its quantiser: golden parity with the official code, loading rules, quantiser math."""

from __future__ import annotations

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

import glare_nat_arch  # noqa: F401  (BasicSR import aliases first)
from glare_nat_arch.quantize import VectorQuantizer
from glare_nat_arch.vqgan_arch import GLAREVQGAN, VQGAN_UNUSED_PREFIXES
from glare_nat_models.checkpoint import CheckpointError, StrictLoadError, from_official, load_official
from tests.tolerance import assert_same_codes, code_distance_tolerance

F64 = dict(rtol=1e-6, atol=1e-5)  # tests/data/README.md: float64 vs stored float64
F64_STORED_F32 = dict(rtol=1e-5, atol=1e-5)  # float64 vs tensors stored as float32
F32 = dict(rtol=1e-4, atol=1e-4)


def vqgan_kwargs(golden: dict) -> dict:
    c = golden["config"]["opt_stage3"]["network_VQGAN"]
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels", "embed_dim", "n_embed")
    return {k: c[k] for k in keys}


@pytest.fixture(scope="module")
def golden_vqgan(golden: dict) -> GLAREVQGAN:
    net = GLAREVQGAN(**vqgan_kwargs(golden))
    dropped = load_official(net, golden["vqgan_state_dict"])
    assert dropped and all(k.startswith(VQGAN_UNUSED_PREFIXES) for k in dropped)
    return net.eval()


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def test_registered():
    assert ARCH_REGISTRY.get("GLAREVQGAN") is GLAREVQGAN


def test_golden_vqgan_float64(golden, golden_vqgan):
    net = golden_vqgan.double()
    ref = golden["outputs"]["vqgan"]
    with torch.no_grad():
        latent = net.encode(golden["gt"])
        quant, emb_loss, indices = net.quantize_latent(latent)
        rgb, loss2, (n1, n0) = net.decode(latent)
        post = net.post_quant_conv(quant)
        rec, loss3, idx3 = net(golden["gt"])
    close(latent, ref["latent"], F64)
    close(quant, ref["quant"], F64)
    # exact: every nearest code of the golden latent beats the runner-up by 5.5e-4 or more (tests/data/README.md),
    # far above the rounding of any path
    book = golden["vqgan_state_dict"]["quantize.embedding.weight"].double()
    nearest2 = torch.cdist(ref["latent"].permute(0, 2, 3, 1).reshape(-1, 3), book).square().topk(2, largest=False)
    assert (nearest2.values[:, 1] - nearest2.values[:, 0]).min() > 5e-4
    assert torch.equal(indices, ref["indices"]) and torch.equal(idx3, ref["indices"])
    close(emb_loss, ref["emb_loss"], F64)
    close(loss2, ref["emb_loss"], F64)
    close(post, ref["post_quant"], F64)
    close(rgb, ref["rec"], F64)
    close(rec, ref["rec"], F64)
    close(loss3, ref["emb_loss"], F64)
    close(n1, ref["n1"], F64_STORED_F32)
    close(n0, ref["n0"], F64_STORED_F32)


def test_golden_vqgan_float32(golden, golden_vqgan):
    net = golden_vqgan.float()
    ref = golden["outputs_fp32"]["vqgan"]
    gt = golden["gt_uint8"].float() / 255
    with torch.no_grad():
        rec, _, indices = net(gt)
        latent = net.encode(gt)
    close(latent, ref["latent"], F32)
    close(rec, ref["rec"], F32)
    assert torch.equal(indices, ref["indices"])  # gaps of 5.5e-4 and more: far above float32 rounding


def test_decode_variants_agree(golden, golden_vqgan):
    net = golden_vqgan.double()
    with torch.no_grad():
        latent = net.encode(golden["gt"][:1])
        rgb, _, feats = net.decode(latent)
        none, _, feats_no_rgb = net.decode(latent, return_rgb=False)
        _, _, idx = net.quantize_latent(latent)
        rgb_idx, _ = net.decode_indices(idx)
    assert none is None
    torch.testing.assert_close(feats_no_rgb[0], feats[0])
    torch.testing.assert_close(rgb_idx, rgb)
    assert net.get_last_layer() is net.decoder.conv_out.weight


def test_load_official_rejects_unknown_missing_and_misshaped_keys(golden):
    net = GLAREVQGAN(**vqgan_kwargs(golden))
    sd = dict(golden["vqgan_state_dict"])
    with pytest.raises(StrictLoadError, match=r"unexpected keys .*\(1\):\n  discriminator\.w"):
        load_official(net, {**sd, "discriminator.w": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if k != "quant_conv.bias"}
    with pytest.raises(StrictLoadError, match=r"missing keys .*\(1\):\n  quant_conv\.bias"):
        load_official(net, missing)
    with pytest.raises(StrictLoadError, match=r"shape-mismatched keys .*\(1\):\n  quantize\.embedding\.weight"):
        load_official(net, {**sd, "quantize.embedding.weight": torch.zeros(8192, 3)})
    with pytest.raises(CheckpointError, match="not found: /nonexistent/no_such_vqgan.pkl"):
        load_official(net, "/nonexistent/no_such_vqgan.pkl")


def test_load_official_reads_files_and_params_wrapper(golden, tmp_path):
    sd = golden["vqgan_state_dict"]
    torch.save(dict(sd), tmp_path / "vqgan.pkl")
    torch.save({"params": {k: v for k, v in sd.items() if not k.startswith(VQGAN_UNUSED_PREFIXES)}}, tmp_path / "c.pth")
    a = from_official(GLAREVQGAN, tmp_path / "vqgan.pkl", **vqgan_kwargs(golden))
    b = from_official(GLAREVQGAN, tmp_path / "c.pth", **vqgan_kwargs(golden))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    torch.testing.assert_close(a.quantize.embedding.weight, sd["quantize.embedding.weight"].float())
    torch.save({**sd, "discriminator.w": torch.zeros(1)}, tmp_path / "extra.pkl")
    with pytest.raises(StrictLoadError, match=r"extra\.pkl does not match GLAREVQGAN"):
        from_official(GLAREVQGAN, tmp_path / "extra.pkl", **vqgan_kwargs(golden))


def test_official_size_matches_vqgan_pkl_layout():
    with torch.device("meta"):
        net = GLAREVQGAN()
    sd = net.state_dict()
    assert len(sd) == 255  # docs/glare.md "State-dict names"
    assert sum(v.numel() for v in sd.values()) == 60_581_022
    assert sd["quantize.embedding.weight"].shape == (8192, 3)


# ----------------------------------------------------------------------------------------------- quantiser
def test_quantizer_chunked_nearest_code_matches_brute_force():
    """Chunked ``|z|^2 + |e|^2 - 2 z.e`` against ``cdist``: the same codes wherever rounding cannot decide."""
    torch.manual_seed(0)
    vq = VectorQuantizer(50, 3, max_chunk_elems=50 * 7).double()  # 7 rows per chunk: many uneven chunks
    vq.embedding.weight.data.normal_()
    z = torch.randn(2, 3, 5, 9, dtype=torch.float64)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    full = torch.cdist(flat, vq.embedding.weight) ** 2
    brute = full.argmin(dim=1).view(2, 5, 9)
    tol = code_distance_tolerance(flat, vq.embedding.weight).view(2, 5, 9)
    assert_same_codes(vq.nearest_indices(z), brute, full.view(2, 5, 9, -1), tol, min_decided=1.0)
    torch.testing.assert_close(vq.lookup(brute), vq.embedding.weight[brute].permute(0, 3, 1, 2))


def test_quantizer_loss_and_straight_through_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, beta=0.25).double()
    vq.embedding.weight.data.normal_()
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    z_q, loss, idx = vq(z)
    codes = vq.lookup(idx).detach()
    torch.testing.assert_close(z_q, codes)
    torch.testing.assert_close(loss, 1.25 * ((codes - z.detach()) ** 2).mean())
    (z_q * 3.0).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.full_like(z, 3.0))  # straight-through: identity gradient
    assert vq.embedding.weight.grad is None  # z_q itself gives the codebook no gradient
    z.grad = None
    loss.backward()
    n = z.numel()
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - codes).detach() / n)  # commitment term only
    assert vq.embedding.weight.grad is not None and vq.embedding.weight.grad.abs().sum() > 0


def test_quantizer_rejects_wrong_latent_shape():
    vq = VectorQuantizer(16, 3)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        vq(torch.zeros(1, 4, 2, 2))


def test_quantizer_distances_ignore_autocast():
    """Close codes (0.02 apart around 1.0): bf16 distances pick other codes; autocast must not change the result."""
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 3)
    vq.embedding.weight.data = 1.0 + 0.02 * torch.randn(512, 3)
    z = 1.0 + 0.02 * torch.randn(1, 3, 8, 8)
    reference = vq.nearest_indices(z)
    flat, codes = z.permute(0, 2, 3, 1).reshape(-1, 3).bfloat16(), vq.embedding.weight.bfloat16()
    bf16 = ((flat**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * flat @ codes.t()).argmin(1).view(1, 8, 8)
    assert not torch.equal(bf16, reference)  # the check below has teeth
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same float32 operations as the reference: exact
        assert torch.equal(vq.nearest_indices(z), reference)
