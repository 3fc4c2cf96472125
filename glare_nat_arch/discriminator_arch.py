"""PatchGAN discriminator for Stage-I (VQGAN) training: taming-transformers' ``NLayerDiscriminator``."""

from __future__ import annotations

from typing import Any, ClassVar

from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

__all__ = ["PatchGANDiscriminator"]


@ARCH_REGISTRY.register()
class PatchGANDiscriminator(nn.Module):
    """pix2pix / taming PatchGAN with BatchNorm (taming's ``NLayerDiscriminator``, ActNorm variant omitted).

    Layers (k4 = 4x4 conv, padding 1; LReLU = LeakyReLU(0.2)), ``m_i = min(2^i, 8)``:

    * k4 stride 2 ``input_nc -> ndf`` (with bias), LReLU;
    * for ``i = 1 .. n_layers-1``: k4 stride 2 ``ndf m_{i-1} -> ndf m_i`` (no bias), BatchNorm, LReLU;
    * k4 stride 1 ``ndf m_{n-1} -> ndf m_n`` (no bias), BatchNorm, LReLU;
    * k4 stride 1 ``-> 1`` (with bias): one real/fake logit per patch.

    Shapes (defaults ``n_layers=3``): (N, input_nc, H, W) -> (N, 1, H/8 - 2, W/8 - 2) for H, W divisible by 8,
    e.g. 256x256 -> 30x30 (70x70 receptive field). Init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02),
    bias 0. Parameter names (``main.<i>.*``) equal taming's, so taming discriminator checkpoints load 1:1.
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {"ndf": 8, "n_layers": 2}

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchGANDiscriminator: n_layers must be >= 1, got {n_layers}.")
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        """(N, input_nc, H, W) -> patch logits (N, 1, h, w)."""
        return self.main(x)
