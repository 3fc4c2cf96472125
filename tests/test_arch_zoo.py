"""Every architecture this project registers, tested at its tiny size: registering one is enough to test it.

A registered arch declares ``TINY`` (class attribute: keyword arguments of a small instance). For each, this module
builds it through BasicSR's ``build_network``, runs ``forward`` on inputs chosen by the names of its required
arguments (:data:`INPUTS`), back-propagates the sum of its floating-point outputs and checks that every trainable
parameter gets a finite gradient (parameters a network trains through another loss are named in its
``TRAINED_OUTSIDE_FORWARD`` prefixes), and that a strict state-dict round trip into a differently initialised
instance gives the same outputs. A new argument name fails with a message saying where to add it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from copy import deepcopy
from typing import Any

import pytest
import torch
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

import glare_nat_models  # noqa: F401  (registers every part)

OURS = sorted(name for name, cls in ARCH_REGISTRY._obj_map.items() if cls.__module__.startswith("glare_nat_"))
BATCH, SIZE = 2, 32


def _image(seed: int) -> Tensor:
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _vqgan() -> nn.Module:
    cls = ARCH_REGISTRY.get("GLAREVQGAN")
    torch.manual_seed(1)
    return build_network({"type": "GLAREVQGAN", **deepcopy(cls.TINY)}).eval()


def _latent(net: nn.Module) -> Tensor:
    with torch.no_grad():
        return _vqgan().encode(_image(2))


GRID = 8  # latent / feature grid of the NAT parts


def _grid(net: nn.Module, channels: int, seed: int) -> Tensor:
    return torch.rand(BATCH, channels, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def _tokens(net: nn.Module) -> Tensor:
    """Codes ``0..K-1`` with the [MASK] id ``K`` at the query positions (as in training)."""
    codes = torch.randint(0, net.codebook_size, (BATCH, GRID, GRID), generator=torch.Generator().manual_seed(4))
    return torch.where(_query_mask(net), torch.full_like(codes, net.mask_token_id), codes)


def _query_mask(net: nn.Module) -> Tensor:
    return torch.rand(BATCH, GRID, GRID, generator=torch.Generator().manual_seed(5)) < 0.4


#: Required forward arguments by name -> a builder taking the network under test.
INPUTS: dict[str, Callable[[nn.Module], Any]] = {
    "x": lambda net: _image(0),
    "lq": lambda net: _image(0),
    "vqgan": lambda net: _vqgan(),
    "gt_latent": _latent,
    # LatentNAT (forward = logits at the query positions)
    "tokens": _tokens,
    "query_mask": _query_mask,
    "x_hat": lambda net: _grid(net, net.code_dim, 6),
    "color_map": lambda net: _grid(net, net.code_dim, 7),
    "cond": lambda net: _grid(net, net.cond_channels, 8),
    "entropy": lambda net: _grid(net, 1, 9)[:, 0],
    # DecoderNAT
    "h": lambda net: _grid(net, net.in_channels, 10),
    "cond_feat": lambda net: _grid(net, net.cond_channels, 11),
    "uncertainty": lambda net: _grid(net, 1, 12)[:, 0],
}


def _build(name: str, seed: int) -> nn.Module:
    cls = ARCH_REGISTRY.get(name)
    assert hasattr(cls, "TINY"), f"{name} ({cls.__module__}) is registered but declares no TINY keyword arguments"
    torch.manual_seed(seed)
    return build_network({"type": name, **deepcopy(cls.TINY)})


def _inputs(net: nn.Module) -> dict[str, Any]:
    params = inspect.signature(net.forward).parameters.values()
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
    missing = [n for n in required if n not in INPUTS]
    assert not missing, f"{type(net).__name__}.forward needs {missing}: add a builder to INPUTS in {__file__}"
    return {n: INPUTS[n](net) for n in required}


def _float_tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _float_tensors(o)]
    return []


@pytest.mark.parametrize("name", OURS)
def test_forward_backward_reaches_every_trainable_parameter(name):
    net = _build(name, seed=0).train()
    outputs = _float_tensors(net(**_inputs(net)))
    assert outputs, f"{name}.forward returned no floating-point tensor"
    loss = sum(o.float().sum() for o in outputs if o.requires_grad)
    loss.backward()
    outside = tuple(getattr(type(net), "TRAINED_OUTSIDE_FORWARD", ()))
    unreached = []
    for pname, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            if not pname.startswith(outside):
                unreached.append(pname)
            continue
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
    assert not unreached, f"{name}: no gradient reaches {unreached[:8]} ({len(unreached)} parameters)"


@pytest.mark.parametrize("name", OURS)
def test_strict_state_dict_round_trip_gives_the_same_outputs(name):
    src, dst = _build(name, seed=0).eval(), _build(name, seed=1).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    torch.manual_seed(3)
    inputs = _inputs(src)
    with torch.no_grad():
        a, b = _float_tensors(src(**inputs)), _float_tensors(dst(**inputs))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # same weights, same ops on the same shapes: identical by construction
        assert torch.equal(x, y), name


def test_every_registered_arch_is_covered():
    assert {"GLAREVQGAN", "GLAREFlowNet", "GLARENet", "GLARENATFlowNet", "GLARENATNet"} <= set(OURS)
