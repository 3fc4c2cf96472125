"""NAT-III (DecoderNAT): identity at init, patch masks, gradients, tau3 calibration."""

from __future__ import annotations

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)

# isort: split
import numpy as np
import pytest
import torch

from glare_nat_arch.decoder_nat_arch import DecoderNAT
from tests.nat_helpers import COND


# ---------------------------------------------------------------- DecoderNAT
def tiny_decoder_nat(tau3: float | None = 0.5, residual: str = "masked_only") -> DecoderNAT:
    options = {"model": {"dim": 32, "depth": 2, "heads": 2}, "mask": {"tau3": "auto" if tau3 is None else tau3}}
    torch.manual_seed(0)
    return DecoderNAT(8, {**options, "residual": residual}, cond_channels=COND)


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
