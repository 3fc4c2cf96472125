"""Shared helpers of the NAT tests: a tiny LatentNAT from flat keywords, its inputs, a tensor-size recorder."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glare_nat_arch.nat_arch import LatentNAT

K = 32  # tiny codebook
COND = 4


#: flat test keyword -> (group, key) of the ``network_g.nat2`` options
NAT2_KEYS = {
    **{k: ("model", k) for k in ("dim", "depth", "heads", "mlp_ratio", "dropout", "uvit_skips", "pos", "cond_mode")},
    **{k: ("model", k) for k in ("tok_init", "mask_hides_latent")},
    "merge": ("grid", "merge"),
    **{k: ("uncertainty", k) for k in ("knn", "dist_temp", "tau", "rho_max", "rho_target")},
    "uncertainty_source": ("uncertainty", "source"),
    **{k: ("decode", k) for k in ("iters", "schedule", "conf", "sample_temp", "choice_temp", "early_stop")},
    **{k: ("decode", k) for k in ("remask_rule", "remask_scope", "flow_prior", "order")},
    "feedback": ("feedback", "mode"),
}


def latent_nat(**kw) -> LatentNAT:
    """``LatentNAT(K, options, ...)`` from flat keywords (None for ``dist_temp`` / ``tau`` = ``auto``)."""
    extra = {k: kw.pop(k) for k in ("cond_channels", "code_dim", "chunk", "head_chunk") if k in kw}
    options: dict = {}
    for key, value in kw.items():
        group, name = NAT2_KEYS[key]
        options.setdefault(group, {})[name] = "auto" if value is None and name in ("dist_temp", "tau") else value
    return LatentNAT(K, options, **extra)


def tiny_latent_nat(**kw) -> LatentNAT:
    opts = dict(dim=32, depth=2, heads=2, dropout=0.0, cond_channels=COND, knn=8, dist_temp=0.05, tau=0.0)
    opts.update(kw)
    torch.manual_seed(0)
    return latent_nat(**opts).eval()


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


def dyadic(*shape: int, seed: int) -> torch.Tensor:
    """Values k/4, |k| <= 8: squared distances of such vectors are exact in float32 along any path."""
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).float() / 4
