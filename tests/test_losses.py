"""MS-SSIM (vs a naive implementation, both combination modes), VGG16 perceptual, LPIPS, hinge GAN,
adaptive GAN weight and the PatchGAN discriminator."""

from __future__ import annotations

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import numpy as np
import pytest
import torch
import torchvision
from basicsr.losses import build_loss
from basicsr.losses.gan_loss import GANLoss
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY
from numpy.lib.stride_tricks import sliding_window_view

from glare_nat_arch.discriminator_arch import PatchGANDiscriminator
from glare_nat_models import losses as L
from glare_nat_models import metrics as M
from tests.test_metrics import save_random_alexnet


def _pair(shape=(2, 3, 40, 36), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = (0.7 * x + 0.3 * torch.rand(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


# ---------------------------------------------------------------------------------------------- MS-SSIM
def _naive_ms_ssim(x: np.ndarray, y: np.ndarray, official_bug: bool) -> float:
    """Direct numpy MS-SSIM following the written definition (docs/glare.md "Stage III: AFT decoder"), float64."""
    w = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])
    ss, cs = [], []
    for level in range(5):
        if level:  # 2x2 average pooling, odd remainders dropped
            n, c, h, wd = x.shape
            x = x[..., : h // 2 * 2, : wd // 2 * 2].reshape(n, c, h // 2, 2, wd // 2, 2).mean((3, 5))
            y = y[..., : h // 2 * 2, : wd // 2 * 2].reshape(n, c, h // 2, 2, wd // 2, 2).mean((3, 5))
        k = min(11, *x.shape[-2:])
        g = np.exp(-((np.arange(k) - k // 2) ** 2) / (2 * 1.5**2))
        win = np.outer(g, g) / g.sum() ** 2

        def filt(a, k=k, win=win):  # 'valid' correlation
            return np.einsum("nchwij,ij->nchw", sliding_window_view(a, (k, k), axis=(2, 3)), win)

        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
        c1, c2 = 0.01**2, 0.03**2
        cs_map = (2 * cxy + c2) / (vx + vy + c2)
        ss.append(((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs_map).mean())
        cs.append(cs_map.mean())
    ss_n, cs_n = (np.array(ss) + 1) / 2, (np.array(cs) + 1) / 2
    if official_bug:
        return float(np.prod(cs_n[:4] ** w[:4] * ss_n[4] ** w[4]))
    return float(np.prod(cs_n[:4] ** w[:4]) * ss_n[4] ** w[4])


@pytest.mark.parametrize("official_bug", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 40, 36), (1, 3, 180, 176)])
def test_ms_ssim_matches_naive(official_bug, shape):
    # 40x36 shrinks the window at the three coarsest scales (9x9 odd, 4x4 and 2x2 even); 180x176 never does
    x, y = _pair(shape)
    expected = _naive_ms_ssim(x.numpy(), y.numpy(), official_bug)
    got = L.ms_ssim(x, y, official_bug=official_bug)
    assert got.item() == pytest.approx(expected, abs=1e-10)
    loss = L.MSSSIMLoss(loss_weight=0.2, official_bug=official_bug)(x, y)
    assert loss.item() == pytest.approx(0.2 * (1 - expected), abs=1e-10)


def test_ms_ssim_bug_modes_differ_by_last_scale_power():
    x, y = _pair()
    buggy, correct = L.ms_ssim(x, y, official_bug=True), L.ms_ssim(x, y, official_bug=False)
    assert abs(buggy.item() - correct.item()) > 1e-4  # the two modes really differ on a noisy pair
    assert buggy.item() < correct.item()  # the last-scale term (< 1) enters with 4x its weight


@pytest.mark.parametrize("official_bug", [True, False])
def test_ms_ssim_identical_gradient_and_float32(official_bug):
    x, y = _pair(dtype=torch.float32)
    loss_fn = L.MSSSIMLoss(official_bug=official_bug)
    assert loss_fn(y, y).item() == pytest.approx(0.0, abs=1e-6)
    pred = x.clone().requires_grad_(True)
    loss = loss_fn(pred, y)
    loss.backward()
    assert torch.isfinite(loss) and 0 < loss.item() < 1
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ms_ssim_half_inputs_and_autocast_run_in_float32():
    x, y = _pair(dtype=torch.float32)
    ref = L.ms_ssim(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L.ms_ssim(x, y).item() == ref.item()
    xh, yh = x.half(), y.half()
    got = L.ms_ssim(xh, yh)
    assert got.dtype == torch.float32 and got.item() == L.ms_ssim(xh.float(), yh.float()).item()


def test_ms_ssim_size_limits():
    x, y = _pair((1, 3, 16, 16))
    assert 0 < L.ms_ssim(x, y).item() < 1  # smallest allowed size
    x, y = _pair((1, 3, 15, 32))
    with pytest.raises(ValueError, match="at least 16x16"):
        L.ms_ssim(x, y)
    with pytest.raises(ValueError, match="equal shape"):
        L.MSSSIMLoss()(x, y[..., :8])


# ---------------------------------------------------------------------------------------------- VGG16
@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random torchvision VGG16 ``features.*`` weights (first 16 layers only, small) saved like torchvision's file."""
    torch.manual_seed(0)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])[:16]
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    return path, feats


def test_vgg16_layers_match_torchvision(vgg_file):
    path, tv_feats = vgg_file
    loss_fn = L.VGG16PerceptualLoss(weights_path=str(path))
    ours = loss_fn.net
    assert [type(m) for m in ours] == [type(m) for m in tv_feats]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv_feats.state_dict().items()}
    for k, v in tv_feats.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v)
    feats = loss_fn.features(torch.rand(1, 3, 16, 20))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 20), (1, 128, 8, 10), (1, 256, 4, 5)]


