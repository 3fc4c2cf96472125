"""GLARE Stage II / III networks: golden parity with the official code, padding, hooks, loading, scripts."""

from __future__ import annotations

import copy
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from basicsr.utils.registry import ARCH_REGISTRY

import glare_nat_arch  # noqa: F401  (BasicSR import aliases first)
from glare_nat_arch.aft import MultiScaleDecoder
from glare_nat_arch.glare_arch import GLAREFlowNet, GLARENet, log_transform
from glare_nat_arch.padding import pad_to_multiple
from glare_nat_arch.vqgan_arch import GLAREVQGAN
from glare_nat_models.checkpoint import StrictLoadError, from_official, load_official
from tests.conftest import GOLDEN_PATH, load_golden
from tests.tolerance import assert_close_for

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import convert_official  # noqa: E402
import count_params_macs  # noqa: E402

F64 = dict(rtol=1e-6, atol=1e-5)
F64_STORED_F32 = dict(rtol=1e-5, atol=1e-5)
F32 = dict(rtol=1e-4, atol=1e-4)
STORED_F32 = {"s0", "s1", "n1", "n0", "level1_h_pre", "level1_u", "level0_h_pre", "level0_u"}


def net_kwargs(golden: dict) -> dict:
    """GLAREFlowNet / GLARENet constructor arguments of the golden tiny config."""
    enc = golden["config"]["cond_encoder_kwargs (ConEncoder1, overrides of hard-coded defaults)"]
    flow = golden["config"]["opt_stage3"]["network_G"]["flow"]
    assert (
        golden["config"]["deformable_decoder_kwargs (MultiScaleDecoder2, overrides of hard-coded ch=128 etc.)"] == enc
    )
    return dict(
        ch=enc["ch"],
        ch_mult=enc["ch_mult"],
        num_res_blocks=enc["num_res_blocks"],
        attn_resolutions=enc["attn_resolutions"],
        resolution=enc["resolution"],
        z_channels=enc["z_channels"],
        flow_hidden_channels=flow["CondAffineSeparatedAndCond"]["hidden_channels"],
        flow_L=flow["L"],
        flow_K=flow["K"],
        flow_n_extra_steps=flow["additionalFlowNoAffine"],
    )


def vqgan_kwargs(golden: dict) -> dict:
    c = golden["config"]["opt_stage3"]["network_VQGAN"]
    return {k: c[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "n_embed")}


@pytest.fixture(scope="module")
def vqgan(golden) -> GLAREVQGAN:
    return from_official(GLAREVQGAN, golden["vqgan_state_dict"], **vqgan_kwargs(golden)).eval()


@pytest.fixture(scope="module")
def stage2(golden) -> GLAREFlowNet:
    net = GLAREFlowNet(**net_kwargs(golden))
    load_official(net, {k: v.clone() for k, v in golden["stage2_state_dict"].items()})
    return net.eval()


@pytest.fixture(scope="module")
def stage3(golden) -> GLARENet:
    net = GLARENet(**net_kwargs(golden), per_sample_rescale=False)
    load_official(net, {k: v.clone() for k, v in golden["full_state_dict"].items()})
    return net.eval()


def close(actual: torch.Tensor, expected: torch.Tensor, tol: dict) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def test_registered():
    assert ARCH_REGISTRY.get("GLAREFlowNet") is GLAREFlowNet
    assert ARCH_REGISTRY.get("GLARENet") is GLARENet


