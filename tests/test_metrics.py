"""GT-mean PSNR/SSIM (golden parity with the official GLARE procedure) and local-weights LPIPS."""

from __future__ import annotations

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import cv2
import numpy as np
import pytest
import torch
from basicsr.metrics import calculate_metric, calculate_psnr, calculate_ssim
from basicsr.utils.registry import METRIC_REGISTRY

from glare_nat_models import metrics as M


@pytest.fixture(scope="module")
def pair(golden) -> dict:
    """The golden pair as BasicSR hands it to metrics: uint8 HWC **BGR**."""
    m = golden["outputs"]["metrics"]
    return {
        "m": m,
        "out": np.ascontiguousarray(m["pred_uint8"].numpy()[..., ::-1]),
        "gt": np.ascontiguousarray(m["gt_uint8"].numpy()[..., ::-1]),
    }


# ----------------------------------------------------------------------------------------------- GT-mean
def test_official_mode_matches_golden(pair):
    m, out, gt = pair["m"], pair["out"], pair["gt"]
    assert M.gray_mean(out / 255.0, "official") == pytest.approx(m["gray_mean_pred"], abs=1e-7)
    assert M.gray_mean(gt / 255.0, "official") == pytest.approx(m["gray_mean_gt"], abs=1e-7)
    adjusted, scale = M.gt_mean_adjust(out / 255.0, gt / 255.0, "official")
    assert scale == pytest.approx(m["scale"], abs=1e-7)
    np.testing.assert_allclose(adjusted[..., ::-1], m["pred_adjusted"].numpy(), rtol=0, atol=1e-6)
    # so the same uint8 values: no value lies within 1e-6 of a rounding boundary (the closest is 3e-6 away)
    steps = m["pred_adjusted"].numpy() * 255
    assert np.abs(steps - np.floor(steps) - 0.5).min() > 255 * 1e-6
    np.testing.assert_array_equal(M.to_uint8(adjusted)[..., ::-1], m["pred_adjusted_uint8"].numpy())
    psnr = M.calculate_psnr_gtmean(out, gt, crop_border=0, mode="official")
    ssim = M.calculate_ssim_gtmean(out, gt, crop_border=0, mode="official")
    assert psnr == pytest.approx(m["psnr_gtmean"], abs=1e-6)
    assert ssim == pytest.approx(m["ssim_gtmean"], abs=1e-6)


def test_unadjusted_golden_values_are_basicsr_metrics(pair):
    m, out, gt = pair["m"], pair["out"], pair["gt"]
    assert calculate_psnr(out, gt, crop_border=0) == pytest.approx(m["psnr_unadjusted"], abs=1e-6)
    assert calculate_ssim(out, gt, crop_border=0) == pytest.approx(m["ssim_unadjusted"], abs=1e-6)


def test_registered_and_callable_through_basicsr(pair):
    m, out, gt = pair["m"], pair["out"], pair["gt"]
    for name in ("calculate_psnr_gtmean", "calculate_ssim_gtmean", "calculate_lpips", "calculate_lpips_gtmean"):
        assert METRIC_REGISTRY.get(name) is getattr(M, name)
    opt = {"type": "calculate_psnr_gtmean", "crop_border": 0, "mode": "official"}
    assert calculate_metric({"img": out, "img2": gt}, opt) == pytest.approx(m["psnr_gtmean"], abs=1e-6)


def test_float_arrays_take_precedence(pair):
    m, out, gt = pair["m"], pair["out"], pair["gt"]
    junk = np.zeros_like(out)  # the uint8 output must be ignored when img_float is given
    kw = dict(crop_border=0, mode="official", img_float=out / 255.0, img2_float=gt / 255.0)
    assert M.calculate_psnr_gtmean(junk, gt, **kw) == pytest.approx(m["psnr_gtmean"], abs=1e-6)
    assert M.calculate_ssim_gtmean(junk, gt, **kw) == pytest.approx(m["ssim_gtmean"], abs=1e-6)
    # an unrounded float output gives a different (float) PSNR than its uint8 rounding
    rng = np.random.default_rng(0)
    out_f = np.clip(out / 255.0 + rng.uniform(-0.5, 0.5, out.shape) / 255.0, 0, 1)
    p_float = M.calculate_psnr_gtmean(M.to_uint8(out_f), gt, img_float=out_f)
    p_uint8 = M.calculate_psnr_gtmean(M.to_uint8(out_f), gt)
    assert p_float != p_uint8


