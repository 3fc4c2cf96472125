"""GLARE latent flow (glare_nat_arch/flow.py): golden parity with the official code, invertibility, log-dets."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import glare_nat_arch  # noqa: F401  (compat shims first)
from glare_nat_arch.flow import (
    LOG_2PI,
    ActNorm2d,
    Conv2dActNorm,
    Conv2dZeros,
    InvertibleConv1x1,
    LatentFlow,
    flow_nll,
    gaussian_logp,
)

PREFIX = "flowUpsamplerNet."
F64 = {"rtol": 1e-6, "atol": 1e-5}
F32 = {"rtol": 1e-4, "atol": 1e-4}


def _golden_flow(golden: dict, dtype: torch.dtype) -> LatentFlow:
    """LatentFlow at the golden tiny config, loaded strict from ``stage2_state_dict``."""
    flow_opt = golden["config"]["opt_stage2"]["network_G"]["flow"]
    net = LatentFlow(
        in_channels=3,
        cond_channels=64,
        hidden_channels=flow_opt["CondAffineSeparatedAndCond"]["hidden_channels"],
        L=flow_opt["L"],
        K=flow_opt["K"],
        n_extra_steps=flow_opt["additionalFlowNoAffine"],
    ).to(dtype)
    sd = {k[len(PREFIX) :]: v for k, v in golden["stage2_state_dict"].items() if k.startswith(PREFIX)}
    net.load_state_dict(sd, strict=True)
    return net.eval()


def _inputs(golden: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    s2 = golden["outputs"]["stage2"]
    return s2["cond"].to(dtype), s2["color_map"].to(dtype), s2["z_nl"].to(dtype)


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, with non-zero coupling outputs and non-orthogonal invconvs (float64 net)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ActNorm2d):
                m.bias.normal_(0.0, 0.1, generator=g)
                m.logs.normal_(0.0, 0.1, generator=g)
                m.inited = True
            elif isinstance(m, InvertibleConv1x1):
                c = m.num_channels
                q1 = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
                q2 = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
                d = torch.exp(torch.rand(c, generator=g, dtype=torch.float64) * 0.6 - 0.3)
                m.weight.copy_(q1 @ torch.diag(d) @ q2)
            elif isinstance(m, Conv2dZeros):
                m.weight.normal_(0.0, 0.5 / math.sqrt(m.weight[0].numel()), generator=g)
                m.bias.normal_(0.0, 0.3, generator=g)
                m.logs.normal_(0.0, 0.05, generator=g)
            elif isinstance(m, Conv2dActNorm):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()), generator=g)


def _tiny_flow(in_channels: int = 3, seed: int = 0) -> LatentFlow:
    net = LatentFlow(in_channels, cond_channels=4, hidden_channels=5, L=2, K=1, n_extra_steps=1, unused_f_in=2)
    net = net.double().eval()
    _randomize(net, seed)
    return net


def test_layer_layout_official_and_golden(golden):
    official = LatentFlow()  # L=2, K=12, extra=2, hidden 64
    kinds = official.layer_kinds
    assert len(kinds) == 28
    assert [i for i, k in enumerate(kinds) if k == "noCoupling"] == [0, 1, 14, 15]
    n_used = sum(p.numel() for n, p in official.named_parameters() if not n.startswith("f."))
    assert n_used == 4 * 15 + 24 * (15 + 88_788)  # docs/glare.md "Parameters and MACs"
    assert official.f[0].weight.shape == (384, 320, 3, 3)
    assert _golden_flow(golden, torch.float64).layer_kinds == golden["config"]["flow_layers"]


def test_golden_state_dict_names_strict(golden):
    net = _golden_flow(golden, torch.float64)
    expected = {k[len(PREFIX) :] for k in golden["stage2_state_dict"] if k.startswith(PREFIX)}
    assert set(net.state_dict()) == expected
    assert all(m.inited for m in net.modules() if isinstance(m, ActNorm2d))


def test_golden_forward_fp64(golden):
    s2 = golden["outputs"]["stage2"]
    net = _golden_flow(golden, torch.float64)
    cond, _, z_nl = _inputs(golden, torch.float64)
    with torch.no_grad():
        z, logdet, steps = net(z_nl, cond, return_steps=True)
    assert_close(z, s2["z"], **F64)
    assert_close(logdet, s2["logdet"], **F64)
    assert_close(torch.stack([s[0] for s in steps]), s2["flow_forward_steps_z"], **F64)
    assert_close(torch.stack([s[1] for s in steps]), s2["flow_forward_steps_logdet"], **F64)


def test_golden_reverse_fp64(golden):
    s2 = golden["outputs"]["stage2"]
    net = _golden_flow(golden, torch.float64)
    cond, color_map, _ = _inputs(golden, torch.float64)
    with torch.no_grad():
        z_hat, logdet_rev, steps = net(color_map, cond, reverse=True, return_steps=True)
    assert_close(z_hat, s2["z_hat"], **F64)
    assert_close(logdet_rev, s2["logdet_reverse"], **F64)
    assert_close(torch.stack([s[0] for s in steps]), s2["flow_reverse_steps_z"], **F64)
    assert_close(torch.stack([s[1] for s in steps]), s2["flow_reverse_steps_logdet"], **F64)


def test_golden_logp_nll_fp64(golden):
    s2 = golden["outputs"]["stage2"]
    conv = golden["outputs"]["nll_convention"]
    net = _golden_flow(golden, torch.float64)
    cond, color_map, z_nl = _inputs(golden, torch.float64)
    with torch.no_grad():
        z, logdet = net(z_nl, cond)
    assert LOG_2PI == pytest.approx(conv["log_2pi"], abs=1e-15)
    assert z.shape[2] * z.shape[3] == conv["latent_pixels"]
    assert math.log(2.0) * conv["latent_pixels"] == pytest.approx(conv["normaliser"], abs=1e-12)
    assert_close(gaussian_logp(z, color_map), s2["logp_colormap_mean"], **F64)
    assert_close(gaussian_logp(z, z_nl), s2["logp_gt_mean"], **F64)
    assert_close(flow_nll(z, logdet, color_map), s2["nll_colormap_mean"], **F64)
    assert_close(flow_nll(z, logdet, z_nl), s2["nll_gt_mean"], **F64)
    # the divisor is ln2*h*w, not ln2*C*h*w
    expected = -(s2["logp_gt_mean"] + s2["logdet"]) / conv["normaliser"]
    assert_close(flow_nll(z, logdet, z_nl), expected, rtol=0, atol=1e-12)


def test_golden_fp32(golden):
    ref = golden["outputs_fp32"]["stage2"]
    net = _golden_flow(golden, torch.float32)
    cond, color_map, z_nl = _inputs(golden, torch.float32)
    with torch.no_grad():
        z, logdet = net(z_nl, cond)
        z_hat, _ = net(color_map, cond, reverse=True)
    assert z.dtype == z_hat.dtype == torch.float32
    assert_close(z.double(), ref["z"].double(), **F32)
    assert_close(logdet.double(), ref["logdet"].double(), **F32)
    assert_close(z_hat.double(), ref["z_hat"].double(), **F32)
    assert_close(flow_nll(z, logdet, color_map).double(), ref["nll_colormap_mean"].double(), **F32)
    assert_close(flow_nll(z, logdet, z_nl).double(), ref["nll_gt_mean"].double(), **F32)


@pytest.mark.parametrize("in_channels", [3, 4])
def test_roundtrip_and_logdet_cancel(in_channels):
    net = _tiny_flow(in_channels, seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, in_channels, 5, 7, generator=g, dtype=torch.float64)
    cond = torch.rand(2, 4, 5, 7, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = net(x, cond)
        x_rec, logdet_back = net(z, cond, logdet=logdet, reverse=True)
    assert (z - x).abs().max() > 0.1  # the flow is not the identity
    assert logdet.abs().min() > 0.1
    assert_close(x_rec, x, rtol=0, atol=1e-10)
    assert_close(logdet_back, torch.zeros_like(logdet), rtol=0, atol=1e-10)


@pytest.mark.parametrize("in_channels", [3, 4])
def test_logdet_equals_bruteforce_jacobian(in_channels):
    net = _tiny_flow(in_channels, seed=3)
    g = torch.Generator().manual_seed(4)
    shape = (1, in_channels, 2, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    cond = torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64)

    def fwd(v):
        return net(v.view(shape), cond)[0].flatten()

    def rev(v):
        return net(v.view(shape), cond, reverse=True)[0].flatten()

    for fn, reverse in ((fwd, False), (rev, True)):
        jac = torch.autograd.functional.jacobian(fn, x.flatten())
        brute = torch.linalg.slogdet(jac)[1]
        with torch.no_grad():
            _, logdet = net(x, cond, reverse=reverse)
        assert brute.abs() > 0.1
        assert_close(logdet[0], brute, rtol=0, atol=1e-10)


def test_actnorm_ddi_matches_golden(golden):
    ref = golden["outputs"]["actnorm_ddi"]
    x = ref["input"]
    an = ActNorm2d(3).double().train()
    assert not an.inited
    y, logdet = an(x, logdet=torch.zeros(x.shape[0], dtype=torch.float64))
    assert an.inited
    assert_close(an.bias.detach(), ref["bias"], **F64)
    assert_close(an.logs.detach(), ref["logs"], **F64)
    assert_close(y, ref["output"], **F64)
    assert_close(logdet, ref["logdet"], **F64)
    assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    # unit variance up to the +1e-6 in the denominator (smallest channel std here is 0.12, so ~2e-5 off)
    assert_close(y.pow(2).mean(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-4)
    # after init the parameters stay put on later training forwards
    bias = an.bias.detach().clone()
    an(x * 3.0 + 1.0)
    assert torch.equal(an.bias.detach(), bias)


def test_actnorm_ddi_skipped_in_eval_after_load_and_nonzero_bias():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2.0 + 1.0
    an = ActNorm2d(3).double().eval()
    y, _ = an(x)
    assert not an.inited and torch.equal(y, x)  # eval: no init, identity with zero params

    loaded = ActNorm2d(3).double()
    loaded.load_state_dict(ActNorm2d(3).state_dict())  # all-zero weights, but loaded
    assert loaded.inited
    assert set(loaded.state_dict()) == {"bias", "logs"}
    y, _ = loaded.train()(x)
    assert torch.equal(y, x) and torch.all(loaded.bias == 0)

    nonzero = ActNorm2d(3).double().train()
    with torch.no_grad():
        nonzero.bias.fill_(0.5)
    nonzero(x)
    assert nonzero.inited and torch.all(nonzero.bias == 0.5)  # official rule: non-zero bias counts as initialised


def test_fresh_flow_train_forward_initialises_all_actnorms():
    net = LatentFlow(3, cond_channels=4, hidden_channels=5, L=1, K=1, n_extra_steps=1, unused_f_in=2).double().train()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64) * 3.0 + 2.0
    net(x, torch.rand(2, 4, 4, 5, dtype=torch.float64))
    actnorms = [m for m in net.modules() if isinstance(m, ActNorm2d)]
    assert len(actnorms) == 2 + 2 * 2  # two steps + Conv2dActNorm x2 in each coupling sub-net
    assert all(m.inited for m in actnorms)
    y, _ = net.layers[0].actnorm(x)
    assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_zero_init_coupling_is_fixed_affine():
    """Fresh coupling outputs are zero, so it scales by sigmoid(2)+1e-4 exactly (official init behaviour)."""
    net = LatentFlow(3, cond_channels=4, hidden_channels=5, L=1, K=1, n_extra_steps=0, unused_f_in=2).double().eval()
    step = net.layers[0]
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64)
    z, logdet = step.affine(x, torch.rand(1, 4, 3, 4, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    s = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)) + 1e-4
    assert_close(z, torch.cat([x[:, :1] * s, x[:, 1:] * s * s], dim=1))
    assert_close(logdet, torch.log(s).reshape(1) * (3 * 12 + 2 * 12))


def test_bad_inputs_raise_clear_errors():
    net = _tiny_flow()
    z = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="cond batch/spatial size"):
        net(z, torch.zeros(2, 4, 4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond batch/spatial size"):
        net(z, torch.zeros(1, 4, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond must have 4 channels"):
        net(z, torch.zeros(2, 64, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="z must have 3 channels"):
        net(torch.zeros(2, 2, 4, 5, dtype=torch.float64), torch.zeros(2, 4, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="logdet must be"):
        net(z, torch.zeros(2, 4, 4, 5, dtype=torch.float64), logdet=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        gaussian_logp(z, z[:, :2])
    inv = InvertibleConv1x1(3).double()
    with torch.no_grad():
        inv.weight.zero_()
    with pytest.raises(RuntimeError, match="singular"):
        inv(z)
