"""GLARE Stage-II invertible latent normalizing flow (I-LNF), matching the official ``FlowUpsamplerNet``.

Math and parameter names follow ``LowLevelAI/GLARE`` (``FlowActNorms.py``, ``Permutations.py``, ``flow.py``,
``FlowAffineCouplingsAblation.py``, ``FlowStep.py``, ``FlowUpsamplerNet.py``) so that the official
``flowUpsamplerNet.*`` weights load with ``strict=True`` (see docs/glare.md "Flow steps").

Shapes: ``z`` is the latent ``(B, C, h, w)`` (C=3 in GLARE), ``cond`` is ``(B, cond_channels, h, w)`` (the same
64-channel tensor for every step), ``logdet`` is ``(B,)``.

Log-determinant sign convention (official): the forward pass adds ``log|det J_f|``; the reverse pass *subtracts*
the forward log-determinant of each step, so it accumulates ``log|det J_{f^-1}|`` at the point it is evaluated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "ActNorm2d",
    "CondAffineCoupling",
    "Conv2dActNorm",
    "Conv2dZeros",
    "FlowStep",
    "InvertibleConv1x1",
    "LatentFlow",
    "flow_nll",
    "gaussian_logp",
]


def _check_4d(x: Tensor, name: str, channels: int | None = None) -> None:
    """Raise a ValueError unless ``x`` is a 4-D ``(B, channels, H, W)`` tensor."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor, got {shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")


class ActNorm2d(nn.Module):
    """Per-channel affine normalisation ``y = (x + bias) * exp(logs)`` (Glow), with data-dependent init.

    Parameters ``bias`` and ``logs`` are ``(1, C, 1, 1)``. On the first call in *train* mode while ``inited`` is
    False, and only if ``bias`` is still all zero (official rule), it sets ``bias = -mean`` and
    ``logs = log(scale / (std + 1e-6))`` per channel over ``(B, H, W)`` of that input (in either direction, as
    the official code does). In eval mode it never initialises. ``inited`` is a plain attribute (not in the
    state dict); loading ``bias``/``logs`` through ``load_state_dict`` sets it to True, so loaded weights are
    never overwritten (the official code relies on the non-zero-bias check alone).

    ``forward(x, logdet, reverse)``: ``x (B, C, H, W)`` -> ``(y (B, C, H, W), logdet)`` with
    ``logdet += H * W * sum(logs)`` forward and ``-=`` in reverse; ``logdet`` stays None if given None.
    """

    def __init__(self, num_features: int, scale: float = 1.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale = float(scale)
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.inited = False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "bias" in state_dict and prefix + "logs" in state_dict:
            self.inited = True

    @torch.no_grad()
    def initialize_parameters(self, x: Tensor) -> None:
        """Glow data-dependent init from ``x (B, C, H, W)`` (train mode only; skipped if bias is non-zero)."""
        if not self.training:
            return
        if (self.bias != 0).any():
            self.inited = True
            return
        bias = -x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x + bias) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        self.bias.copy_(bias)
        self.logs.copy_(torch.log(self.scale / (torch.sqrt(var) + 1e-6)))
        self.inited = True

    def forward(self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor | None]:
        _check_4d(x, f"{type(self).__name__} input", self.num_features)
        if not self.inited:
            self.initialize_parameters(x)
        if not reverse:
            y = (x + self.bias) * torch.exp(self.logs)
        else:
            y = x * torch.exp(-self.logs) - self.bias
        if logdet is not None:
            dlogdet = self.logs.sum() * (x.shape[2] * x.shape[3])
            logdet = logdet - dlogdet if reverse else logdet + dlogdet
        return y, logdet


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution (Glow, no LU): ``y = W x`` per pixel, ``W`` of shape ``(C, C)``.

    ``W`` starts as a random orthogonal matrix (QR of a Gaussian). Forward adds ``H * W * log|det W|``
    (slogdet) to ``logdet``; reverse applies ``W^-1`` (inverted in float64, cast to the input dtype) and subtracts it.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        w_init = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))[0]
        self.weight = nn.Parameter(w_init.to(torch.get_default_dtype()))
        self.num_channels = num_channels

    def forward(self, x: Tensor, logdet: Tensor | None = None, reverse: bool = False) -> tuple[Tensor, Tensor | None]:
        _check_4d(x, f"{type(self).__name__} input", self.num_channels)
        c = self.num_channels
        dlogdet = torch.linalg.slogdet(self.weight)[1] * (x.shape[2] * x.shape[3])
        if not torch.isfinite(dlogdet):
            raise RuntimeError(f"InvertibleConv1x1: weight is singular or non-finite (log|det W| = {dlogdet.item()})")
        if not reverse:
            y = F.conv2d(x, self.weight.view(c, c, 1, 1))
            if logdet is not None:
                logdet = logdet + dlogdet
        else:
            w_inv = torch.inverse(self.weight.double()).to(x.dtype)
            y = F.conv2d(x, w_inv.view(c, c, 1, 1))
            if logdet is not None:
                logdet = logdet - dlogdet
        return y, logdet


class Conv2dActNorm(nn.Conv2d):
    """Official ``flow.Conv2d`` (``do_actnorm=True``): "same"-padded conv without bias, then ``ActNorm2d``.

    Keys: ``weight (out, in, k, k)`` and ``actnorm.{bias,logs}``. Weight init N(0, weight_std).
    ``(B, in, H, W) -> (B, out, H, W)``; the ActNorm log-determinant is discarded.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, weight_std: float = 0.05) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"Conv2dActNorm: kernel_size must be odd for 'same' padding, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        nn.init.normal_(self.weight, mean=0.0, std=weight_std)
        self.actnorm = ActNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.actnorm(super().forward(x))[0]


class Conv2dZeros(nn.Conv2d):
    """Official zero-initialised output conv: 3x3 "same" conv with bias, scaled by ``exp(logscale_factor * logs)``.

    Keys: ``weight (out, in, 3, 3)``, ``bias (out,)``, ``logs (out, 1, 1)``, all zero at init.
    ``(B, in, H, W) -> (B, out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, logscale_factor: float = 3.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True)
        self.logscale_factor = logscale_factor
        self.logs = nn.Parameter(torch.zeros(out_channels, 1, 1))
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * torch.exp(self.logs * self.logscale_factor)


def _coupling_subnet(in_channels: int, out_channels: int, hidden_channels: int) -> nn.Sequential:
    """Official coupling network ``F``: Conv3x3+ActNorm, ReLU, Conv1x1+ActNorm, ReLU, Conv2dZeros (keys 0, 2, 4)."""
    return nn.Sequential(
        Conv2dActNorm(in_channels, hidden_channels, kernel_size=3),
        nn.ReLU(inplace=False),
        Conv2dActNorm(hidden_channels, hidden_channels, kernel_size=1),
        nn.ReLU(inplace=False),
        Conv2dZeros(hidden_channels, out_channels),
    )