def test_golden_file_ships_with_the_documented_keys_and_fails_when_missing(golden, tmp_path):
    """The golden tensors come with the repository (tests/data/), hold the keys its README documents, and a missing
    file fails the parity tests instead of skipping them."""
    assert GOLDEN_PATH == REPO_ROOT / "tests" / "data" / "glare_official_tiny.pt" and GOLDEN_PATH.is_file()
    readme = (REPO_ROOT / "tests" / "data" / "README.md").read_text()
    table = readme.split("## Top-level keys")[1].split("\n## ")[0]
    documented = {
        k for row in table.splitlines() if row.startswith("| `") for k in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert documented == set(golden)
    assert golden["config"]["official_commit"] == "7ea5027" and golden["config"]["compute_dtype"] == "float64"
    with pytest.raises(pytest.fail.Exception, match="missing"):
        load_golden(tmp_path / "glare_official_tiny.pt")


def test_log_transform_matches_golden(golden):
    # an element-wise log: libm and vectorised logs may differ in the last bit
    assert_close_for(log_transform(golden["input"]), golden["input_log"], reduction=1)


# ----------------------------------------------------------------------------------------------- stage II
def test_golden_stage2_float64(golden, stage2, vqgan):
    net, vq = stage2.double(), vqgan.double()
    ref = golden["outputs"]["stage2"]
    with torch.no_grad():
        c = net.condition(golden["input"])
        fwd_c = net(ref["z_nl"], golden["input"], mu_from_gt=False)
        fwd_g = net(ref["z_nl"], golden["input"], mu_from_gt=True)
        rev = net.reverse(golden["input"])
        z_nl = vq.encode(golden["gt"])
        rgb, _, _ = vq.decode(rev["z_hat"])
    for key, got in (("bottleneck", c["bottleneck"]), ("cond", c["cond"]), ("color_map", c["color_map"])):
        close(got, ref[key], F64)
    close(c["skips"][0], ref["s0"], F64_STORED_F32)
    close(c["skips"][1], ref["s1"], F64_STORED_F32)
    close(z_nl, ref["z_nl"], F64)
    close(fwd_c["z"], ref["z"], F64)
    close(fwd_c["logdet"], ref["logdet"], F64)
    close(fwd_c["logp"], ref["logp_colormap_mean"], F64)
    close(fwd_g["logp"], ref["logp_gt_mean"], F64)
    close(fwd_c["nll"], ref["nll_colormap_mean"], F64)
    close(fwd_g["nll"], ref["nll_gt_mean"], F64)
    close(rev["z_hat"], ref["z_hat"], F64)
    close(rev["logdet"], ref["logdet_reverse"], F64)
    close(rgb, ref["dnl_rgb_of_z_hat"], F64)
    # the NLL is normalised by ln2 * h * w (latent pixels), not by C * h * w
    norm = golden["outputs"]["nll_convention"]["normaliser"]
    close(fwd_c["nll"], -(fwd_c["logp"] + fwd_c["logdet"]) / norm, dict(rtol=1e-12, atol=1e-12))
    assert math.isclose(norm, math.log(2) * 8 * 12)


def test_stage2_per_sample_prior_choice(golden, stage2):
    net = stage2.double()
    z_nl = golden["outputs"]["stage2"]["z_nl"]
    with torch.no_grad():
        mixed = net(z_nl, golden["input"], mu_from_gt=torch.tensor([True, False]))
        gt, cm = net(z_nl, golden["input"], True), net(z_nl, golden["input"], False)
    torch.testing.assert_close(mixed["nll"], torch.stack([gt["nll"][0], cm["nll"][1]]))


def test_golden_stage2_float32(golden, stage2, vqgan):
    """The official float32 run: uint8/255 in float32, z_nl from the float32 VQGAN, the log in float32."""
    net, vq = stage2.float(), vqgan.float()
    ref = golden["outputs_fp32"]["stage2"]
    lq = golden["input_uint8"].float() / 255
    with torch.no_grad():
        z_nl = vq.encode(golden["gt_uint8"].float() / 255)
        fwd_c = net(z_nl, lq, False)
        fwd_g = net(z_nl, lq, True)
        rev = net.reverse(lq)
    close(fwd_c["z"], ref["z"], F32)
    close(fwd_c["logdet"], ref["logdet"], F32)
    close(fwd_c["nll"], ref["nll_colormap_mean"], F32)
    close(fwd_g["nll"], ref["nll_gt_mean"], F32)
    close(rev["z_hat"], ref["z_hat"], F32)


def test_stage2_rejects_sizes_that_are_not_multiples_of_4(stage2):
    with pytest.raises(ValueError, match="multiples of 4"):
        stage2.float().reverse(torch.rand(1, 3, 30, 48))


# ----------------------------------------------------------------------------------------------- stage III
@pytest.fixture(scope="module")
def run64(golden, stage3, vqgan) -> dict:
    """One float64 Stage-III forward on the golden input (with intermediates) and one on the plain path."""
    net, vq = stage3.double(), vqgan.double()
    with torch.no_grad():
        return {"inter": net(golden["input"], vq, return_intermediates=True), "plain": net(golden["input"], vq)}


def test_golden_stage3_float64(golden, run64):
    ref = golden["outputs"]["stage3"]
    out = run64["inter"]
    # exact: each nearest code of z_hat beats the runner-up by 5.2e-3 or more (tests/data/README.md)
    assert torch.equal(out["z_hat_indices"], ref["z_hat_indices"])
    compared = 0
    for key, expected in ref.items():
        if key == "z_hat_indices":
            continue
        close(out[key], expected, F64_STORED_F32 if key in STORED_F32 else F64)
        compared += 1
    assert compared == len(ref) - 1 == 16
    close(run64["plain"], ref["output"], F64)
    # per-level fusion, rebuilt from the stored tensors and the Mix weights (docs/glare.md "Fusion")
    sd = golden["full_state_dict"]
    s2 = golden["outputs"]["stage2"]
    for level, j, skip in ((1, 0, "s1"), (0, 1, "s0")):
        m = torch.sigmoid(sd[f"deformable_decoder.mix.{j}.w"].double())
        h_mix = m * s2[skip].double() + (1 - m) * ref[f"level{level}_h_pre"].double()
        close(out[f"level{level}_h_mix"], h_mix, F64_STORED_F32)
        ratio = out[f"level{level}_mean_h_mix"] / out[f"level{level}_mean_u"]
        close(out[f"level{level}_h_post"], h_mix + ref[f"level{level}_u"].double() * ratio, F64_STORED_F32)


def test_golden_stage3_with_the_tapwise_dcn(golden, run64, stage3, vqgan):
    """The tap-wise DCN at inference reproduces the official output: float64 against the golden output and
    against the im2col run."""
    net, vq = copy.deepcopy(stage3).double(), vqgan.double()
    for warp in net.deformable_decoder.warp:
        warp.dcn.impl = "tapwise"
    with torch.inference_mode():
        out = net(golden["input"], vq)
    close(out, golden["outputs"]["stage3"]["output"], F64)
    assert (out - run64["plain"]).abs().max().item() < 1e-10


def test_golden_stage3_float32(golden, stage3, vqgan):
    net, vq = stage3.float(), vqgan.float()
    ref = golden["outputs_fp32"]["stage3"]
    with torch.no_grad():
        out = net(golden["input_uint8"].float() / 255, vq, return_intermediates=True)
    close(out["output"], ref["output"], F32)
    close(out["z_hat"], ref["z_hat"], F32)
    assert torch.equal(out["z_hat_indices"], ref["z_hat_indices"])  # gaps of 5.2e-3 and more: far above rounding


def test_batch_global_rescale_couples_samples_and_per_sample_option_does_not(golden, stage3, run64):
    """D_MF on the golden z_hat / NL features / skips, as a batch of 2 and as two batches of 1."""
    dmf = stage3.double().deformable_decoder
    inter = run64["inter"]
    args = (inter["z_hat"], [inter["n1"], inter["n0"]], [inter["s0"], inter["s1"]])

    def run(per_sample: bool, index: slice) -> torch.Tensor:
        dmf.per_sample_rescale = per_sample
        try:
            with torch.no_grad():
                return dmf(args[0][index], [f[index] for f in args[1]], [f[index] for f in args[2]])
        finally:
            dmf.per_sample_rescale = False

    batch = run(False, slice(None))
    torch.testing.assert_close(batch, run64["plain"])
    singles = torch.cat([run(False, slice(i, i + 1)) for i in range(2)])  # for B=1 both rules are the same
    assert (batch - singles).abs().max() > 1e-3  # official: batch-global means couple the two samples
    torch.testing.assert_close(run(True, slice(None)), singles, rtol=1e-10, atol=1e-10)


def test_networks_do_not_pad_they_name_the_multiple(golden, stage3, vqgan):
    """Padding is the caller's (pad_to_multiple, once): the network refuses sizes it cannot take."""
    net, vq = stage3.double(), vqgan.double()
    h, w = 29, 46  # H % 4 = 1, W % 4 = 2
    x = golden["input"][:1, :, :h, :w]
    with pytest.raises(ValueError, match="H, W = 29, 46 must be multiples of 4"):
        net(x, vq)
    with pytest.raises(ValueError, match="multiples of 4"):
        net.enhance(x, vq)
    padded, size = pad_to_multiple(x, 4)
    assert size == (h, w) and padded.shape[-2:] == (32, 48)
    torch.testing.assert_close(padded[..., h, :w], x[..., h - 2, :])  # reflect padding at the bottom/right
    torch.testing.assert_close(padded[..., :h, w], x[..., :, w - 2])
    bordered, _ = pad_to_multiple(x, 4, border=(20, 20))  # official test border: bottom and left, then the multiple
    assert bordered.shape[-2:] == (52, 68)
    torch.testing.assert_close(bordered[..., :h, 20 : 20 + w], x, rtol=0, atol=0)


def test_latent_hook_feeds_both_decoders(golden, stage3, vqgan, run64, monkeypatch):
    """``refine_latent`` is the one place where a refiner changes the latents: its output feeds D_NL and D_MF."""
    net, vq = stage3.double(), vqgan.double()
    x = golden["input"]
    seen = {}
    official = net.refine_latent

    def identity(rev, codebook):
        seen.update(rev)
        return official(rev, codebook)

    def shifted(rev, codebook):
        z = rev["z_hat"] + 0.5
        return {"z_nl": z, "quant_nl": None, "z_mf": z}

    with torch.no_grad():
        monkeypatch.setattr(net, "refine_latent", identity)
        same = net(x, vq)
        monkeypatch.setattr(net, "refine_latent", shifted)
        changed = net(x, vq, return_intermediates=True)
    torch.testing.assert_close(same, run64["plain"], rtol=0, atol=0)
    assert {"cond", "color_map", "skips", "z_hat"} <= set(seen)
    torch.testing.assert_close(changed["z_dec"], changed["z_hat"] + 0.5)
    assert changed["z_mf"] is changed["z_dec"]
    assert (changed["output"] - run64["plain"]).abs().max() > 1e-3
    with pytest.raises(TypeError, match="nat3_random_r_max"):  # GLARE itself has no decoder-hook options
        net(x, vq, nat3_random_r_max=0.5)


def test_unused_official_parameters_exist_frozen_and_unused(golden, stage3, vqgan, run64):
    dmf = stage3.deformable_decoder
    for module in (dmf.conv_out, dmf.scale, dmf.bias, dmf.enc):
        assert all(not p.requires_grad for p in module.parameters())
    assert dmf.enc[0].conv_out.weight.shape == (256, 512, 1, 1)  # hard-coded official widths, whatever ch is
    net, vq = stage3.double(), vqgan.double()
    backup = {k: v.clone() for k, v in net.state_dict().items()}
    try:
        with torch.no_grad():
            for module in (dmf.conv_out, dmf.scale, dmf.bias, dmf.enc, net.flowUpsamplerNet.f):
                for p in module.parameters():
                    p.fill_(123.0)
            again = net(golden["input"], vq)
        torch.testing.assert_close(again, run64["plain"], rtol=0, atol=0)
    finally:
        net.load_state_dict(backup)


def test_gradients_reach_only_the_trainable_aft_parameters(golden):
    net = GLARENet(**net_kwargs(golden), per_sample_rescale=False)
    load_official(net, golden["full_state_dict"])
    vq = from_official(GLAREVQGAN, golden["vqgan_state_dict"], **vqgan_kwargs(golden)).requires_grad_(False)
    net.RRDB.requires_grad_(False)
    net.flowUpsamplerNet.requires_grad_(False)
    net(golden["input"][:1].float(), vq).square().mean().backward()
    dmf = net.deformable_decoder
    assert dmf.mix[0].w.grad is not None and dmf.warp[1].dcn.conv_offset.weight.grad.abs().sum() > 0
    assert dmf.residual_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.RRDB.parameters())
    assert all(p.grad is None for p in dmf.enc.parameters())