def test_vgg16_value_matches_direct_computation(vgg_file):
    path, tv_feats = vgg_file
    x, y = _pair((2, 3, 24, 20), dtype=torch.float32)
    got = L.VGG16PerceptualLoss(loss_weight=0.01, weights_path=str(path))(x, y)
    tv_feats.eval()
    with torch.no_grad():  # relu1_2 = features[:4], relu2_2 = [:9], relu3_3 = [:16]; no ImageNet normalisation
        mses = [torch.mean((tv_feats[:n](x) - tv_feats[:n](y)) ** 2) for n in (4, 9, 16)]
    torch.testing.assert_close(got, 0.01 * sum(mses) / 3, rtol=1e-5, atol=1e-9)


def test_vgg16_identity_gradient_frozen(vgg_file):
    path, _ = vgg_file
    loss_fn = build_loss({"type": "VGG16PerceptualLoss", "loss_weight": 1.0, "weights_path": str(path)})
    loss_fn.train()
    assert not loss_fn.net.training and not any(p.requires_grad for p in loss_fn.parameters())
    x, y = _pair((1, 3, 16, 16), dtype=torch.float32)
    assert loss_fn(y, y).item() == 0.0
    pred = x.clone().requires_grad_(True)
    loss = loss_fn(pred, y)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_vgg16_weights_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GLARE_NAT_VGG16", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as err:
        L.VGG16PerceptualLoss()
    assert "GLARE_NAT_VGG16" in str(err.value)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    monkeypatch.setenv("GLARE_NAT_VGG16", str(bad))
    with pytest.raises(ValueError, match="missing"):
        L.VGG16PerceptualLoss()
    loss_fn = L.VGG16PerceptualLoss(weights_path="random")  # explicit opt-in, not from the env
    assert isinstance(loss_fn.net, torch.nn.Sequential)