class CondAffineCoupling(nn.Module):
    """Official ``CondAffineSeparatedAndCond``: feature-conditional affine, then self-conditional affine coupling.

    With ``n = C // 2`` pass-through channels:
    - ``fFeatures: (B, cond, h, w) -> (B, 2C, h, w)``; ``fAffine: (B, n + cond, h, w) -> (B, 2(C - n), h, w)``.
    - "cross" split of a sub-net output ``h``: ``shift = h[:, 0::2]``, ``scale = sigmoid(h[:, 1::2] + 2) + eps``.
    - forward: ``z = (z + t_f) * s_f``; then ``z2 = (z2 + t_a) * s_a`` with ``(t_a, s_a)`` from ``cat(z[:, :n], cond)``;
      ``logdet += sum log s_f + sum log s_a``. Reverse undoes the self affine first, then the feature affine.
    """

    def __init__(self, in_channels: int = 3, cond_channels: int = 64, hidden_channels: int = 64, eps: float = 1e-4):
        super().__init__()
        if in_channels < 2:
            raise ValueError(f"CondAffineCoupling: in_channels must be >= 2, got {in_channels}")
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.affine_eps = eps
        self.channels_for_nn = in_channels // 2
        self.channels_for_co = in_channels - self.channels_for_nn
        self.fAffine = _coupling_subnet(self.channels_for_nn + cond_channels, 2 * self.channels_for_co, hidden_channels)
        self.fFeatures = _coupling_subnet(cond_channels, 2 * in_channels, hidden_channels)

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Cross split of ``h (B, 2k, h, w)`` -> ``(scale, shift)``, each ``(B, k, h, w)``."""
        shift, raw = h[:, 0::2], h[:, 1::2]
        return torch.sigmoid(raw + 2.0) + self.affine_eps, shift

    def forward(self, z: Tensor, cond: Tensor, logdet: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        """``z (B, C, h, w)``, ``cond (B, cond, h, w)``, ``logdet (B,)`` -> ``(z', logdet')``."""
        n = self.channels_for_nn
        scale_ft, shift_ft = self._scale_shift(self.fFeatures(cond))
        if not reverse:
            z = (z + shift_ft) * scale_ft
            logdet = logdet + torch.log(scale_ft).sum(dim=(1, 2, 3))
            z1, z2 = z[:, :n], z[:, n:]
            scale, shift = self._scale_shift(self.fAffine(torch.cat([z1, cond], dim=1)))
            z2 = (z2 + shift) * scale
            logdet = logdet + torch.log(scale).sum(dim=(1, 2, 3))
            return torch.cat([z1, z2], dim=1), logdet
        z1, z2 = z[:, :n], z[:, n:]
        scale, shift = self._scale_shift(self.fAffine(torch.cat([z1, cond], dim=1)))
        z2 = z2 / scale - shift
        logdet = logdet - torch.log(scale).sum(dim=(1, 2, 3))
        z = torch.cat([z1, z2], dim=1)
        z = z / scale_ft - shift_ft
        logdet = logdet - torch.log(scale_ft).sum(dim=(1, 2, 3))
        return z, logdet


class FlowStep(nn.Module):
    """One official ``FlowStep``: ActNorm2d -> InvertibleConv1x1 [-> CondAffineCoupling] (reverse: opposite order).

    ``coupling=False`` gives the "noCoupling" step (no ``affine`` attribute).
    ``z (B, C, h, w)``, ``cond (B, cond, h, w)``, ``logdet (B,)`` -> ``(z', logdet')``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        cond_channels: int = 64,
        hidden_channels: int = 64,
        coupling: bool = True,
        actnorm_scale: float = 1.0,
        affine_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.actnorm = ActNorm2d(in_channels, actnorm_scale)
        self.invconv = InvertibleConv1x1(in_channels)
        if coupling:
            self.affine = CondAffineCoupling(in_channels, cond_channels, hidden_channels, affine_eps)

    @property
    def has_coupling(self) -> bool:
        return hasattr(self, "affine")

    def forward(self, z: Tensor, cond: Tensor, logdet: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
        if not reverse:
            z, logdet = self.actnorm(z, logdet)
            z, logdet = self.invconv(z, logdet)
            if self.has_coupling:
                z, logdet = self.affine(z, cond, logdet)
            return z, logdet
        if self.has_coupling:
            z, logdet = self.affine(z, cond, logdet, reverse=True)
        z, logdet = self.invconv(z, logdet, reverse=True)
        z, logdet = self.actnorm(z, logdet, reverse=True)
        return z, logdet


class LatentFlow(nn.Module):
    """GLARE's I-LNF (official ``FlowUpsamplerNet`` with no squeeze and no split): ``L * (n_extra_steps + K)`` steps.

    Per level: ``n_extra_steps`` "noCoupling" steps, then ``K`` full steps, all on ``in_channels`` at the same
    ``h x w``, all conditioned on the same ``cond``. Official (L=2, K=12, extra=2): layers 0-1 and 14-15 are
    noCoupling, 2-13 and 16-27 full. Attribute names match the official module, so the ``flowUpsamplerNet.*``
    sub-dict of an official checkpoint loads with ``strict=True``.

    ``f`` (``f.0.{weight,bias}``, a 3x3 conv ``unused_f_in -> unused_f_out``) is **never called**: the official
    network builds it (320 -> 384 from ``stackRRDB.blocks``) and saves it in ``net_G.pth``, so it is kept only so
    that the official checkpoint loads with ``strict=True``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        cond_channels: int = 64,
        hidden_channels: int = 64,
        L: int = 2,
        K: int = 12,
        n_extra_steps: int = 2,
        unused_f_in: int = 320,
        unused_f_out: int = 384,
        actnorm_scale: float = 1.0,
        affine_eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.layers = nn.ModuleList()
        for _ in range(L):
            for k in range(n_extra_steps + K):
                coupling = k >= n_extra_steps
                step = FlowStep(in_channels, cond_channels, hidden_channels, coupling, actnorm_scale, affine_eps)
                self.layers.append(step)
        self.f = nn.Sequential(nn.Conv2d(unused_f_in, unused_f_out, 3, padding=1))  # unused; strict=True loading only
        self.f.requires_grad_(False)  # never called: not trainable

    @property
    def layer_kinds(self) -> list[str]:
        """Official step type per layer: ``'noCoupling'`` or ``'CondAffineSeparatedAndCond'``."""
        return ["CondAffineSeparatedAndCond" if s.has_coupling else "noCoupling" for s in self.layers]

    def _check_inputs(self, z: Tensor, cond: Tensor, logdet: Tensor | None) -> Tensor:
        _check_4d(z, "LatentFlow: z", self.in_channels)
        _check_4d(cond, "LatentFlow: cond", self.cond_channels)
        if cond.shape[0] != z.shape[0] or cond.shape[2:] != z.shape[2:]:
            raise ValueError(
                f"LatentFlow: cond batch/spatial size {tuple(cond.shape)} does not match z {tuple(z.shape)} "
                "(need the same B, h, w)"
            )
        if logdet is None:
            return z.new_zeros(z.shape[0])
        if not isinstance(logdet, Tensor) or logdet.shape != (z.shape[0],):
            shape = tuple(logdet.shape) if isinstance(logdet, Tensor) else type(logdet).__name__
            raise ValueError(f"LatentFlow: logdet must be a ({z.shape[0]},) tensor or None, got {shape}")
        return logdet

    def forward(
        self,
        z: Tensor,
        cond: Tensor,
        logdet: Tensor | None = None,
        reverse: bool = False,
        return_steps: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """Run the flow: forward ``z_NL -> z`` or reverse ``z -> z_NL`` (layers in opposite order).

        ``z (B, C, h, w)``, ``cond (B, cond_channels, h, w)``, ``logdet (B,)`` or None (zeros).
        Returns ``(out (B, C, h, w), logdet (B,))``, plus with ``return_steps`` the list of ``(z_i, logdet_i)``
        after each step in application order (reverse entry ``i`` undoes layer ``len(layers) - 1 - i``).
        """
        logdet = self._check_inputs(z, cond, logdet)
        steps: list[tuple[Tensor, Tensor]] = []
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            z, logdet = layer(z, cond, logdet, reverse=reverse)
            if return_steps:
                steps.append((z, logdet))
        if return_steps:
            return z, logdet, steps
        return z, logdet


def gaussian_logp(z: Tensor, mu: Tensor) -> Tensor:
    """Unit-variance Gaussian log-density ``sum_{c,h,w} -0.5 * ((z - mu)^2 + log 2pi)``: ``(B, C, h, w) -> (B,)``."""
    if z.shape != mu.shape:
        raise ValueError(f"gaussian_logp: z {tuple(z.shape)} and mu {tuple(mu.shape)} must have the same shape")
    return (-0.5 * ((z - mu) ** 2 + LOG_2PI)).flatten(1).sum(dim=1)


def flow_nll(z: Tensor, logdet: Tensor, mu: Tensor) -> Tensor:
    """Official Stage-II NLL in bits per latent *pixel*: ``-(logp + logdet) / (ln2 * h * w)`` (not ``C*h*w``).

    ``z, mu (B, C, h, w)``, ``logdet (B,)`` -> ``(B,)``.
    """
    _check_4d(z, "flow_nll: z")
    return -(gaussian_logp(z, mu) + logdet) / (math.log(2.0) * z.shape[2] * z.shape[3])