def test_bt601_weights_and_channel_order(pair):
    out = pair["out"] / 255.0
    # cv2's BGR2GRAY on a BGR array is the correct BT.601 luma
    ref = cv2.cvtColor(out.astype(np.float32), cv2.COLOR_BGR2GRAY).astype(np.float64).mean()
    assert M.gray_mean(out, "bt601") == pytest.approx(ref, abs=1e-6)
    b, g, r = (out[..., i].mean() for i in range(3))
    assert M.gray_mean(out, "bt601") == pytest.approx(0.299 * r + 0.587 * g + 0.114 * b, abs=1e-12)
    # the official mode swaps the R and B weights
    assert M.gray_mean(out, "official") == pytest.approx(0.114 * r + 0.587 * g + 0.299 * b, abs=1e-6)


def test_bt601_differs_from_official_when_r_and_b_differ(pair):
    out, gt = pair["out"], pair["gt"]
    assert abs(out[..., 0].mean() - out[..., 2].mean()) > 5  # the golden pair has a colour cast
    _, s_bt = M.gt_mean_adjust(out / 255.0, gt / 255.0, "bt601")
    _, s_off = M.gt_mean_adjust(out / 255.0, gt / 255.0, "official")
    assert abs(s_bt - s_off) > 1e-3
    assert abs(M.calculate_psnr_gtmean(out, gt) - M.calculate_psnr_gtmean(out, gt, mode="official")) > 0.05
    # ... and the two modes agree on a gray image (R = G = B)
    gray_out = np.repeat(out[..., 1:2], 3, axis=2)
    gray_gt = np.repeat(gt[..., 1:2], 3, axis=2)
    p = [M.calculate_psnr_gtmean(gray_out, gray_gt, mode=mo) for mo in M.GTMEAN_MODES]
    assert p[0] == pytest.approx(p[1], abs=1e-5)


@pytest.mark.parametrize("mode", M.GTMEAN_MODES)
def test_identity_and_darkened_copy(pair, mode):
    gt = pair["gt"]
    assert M.calculate_psnr_gtmean(gt, gt, mode=mode) == float("inf")
    assert M.calculate_ssim_gtmean(gt, gt, mode=mode) == pytest.approx(1.0, abs=1e-12)
    # a globally darkened copy is restored by the GT mean (float output, before rounding)
    dark = 0.3 * gt / 255.0
    kw = dict(mode=mode, img_float=dark)
    assert calculate_psnr(M.to_uint8(dark), gt, crop_border=0) < 15
    assert M.calculate_psnr_gtmean(M.to_uint8(dark), gt, **kw) > 100
    assert M.calculate_ssim_gtmean(M.to_uint8(dark), gt, **kw) > 0.9999


def test_black_output_and_clipping():
    gt = np.full((16, 16, 3), 128, np.uint8)
    adjusted, scale = M.gt_mean_adjust(np.zeros((16, 16, 3)), gt / 255.0)
    assert scale == 1.0 and np.all(adjusted == 0)
    assert np.isfinite(M.calculate_psnr_gtmean(np.zeros_like(gt), gt))
    # out-of-range float outputs are clamped to [0, 1] before the adjustment, results clipped after
    out = np.full((16, 16, 3), 0.25)
    out[0, 0] = [-3.0, 2.0, 7.0]
    adjusted, _ = M.gt_mean_adjust(out, gt / 255.0)
    assert adjusted.min() >= 0 and adjusted.max() <= 1


def test_chw_order_and_crop_border(pair):
    out, gt = pair["out"], pair["gt"]
    hwc = M.calculate_psnr_gtmean(out, gt)
    chw = M.calculate_psnr_gtmean(out.transpose(2, 0, 1), gt.transpose(2, 0, 1), input_order="CHW")
    assert chw == pytest.approx(hwc, abs=1e-12)
    adjusted, _ = M.gt_mean_adjust(out / 255.0, gt / 255.0)  # scale from the whole image, then crop
    mse = np.mean((adjusted[4:-4, 4:-4] - gt[4:-4, 4:-4] / 255.0) ** 2)
    assert M.calculate_psnr_gtmean(out, gt, crop_border=4) == pytest.approx(10 * np.log10(1 / mse), abs=1e-9)