# ---------------------------------------------------------------------------------------------- LPIPS
def test_lpips_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("GLARE_NAT_VGG16", raising=False)  # net 'auto' falls back to AlexNet without VGG16 weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    path = tmp_path / "alex.pth"
    save_random_alexnet(path, seed=0)
    loss_fn = L.LPIPSLoss(loss_weight=2.0, alexnet_weights=str(path))
    loss_fn.train()
    assert not loss_fn.net.training and not any(p.requires_grad for p in loss_fn.parameters())
    x, y = _pair((2, 3, 32, 32), dtype=torch.float32)
    x, y = (x * 255).round() / 255, (y * 255).round() / 255
    assert loss_fn(y, y).item() == 0.0
    # same number as the metric on the uint8 images (one LPIPS builder), mean over the batch, times the weight
    net = M.get_lpips_net(str(path))
    per_img = [
        M.lpips_distance(*(t[i].permute(1, 2, 0).mul(255).round().byte().numpy() for t in (x, y)), net)
        for i in range(2)
    ]
    pred = x.clone().requires_grad_(True)
    loss = loss_fn(pred, y)
    assert loss.item() == pytest.approx(2.0 * np.mean(per_img), rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert loss_fn.trunk == "alex"
    monkeypatch.delenv("GLARE_NAT_ALEXNET", raising=False)
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        L.LPIPSLoss()


def test_lpips_loss_takes_vgg16_where_its_weights_are_local(tmp_path, monkeypatch):
    """taming's VQGAN recipe uses LPIPS-VGG: 'auto' picks it when torchvision's VGG16 file is found (its trunk is
    loaded from that file), 'vgg' insists on it, and without the file 'auto' falls back to AlexNet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    vgg = torchvision.models.vgg16()
    file = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), file)
    loss_fn = L.LPIPSLoss(vgg16_weights=str(file))
    assert loss_fn.trunk == "vgg"
    torch.testing.assert_close(getattr(loss_fn.net.net.slice3, "10").weight, vgg.features[10].weight, rtol=0, atol=0)
    monkeypatch.delenv("GLARE_NAT_VGG16", raising=False)
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        L.LPIPSLoss(net="vgg")
    assert L.LPIPSLoss(alexnet_weights="random").trunk == "alex"


# ---------------------------------------------------------------------------------------------- GAN
def test_hinge_gan_loss_matches_taming():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(2, 1, 6, 6, generator=g), torch.randn(2, 1, 6, 6, generator=g)
    hinge = build_loss({"type": "HingeGANLoss", "loss_weight": 0.5})
    taming_d = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    torch.testing.assert_close(hinge.discriminator_loss(real, fake), taming_d)
    torch.testing.assert_close(hinge(real, True, is_disc=True) + hinge(fake, False, is_disc=True), taming_d)
    torch.testing.assert_close(hinge(fake, True), -0.5 * fake.mean())
    # BasicSR's GANLoss('hinge'): same generator loss, but twice taming's discriminator loss
    bsr = GANLoss("hinge", loss_weight=0.5)
    torch.testing.assert_close(bsr(fake, True), hinge(fake, True))
    torch.testing.assert_close(bsr(real, True, is_disc=True) + bsr(fake, False, is_disc=True), 2 * taming_d)


def test_adaptive_gan_weight():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 3)
    h = x @ w.T
    nll, g_loss = (h**2).mean(), -h.mean()
    d = L.adaptive_gan_weight(nll, g_loss, w)
    grad_nll, grad_g = 2 * (h.T @ x) / h.numel(), -torch.ones_like(h).T @ x / h.numel()
    expected = grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(d, expected.detach())
    assert not d.requires_grad and d.dim() == 0
    nll.backward()  # graphs were retained
    h = x @ w.T
    assert L.adaptive_gan_weight((h**2).mean(), 0.0 * h.sum(), w).item() == 1e4  # clamped
    assert L.adaptive_gan_weight((h**2).mean(), 0.0 * h.sum(), w, max_weight=3.0).item() == 3.0


def test_patchgan_discriminator():
    assert ARCH_REGISTRY.get("PatchGANDiscriminator") is PatchGANDiscriminator
    torch.manual_seed(0)
    net = PatchGANDiscriminator()  # defaults: input_nc=3, ndf=64, n_layers=3
    # taming NLayerDiscriminator(3, 64, 3):
    # 3*64*16+64 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16+1 + BatchNorm 2*(128+256+512)
    assert sum(p.numel() for p in net.parameters()) == 2_765_633
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    big = torch.cat([c.weight.flatten() for c in convs])
    assert abs(big.std().item() - 0.02) < 1e-3 and abs(big.mean().item()) < 1e-3
    assert all(bn.bias.abs().sum() == 0 for bn in bns)
    assert abs(torch.cat([bn.weight for bn in bns]).mean().item() - 1.0) < 5e-3
    assert list(net.state_dict())[:3] == ["main.0.weight", "main.0.bias", "main.2.weight"]  # taming key names
    small = PatchGANDiscriminator(ndf=8)
    x = torch.rand(2, 3, 64, 48, requires_grad=True)
    out = small(x)
    assert out.shape == (2, 1, 6, 4)  # H/8 - 2, W/8 - 2
    out.mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert PatchGANDiscriminator(ndf=8, n_layers=2)(x[:, :, :32, :32]).shape == (2, 1, 6, 6)  # 32/4 - 2
    with pytest.raises(ValueError, match="n_layers"):
        PatchGANDiscriminator(n_layers=0)


def test_losses_registered():
    for name in ("MSSSIMLoss", "VGG16PerceptualLoss", "LPIPSLoss", "HingeGANLoss"):
        assert LOSS_REGISTRY.get(name) is getattr(L, name)