def test_load_official_errors_and_stage2_only(golden):
    net = GLARENet(**net_kwargs(golden), per_sample_rescale=False)
    full = dict(golden["full_state_dict"])
    del full["deformable_decoder.mix.0.w"]
    with pytest.raises(StrictLoadError, match=r"missing keys .*\(1\):\n  deformable_decoder\.mix\.0\.w"):
        load_official(net, full)
    with pytest.raises(StrictLoadError, match=r"missing keys .*\(\d+\):\n  deformable_decoder\."):
        load_official(net, golden["stage2_state_dict"])
    before = net.deformable_decoder.conv_in.weight.clone()
    load_official(net, golden["stage2_state_dict"], stage2_only=True)
    torch.testing.assert_close(
        net.RRDB.color_conv.weight, golden["stage2_state_dict"]["RRDB.color_conv.weight"].float()
    )
    assert torch.equal(net.deformable_decoder.conv_in.weight, before)


def test_official_sizes_match_net_g_layout():
    with torch.device("meta"):
        net = GLARENet()
    sd = net.state_dict()
    assert len(sd) == 824  # docs/glare.md "State-dict names"
    assert sum(v.numel() for v in sd.values()) == 71_715_259
    assert sd["deformable_decoder.warp.0.offset.weight"].shape == (256, 512, 3, 3)
    assert sd["deformable_decoder.warp.1.dcn.conv_offset.weight"].shape == (108, 128, 3, 3)
    assert sd["flowUpsamplerNet.f.0.weight"].shape == (384, 320, 3, 3)
    assert sd["RRDB.cond_conv.0.weight"].shape == (64, 3, 3, 3)
    assert isinstance(net.deformable_decoder, MultiScaleDecoder)


