"""Stage I of GLARE: the normal-light VQGAN (encoder ``E_NL``, quantiser ``Q``, decoder ``D_NL``).

Attribute names equal the official ``VQModel`` (``encoder``, ``decoder``, ``quantize``, ``quant_conv``,
``post_quant_conv``), so the official ``vqgan.pkl`` loads with ``strict=True`` once the two documented unused
prefixes are dropped (see :data:`VQGAN_UNUSED_PREFIXES` and :func:`glare_nat_models.checkpoint.load_official`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.blocks import TINY_SIZE, Decoder, Encoder, VQGANSize
from glare_nat_arch.quantize import VectorQuantizer

__all__ = ["GLAREVQGAN", "VQGAN_UNUSED_PREFIXES"]

#: Keys of the official ``vqgan.pkl`` that no GLARE forward path uses: ``conv_semantic.*`` (a 3->256 1x1 conv of
#: an inactive semantic loss) and ``vgg_feat_extractor.*`` (the VGG19 that feeds it). They are dropped on load.
VQGAN_UNUSED_PREFIXES = ("conv_semantic.", "vgg_feat_extractor.")


@ARCH_REGISTRY.register()
class GLAREVQGAN(nn.Module):
    """GLARE's VQGAN (f = 2**(len(ch_mult)-1), official: f=4, K=8192, d=3).

    Args (official defaults): ``in_channels``/``out_ch`` image channels; ``ch``, ``ch_mult``, ``num_res_blocks``,
    ``attn_resolutions``, ``resolution``, ``z_channels``, ``dropout``: the fields of
    :class:`~glare_nat_arch.blocks.VQGANSize` (flat option keys, as BasicSR archs take them);
    ``n_embed`` codes of dimension ``embed_dim``; ``beta`` commitment weight.

    Shapes for an image (B, 3, H, W): latent / quant (B, embed_dim, H/f, W/f), indices (B, H/f, W/f).
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {**TINY_SIZE, "n_embed": 16}

    def __init__(
        self,
        in_channels: int = 3,
        out_ch: int = 3,
        embed_dim: int = 3,
        n_embed: int = 8192,
        beta: float = 0.25,
        **size: Any,
    ):
        super().__init__()
        size = VQGANSize.from_options(type(self).__name__, **size)
        self.downscale = size.downscale
        self.encoder = Encoder(size, in_channels=in_channels)
        self.decoder = Decoder(size, out_ch=out_ch)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta)
        self.quant_conv = nn.Conv2d(size.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, size.z_channels, 1)

    def encode(self, x: Tensor) -> Tensor:
        """Pre-quantisation latent ``quant_conv(encoder(x))``: (B, 3, H, W) -> (B, embed_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def quantize_latent(self, latent: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(quant (B, d, h, w), emb_loss (), indices (B, h, w))`` of a latent."""
        return self.quantize(latent)

    def decode_quant(self, quant: Tensor, return_rgb: bool = True) -> tuple[Tensor | None, list[Tensor]]:
        """Decode already-quantised codes (B, d, h, w): ``(rgb (B, 3, H, W) or None, [n1, n0])`` (no quantisation
        here)."""
        return self.decoder(self.post_quant_conv(quant), return_rgb=return_rgb)

    def decode_indices(self, indices: Tensor, return_rgb: bool = True) -> tuple[Tensor | None, list[Tensor]]:
        """Decode code indices (B, h, w): ``(rgb or None, [n1, n0])``."""
        return self.decode_quant(self.quantize.lookup(indices), return_rgb=return_rgb)

    def decode(self, latent: Tensor, return_rgb: bool = True) -> tuple[Tensor | None, Tensor, list[Tensor]]:
        """Official ``VQModel.decode``: quantise ``latent`` then decode. Returns ``(rgb or None, emb_loss, [n1, n0])``.

        n1 is (B, ch*ch_mult[1], H/2, W/2) and n0 is (B, ch*ch_mult[0], H, W) for the official three levels.
        """
        quant, emb_loss, _ = self.quantize(latent)
        rgb, feats = self.decode_quant(quant, return_rgb=return_rgb)
        return rgb, emb_loss, feats

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-I reconstruction: ``(rec (B, 3, H, W), emb_loss (), indices (B, h, w))``."""
        quant, emb_loss, indices = self.quantize(self.encode(x))
        rec, _ = self.decode_quant(quant)
        return rec, emb_loss, indices

    def get_last_layer(self) -> Tensor:
        """Weight of the decoder's RGB head (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight
