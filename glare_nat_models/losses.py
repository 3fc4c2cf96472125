"""Training losses, registered in BasicSR's ``LOSS_REGISTRY`` (project-unique names).

* :class:`MSSSIMLoss`: ``1 - MS-SSIM`` exactly as GLARE's bundled ``pytorch_msssim`` (Stage III, weight 0.2).
* :class:`VGG16PerceptualLoss`: GLARE's VGG16 relu1_2/relu2_2/relu3_3 MSE loss (Stage III, weight 0.01).
* :class:`LPIPSLoss`: AlexNet LPIPS as a loss (Stage I).
* :class:`HingeGANLoss` and :func:`adaptive_gan_weight`: taming-transformers' hinge GAN (Stage I).

All image losses take ``pred`` and ``target`` as (N,3,H,W) RGB tensors in [0, 1] and return a scalar tensor
already multiplied by ``loss_weight``. Feature networks are loaded from local files only
(:mod:`glare_nat_models.pretrained`), frozen and kept in eval mode.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from basicsr.utils import get_root_logger
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from glare_nat_models.pretrained import (
    ALEXNET_FILE,
    VGG16_FILE,
    build_lpips,
    build_vgg16_features,
    resolve_weights,
)

__all__ = [
    "MSSSIM_WEIGHTS",
    "MSSSIM_MIN_SIZE",
    "ms_ssim",
    "MSSSIMLoss",
    "VGG16PerceptualLoss",
    "LPIPSLoss",
    "HingeGANLoss",
    "adaptive_gan_weight",
]

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MSSSIM_MIN_SIZE = 2 ** (len(MSSSIM_WEIGHTS) - 1)  # 16: four 2x2 poolings must leave >= 1 pixel


def _check_pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"{name}: expected pred and target of equal shape (N, C, H, W); got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}."
        )


def _gaussian_1d(size: int, like: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """(size,) normalised Gaussian centred at index ``size // 2`` (as the official code, also for even sizes,
    where it is therefore off-centre). The official 2-D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(like)


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, window_size: int, data_range: float) -> tuple[torch.Tensor, ...]:
    """Batch-global mean SSIM and contrast-structure term of one scale, 'valid' Gaussian filtering.

    The window shrinks to ``min(window_size, H, W)`` on small images (official behaviour). The 2-D Gaussian is
    applied separably (rows, then columns), to all five moment images in one grouped conv. Returns two scalars.
    """
    c, h, w = x.shape[1:]
    k = min(window_size, h, w)
    g = _gaussian_1d(k, x)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5C, H, W)
    stack = F.conv2d(stack, g.view(1, 1, 1, k).expand(5 * c, 1, 1, k).contiguous(), groups=5 * c)
    mu1, mu2, e11, e22, e12 = F.conv2d(
        stack, g.view(1, 1, k, 1).expand(5 * c, 1, k, 1).contiguous(), groups=5 * c
    ).chunk(5, 1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu1_mu2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    v1, v2 = 2.0 * sigma12 + c2, sigma1_sq + sigma2_sq + c2
    cs = torch.mean(v1 / v2)
    ssim = torch.mean((2 * mu1_mu2 + c1) * v1 / ((mu1_sq + mu2_sq + c1) * v2))
    return ssim, cs


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    official_bug: bool = True,
    window_size: int = 11,
) -> torch.Tensor:
    """Normalised MS-SSIM of GLARE's bundled ``pytorch_msssim.msssim(..., normalize=True)``.

    Five scales with weights ``MSSSIM_WEIGHTS``; at each, batch-global mean SSIM ``s_i`` and contrast-structure
    ``cs_i`` from an ``window_size`` Gaussian (sigma 1.5, 'valid'; the window shrinks to ``min(11, H_i, W_i)``
    on small scales); 2x2 average pooling between scales. Values are normalised as ``(v + 1) / 2`` (the package's
    ``normalize``, keeps the fractional powers real). Combination:

    * ``official_bug=True``: ``prod_{i<4} (cs_i^w_i * s_4^w_4)``, the package's formula (``s_4`` enters with
      exponent ``4 w_4``), used by GLARE's Stage-III training;
    * ``official_bug=False``: the correct ``prod_{i<4} cs_i^w_i * s_4^w_4``.

    Args:
        pred, target: (N,C,H,W) with ``H, W >= MSSSIM_MIN_SIZE`` (16). The full 11x11 window is used at every
            scale only for ``H, W >= 176``; GLARE trains on 256 crops. The official code infers ``data_range``
            from ``pred`` (1 for data in [0,1]); here it is explicit.

    Returns:
        scalar tensor in [0, 1] (1 for identical inputs). Half-precision inputs are computed in float32, and
        autocast is disabled inside (the official loss also runs in float32).
    """
    _check_pair(pred, target, "MS-SSIM")
    if min(pred.shape[-2:]) < MSSSIM_MIN_SIZE:
        raise ValueError(
            f"MS-SSIM: images must be at least {MSSSIM_MIN_SIZE}x{MSSSIM_MIN_SIZE} "
            f"({len(MSSSIM_WEIGHTS)} scales, 2x2 pooling between them); got {tuple(pred.shape[-2:])}."
        )
    if pred.dtype in (torch.float16, torch.bfloat16):  # E[x^2] - mu^2 cancels badly in half precision
        pred, target = pred.float(), target.float()
    weights = torch.tensor(MSSSIM_WEIGHTS, dtype=pred.dtype, device=pred.device)
    ssims, css = [], []
    with torch.autocast(device_type=pred.device.type, enabled=False):  # also full precision under AMP
        for level in range(len(MSSSIM_WEIGHTS)):
            if level:
                pred, target = F.avg_pool2d(pred, 2), F.avg_pool2d(target, 2)
            s, cs = _ssim_and_cs(pred, target.to(pred.dtype), window_size, data_range)
            ssims.append(s)
            css.append(cs)
    pow_cs = ((torch.stack(css) + 1) / 2) ** weights
    pow_ssim = ((torch.stack(ssims) + 1) / 2) ** weights
    if official_bug:
        return torch.prod(pow_cs[:-1] * pow_ssim[-1])
    return torch.prod(pow_cs[:-1]) * pow_ssim[-1]


@LOSS_REGISTRY.register()
class MSSSIMLoss(nn.Module):
    """``loss_weight * (1 - ms_ssim(pred, target))``; see :func:`ms_ssim` (GLARE: weight 0.2, official_bug true).

    Args:
        loss_weight: multiplier. official_bug: reproduce the package's level combination (default True).
        data_range: value range of the inputs (1.0 for [0,1] images).
    Input (N,C,H,W) with H, W >= 16; output a scalar.
    """

    def __init__(self, loss_weight: float = 1.0, official_bug: bool = True, data_range: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.official_bug = official_bug
        self.data_range = data_range

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.loss_weight * (1 - ms_ssim(pred, target, self.data_range, self.official_bug))


class _FrozenFeatureLoss(nn.Module):
    """Base for losses holding a frozen feature network in ``self.net``: it stays in eval mode."""

    net: nn.Module

    def train(self, mode: bool = True) -> _FrozenFeatureLoss:
        super().train(mode)
        self.net.eval()
        return self


@LOSS_REGISTRY.register()
class VGG16PerceptualLoss(_FrozenFeatureLoss):
    """GLARE's perceptual loss: mean over relu1_2, relu2_2, relu3_3 of ``MSE(vgg(pred), vgg(target))``.

    torchvision VGG16 ``features[:16]`` with **no ImageNet normalisation** of the [0,1] inputs (as official).

    Args:
        loss_weight: multiplier (GLARE Stage III: 0.01).
        weights_path: local torchvision ``vgg16-397923af.pth``; ``None`` -> env ``GLARE_NAT_VGG16`` -> torchvision
            cache; ``'random'`` for tests/demos only (warns). Missing file -> FileNotFoundError naming it.
    Input (N,3,H,W) RGB; output a scalar. The target's features are computed without gradient.
    """

    LAYERS = (3, 8, 15)  # relu1_2, relu2_2, relu3_3 in torchvision's vgg16().features

    def __init__(self, loss_weight: float = 0.01, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        path = resolve_weights(weights_path, "GLARE_NAT_VGG16", VGG16_FILE, "VGG16 perceptual loss")
        self.net = build_vgg16_features(path)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """relu1_2 (N,64,H,W), relu2_2 (N,128,H/2,W/2), relu3_3 (N,256,H/4,W/4)."""
        feats = []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.LAYERS:
                feats.append(x)
        return feats

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_pair(pred, target, "VGG16PerceptualLoss")
        with torch.no_grad():
            target_feats = self.features(target)
        losses = [F.mse_loss(p, t) for p, t in zip(self.features(pred), target_feats)]
        return self.loss_weight * sum(losses) / len(losses)


@LOSS_REGISTRY.register()
class LPIPSLoss(_FrozenFeatureLoss):
    """LPIPS v0.1 as a loss: ``loss_weight * mean_n LPIPS(pred_n, target_n)``.

    Args:
        loss_weight: multiplier.
        net: ``'vgg'`` (taming's VQGAN recipe), ``'alex'``, or ``'auto'``: VGG16 when its local weights are found,
            else AlexNet (the choice is logged).
        alexnet_weights: local torchvision ``alexnet-owt-7be5be79.pth``; ``None`` -> env ``GLARE_NAT_ALEXNET`` ->
            torchvision cache; ``'random'`` for tests/demos only (warns). Built by the same helper as the metric.
        vgg16_weights: local torchvision ``vgg16-397923af.pth``; ``None`` -> env ``GLARE_NAT_VGG16`` -> torchvision
            cache (the file the Stage-III perceptual loss uses).
    Input (N,3,H,W) RGB in [0,1] (mapped to [-1,1] internally); output a scalar. Nothing is downloaded.
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        net: str = "auto",
        alexnet_weights: str | os.PathLike | None = None,
        vgg16_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if net not in ("auto", "vgg", "alex"):
            raise ValueError(f"LPIPSLoss: net is {net!r}; expected 'auto', 'vgg' or 'alex'")
        self.loss_weight = loss_weight
        trunk, path = net, None
        if net in ("auto", "vgg"):
            try:
                path = resolve_weights(vgg16_weights, "GLARE_NAT_VGG16", VGG16_FILE, "LPIPS (VGG16)")
                trunk = "vgg"
            except FileNotFoundError:
                if net == "vgg":
                    raise
                trunk = "alex"
        if trunk == "alex":
            path = resolve_weights(alexnet_weights, "GLARE_NAT_ALEXNET", ALEXNET_FILE, "LPIPS (AlexNet)")
        if net == "auto":
            get_root_logger().info(f"LPIPSLoss: {'VGG16' if trunk == 'vgg' else 'AlexNet'} trunk ({path or 'random'})")
        self.trunk = trunk
        self.net = build_lpips(trunk, path)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        _check_pair(pred, target, "LPIPSLoss")
        return self.loss_weight * self.net(pred * 2 - 1, target * 2 - 1).mean()


@LOSS_REGISTRY.register()
class HingeGANLoss(nn.Module):
    """taming-transformers' hinge GAN loss, in BasicSR's ``GANLoss`` calling convention.

    taming: ``d_loss = 0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))``, ``g_loss = -mean(D(fake))``.
    BasicSR's ``GANLoss('hinge')`` has the same generator loss but no 0.5 on the discriminator terms, so it
    trains D with twice taming's gradient. Here each discriminator call returns **half** its hinge term, so the
    usual two calls (real, then fake) sum to taming's ``d_loss``; :meth:`discriminator_loss` does both.

    Args:
        loss_weight: applies to the generator loss only (as in BasicSR).
    Input: discriminator logits of any shape, e.g. (N,1,h,w) patches; output a scalar.
    """

    def __init__(self, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = loss_weight

    def forward(self, logits: torch.Tensor, target_is_real: bool, is_disc: bool = False) -> torch.Tensor:
        if is_disc:
            sign = -1.0 if target_is_real else 1.0
            return 0.5 * F.relu(1.0 + sign * logits).mean()
        return -self.loss_weight * logits.mean()

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """taming's ``hinge_d_loss(logits_real, logits_fake)``."""
        return self(logits_real, True, is_disc=True) + self(logits_fake, False, is_disc=True)


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """taming's ``calculate_adaptive_weight``: ``clamp(||d nll/dW|| / (||d g/dW|| + 1e-4), 0, max_weight)``.

    ``W = last_layer`` is the generator's last weight (e.g. the decoder's ``conv_out.weight``). Both graphs are
    retained; the result is a detached scalar (multiply by the configured discriminator weight yourself).
    """
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()