def test_bad_inputs_raise_clear_errors(pair):
    out, gt = pair["out"], pair["gt"]
    with pytest.raises(ValueError, match="unknown mode 'bt709'"):
        M.calculate_psnr_gtmean(out, gt, mode="bt709")
    with pytest.raises(ValueError, match="differs from GT shape"):
        M.calculate_psnr_gtmean(out[:8], gt)
    with pytest.raises(ValueError, match="test_y_channel"):
        M.calculate_ssim_gtmean(out, gt, test_y_channel=True)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        M.gray_mean(out[..., 0] / 255.0)
    with pytest.raises(TypeError, match="uint8"):
        M.calculate_psnr_gtmean(out / 255.0, gt)


# ----------------------------------------------------------------------------------------------- LPIPS
# torchvision AlexNet ``features`` conv layers: index -> weight shape (the trunk LPIPS uses)
_ALEX_CONVS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}


def save_random_alexnet(path, seed: int) -> dict:
    """A random torchvision-AlexNet state dict (``features.*`` keys only) saved at ``path``, built without the
    61M-parameter classifier to keep the tests fast."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, shape in _ALEX_CONVS.items():
        state[f"features.{i}.weight"] = (
            torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        )
        state[f"features.{i}.bias"] = 0.01 * torch.randn(shape[0], generator=g)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("alexnet")
    a, b = d / "alex_a.pth", d / "alex_b.pth"
    return {"a": a, "b": b, "state_a": save_random_alexnet(a, 0), "state_b": save_random_alexnet(b, 1)}


def test_lpips_loads_local_weights_and_caches(alex_files):
    net = M.get_lpips_net(str(alex_files["a"]))
    assert M.get_lpips_net(str(alex_files["a"])) is net  # built once per process
    torch.testing.assert_close(getattr(net.net.slice2, "3").weight, alex_files["state_a"]["features.3.weight"])
    torch.testing.assert_close(getattr(net.net.slice5, "10").bias, alex_files["state_a"]["features.10.bias"])
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_lpips_values(pair, alex_files):
    out, gt = pair["out"], pair["gt"]
    wa, wb = str(alex_files["a"]), str(alex_files["b"])
    v = M.calculate_lpips(out, gt, alexnet_weights=wa)
    assert v > 0 and np.isfinite(v)
    assert M.calculate_lpips(out, gt, alexnet_weights=wa) == v  # deterministic
    assert M.calculate_lpips(gt, gt, alexnet_weights=wa) == 0.0
    assert M.calculate_lpips(out, gt, alexnet_weights=wb) != pytest.approx(v, abs=1e-6)  # the weights matter
    # BGR input is converted to RGB before the network (the scaling layer is channel-specific)
    net = M.get_lpips_net(wa)
    assert v == pytest.approx(M.lpips_distance(out[..., ::-1], gt[..., ::-1], net), abs=1e-7)
    assert v != pytest.approx(M.lpips_distance(out, gt, net), abs=1e-6)


def test_lpips_gtmean(pair, alex_files):
    out, gt = pair["out"], pair["gt"]
    w = str(alex_files["a"])
    adjusted, _ = M.gt_mean_adjust(out / 255.0, gt / 255.0, "official")
    expected = M.lpips_distance(M.to_uint8(adjusted)[..., ::-1], gt[..., ::-1], M.get_lpips_net(w))
    assert M.calculate_lpips_gtmean(out, gt, mode="official", alexnet_weights=w) == pytest.approx(expected, abs=1e-9)
    dark = 0.3 * gt / 255.0
    assert M.calculate_lpips_gtmean(M.to_uint8(dark), gt, img_float=dark, alexnet_weights=w) == 0.0


def test_lpips_weight_resolution_and_errors(pair, alex_files, tmp_path, monkeypatch):
    out, gt = pair["out"], pair["gt"]
    monkeypatch.delenv("GLARE_NAT_ALEXNET", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth") as err:
        M.calculate_lpips(out, gt)
    assert "GLARE_NAT_ALEXNET" in str(err.value) and "never downloads" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        M.calculate_lpips(out, gt, alexnet_weights=str(tmp_path / "nope.pth"))
    # environment variable, then the torchvision cache location
    monkeypatch.setenv("GLARE_NAT_ALEXNET", str(alex_files["a"]))
    assert M.get_lpips_net() is M.get_lpips_net(str(alex_files["a"]))
    monkeypatch.delenv("GLARE_NAT_ALEXNET")
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "alexnet-owt-7be5be79.pth").symlink_to(alex_files["b"])
    assert M.calculate_lpips(out, gt) == M.calculate_lpips(out, gt, alexnet_weights=str(alex_files["b"]))
    # a file that is not an AlexNet state dict
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="missing"):
        M.calculate_lpips(out, gt, alexnet_weights=str(bad))