# ----------------------------------------------------------------------------------------------- scripts
def test_convert_official_on_golden_files(golden, tmp_path):
    arch = net_kwargs(golden)
    torch.save(dict(golden["full_state_dict"]), tmp_path / "net_G.pth")
    torch.save(dict(golden["vqgan_state_dict"]), tmp_path / "vqgan.pkl")
    rep = convert_official.convert(tmp_path / "net_G.pth", tmp_path / "g.pth", arch=arch)
    assert rep["kind"] == "net_g" and rep["written"] and not (rep["missing"] or rep["unexpected"] or rep["shape"])
    net = GLARENet(**arch)
    net.load_state_dict(torch.load(tmp_path / "g.pth", weights_only=True)["params"], strict=True)
    rep = convert_official.convert(tmp_path / "vqgan.pkl", tmp_path / "v.pth", arch=vqgan_kwargs(golden))
    assert rep["kind"] == "vqgan" and rep["written"] and len(rep["dropped"]) == 20
    GLAREVQGAN(**vqgan_kwargs(golden)).load_state_dict(torch.load(tmp_path / "v.pth")["params"], strict=True)
    # mismatches are reported and nothing is written
    bad = dict(golden["full_state_dict"])
    bad["extra.key"] = torch.zeros(2)
    bad["RRDB.color_conv.bias"] = torch.zeros(5)
    del bad["deformable_decoder.residual_conv.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    assert convert_official.main([str(tmp_path / "bad.pth"), str(tmp_path / "out.pth"), "--arch-json", "{}"]) == 1
    rep = convert_official.convert(tmp_path / "bad.pth", tmp_path / "out.pth", arch=arch)
    assert rep["unexpected"] == ["extra.key"] and rep["missing"] == ["deformable_decoder.residual_conv.bias"]
    assert rep["shape"] == [("RRDB.color_conv.bias", (5,), (3,))] and not rep["written"]
    assert not (tmp_path / "out.pth").exists()


def test_count_params_macs_backends_agree_and_official_params():
    net, vq = count_params_macs.build(tiny=True, device="meta")
    meta = count_params_macs.mac_table(net, vq, 16, 24, backend="torch")
    net_cpu, vq_cpu = count_params_macs.build(tiny=True, device="cpu")
    real = count_params_macs.mac_table(net_cpu, vq_cpu, 16, 24, backend="mmengine")
    assert meta == real and all(meta[s] > 0 for s in count_params_macs.STAGES)
    net, vq = count_params_macs.build(tiny=False, device="meta")
    assert {m.impl for m in net.modules() if hasattr(m, "uses_tapwise")} == {"im2col"}  # countable at any size
    rows = count_params_macs.param_table(net, vq)
    assert rows["net_G.pth (E_c + flow + D_MF, incl. unused)"] == 71_715_259
    assert rows["VQGAN (vqgan.pkl core: E_NL, Q, D_NL, 1x1 convs)"] == 60_581_022
    assert abs(rows["total used at inference"] / 1e6 - 101.4) < 0.05


@pytest.mark.parametrize("backend", ["torch", "mmengine"])
def test_count_macs_counts_attention_and_deformable_conv(backend):
    """FlopAnalyzer alone counts SDPA and deform_conv2d as 0: the script's handles must count them exactly."""
    from glare_nat_arch.aft import WarpBlock
    from glare_nat_arch.blocks import AttnBlock

    count = count_params_macs.count_torch if backend == "torch" else count_params_macs.count_mmengine
    c, h, w = 32, 6, 10
    n = h * w
    attn = AttnBlock(c).requires_grad_(False)
    assert count(attn, (torch.rand(1, c, h, w),)) == 4 * n * c * c + 2 * n * n * c
    warp = WarpBlock(c).requires_grad_(False)
    feats = (torch.rand(1, c, h, w), torch.rand(1, c, h, w))
    expected = n * 9 * (2 * c * c + c * 108 + c * c)  # offset conv + DCN conv_offset + deformable conv itself
    assert count(warp, feats) == expected


def test_fusion_runs_in_float32_under_autocast_and_survives_a_ratio_fp16_cannot_hold(golden, stage3, vqgan):
    """As the official model, the adaptive mix-up, the deformable warp (offsets, mask) and the mean-ratio rescale
    compute in float32 under fp16 autocast. With the warp's output at 1e-8 (below fp16's smallest subnormal,
    6e-8) an fp16 fusion gets ``u.mean() = 0`` and an infinite ratio; in float32 the output stays finite."""
    net, vq = copy.deepcopy(stage3).float(), copy.deepcopy(vqgan).float()
    dmf = net.deformable_decoder
    with torch.no_grad():
        for warp in dmf.warp:
            warp.dcn.weight.zero_()
            warp.dcn.bias.fill_(1e-8)
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__, [a.dtype for a in args if torch.is_tensor(a)], out.dtype))

    hooks = [m.register_forward_hook(record) for m in (*dmf.warp, *dmf.mix)]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            out = net(golden["input"].float(), vq)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 4 and all(d == [torch.float32] * 2 and o == torch.float32 for _, d, o in seen), seen
    assert torch.isfinite(out).all()
