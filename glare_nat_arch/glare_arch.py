"""GLARE Stage II (conditional encoder + invertible latent flow) and Stage III (+ AFT decoder) networks.

Attribute names equal the official ones so the official weights load 1:1 with ``strict=True``:
``RRDB`` (conditional encoder ``E_c``: ``RRDB.encoder.*``, ``RRDB.cond_conv.0.*``, ``RRDB.color_conv.*``),
``flowUpsamplerNet`` (:class:`~glare_nat_arch.flow.LatentFlow`) and, for Stage III, ``deformable_decoder``
(:class:`~glare_nat_arch.aft.MultiScaleDecoder`). The frozen VQGAN is *not* a submodule: it is passed to
:meth:`GLARENet.forward`, as in the official code where it is a separate network (``net_hq``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.aft import MultiScaleDecoder
from glare_nat_arch.blocks import OFFICIAL_SIZE, TINY_SIZE, Encoder, VQGANSize
from glare_nat_arch.flow import LatentFlow, flow_nll, gaussian_logp
from glare_nat_arch.vqgan_arch import GLAREVQGAN

__all__ = ["log_transform", "ConditionEncoder", "GLAREFlowNet", "GLARENet"]


def log_transform(x: Tensor) -> Tensor:
    """Official low-light preprocessing ``log(clamp(x + 1e-3, min=1e-3))`` for x in [0, 1] (range about [-6.9, 0])."""
    return torch.log(torch.clamp(x + 1e-3, min=1e-3))


class ConditionEncoder(nn.Module):
    """``E_c`` (official ``ConEncoder1``): a VQGAN-encoder copy plus two heads on its bottleneck ``e``.

    Args: ``size`` (:class:`~glare_nat_arch.blocks.VQGANSize`), ``in_channels``, ``cond_channels``.
    ``encoder``: :class:`~glare_nat_arch.blocks.Encoder`; ``cond_conv``: Sequential(Conv3x3 z->cond_channels,
    Sigmoid); ``color_conv``: Conv3x3 z->z. Input: the *log-transformed* low-light image (B, 3, H, W).
    Output dict: ``bottleneck`` e (B, z, h, w), ``cond`` (B, cond_channels, h, w), ``color_map`` (prior mean mu,
    B, z, h, w) and ``skips`` ``[s0 (B, ch*ch_mult[0], H, W), s1 (B, ch*ch_mult[1], H/2, W/2)]``.
    """

    def __init__(self, size: VQGANSize = OFFICIAL_SIZE, in_channels: int = 3, cond_channels: int = 64):
        super().__init__()
        self.encoder = Encoder(size, in_channels=in_channels)
        z_channels = size.z_channels
        self.color_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.cond_conv = nn.Sequential(nn.Conv2d(z_channels, cond_channels, 3, 1, 1), nn.Sigmoid())

    def forward(self, x_log: Tensor) -> dict[str, Tensor | list[Tensor]]:
        e, skips = self.encoder(x_log, return_skips=True)
        return {"bottleneck": e, "cond": self.cond_conv(e), "color_map": self.color_conv(e), "skips": skips}


@ARCH_REGISTRY.register()
class GLAREFlowNet(nn.Module):
    """GLARE Stage II: conditional encoder ``RRDB`` and latent flow ``flowUpsamplerNet`` (official ``LLFlowVQGAN2``).

    Args (official defaults): ``in_channels``; encoder ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
    ``resolution``, ``z_channels``, ``dropout`` (flat option keys of :class:`~glare_nat_arch.blocks.VQGANSize`, as
    the VQGAN encoder; kept as :attr:`size`); ``cond_channels`` width of the flow
    condition; flow ``flow_hidden_channels``, ``flow_L``, ``flow_K``, ``flow_n_extra_steps`` and the shape of the
    unused official conv ``flow_unused_f_in -> flow_unused_f_out``.

    Inputs: ``lq`` low-light images in [0, 1], (B, 3, H, W) with H, W multiples of ``downscale`` (4 officially).
    Latents are (B, z_channels, H/4, W/4).
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {
        **TINY_SIZE,
        "cond_channels": 8,
        "flow_hidden_channels": 8,
        "flow_L": 1,
        "flow_K": 2,
        "flow_n_extra_steps": 1,
        "flow_unused_f_in": 4,
        "flow_unused_f_out": 4,
    }

    def __init__(
        self,
        in_channels: int = 3,
        cond_channels: int = 64,
        flow_hidden_channels: int = 64,
        flow_L: int = 2,  # noqa: N803 (official name)
        flow_K: int = 12,  # noqa: N803
        flow_n_extra_steps: int = 2,
        flow_unused_f_in: int = 320,
        flow_unused_f_out: int = 384,
        **size: Any,
    ):
        super().__init__()
        #: the VQGAN size of ``E_c`` (and of ``D_MF`` in Stage III), built once from the flat option keys
        self.size = VQGANSize.from_options(type(self).__name__, **size)
        self.downscale = self.size.downscale
        self.RRDB = ConditionEncoder(self.size, in_channels=in_channels, cond_channels=cond_channels)
        self.flowUpsamplerNet = LatentFlow(
            in_channels=self.size.z_channels,
            cond_channels=cond_channels,
            hidden_channels=flow_hidden_channels,
            L=flow_L,
            K=flow_K,
            n_extra_steps=flow_n_extra_steps,
            unused_f_in=flow_unused_f_in,
            unused_f_out=flow_unused_f_out,
        )

    def _check_lq(self, lq: Tensor) -> None:
        if lq.dim() != 4:
            raise ValueError(f"{type(self).__name__}: lq must be (B, C, H, W), got {tuple(lq.shape)}")
        h, w = lq.shape[-2:]
        if h % self.downscale or w % self.downscale:
            raise ValueError(
                f"{type(self).__name__}: H, W = {h}, {w} must be multiples of {self.downscale} "
                "(pad first with glare_nat_arch.padding.pad_to_multiple; the models' test() does)"
            )

    def condition(self, lq: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """``E_c(log_transform(lq))`` for lq (B, 3, H, W) in [0, 1]; see :class:`ConditionEncoder` for the dict."""
        self._check_lq(lq)
        return self.RRDB(log_transform(lq))

    def forward(
        self, gt_latent: Tensor, lq: Tensor, mu_from_gt: bool | Tensor = False
    ) -> dict[str, Tensor | list[Tensor]]:
        """Stage-II NLL pass: ``z = f(gt_latent; cond)`` and the unit-Gaussian NLL around ``mu``.

        ``gt_latent``: the frozen VQGAN's pre-quantisation latent of the normal-light image (B, z, h, w).
        ``mu_from_gt``: False uses ``mu = color_map`` (official branch with probability 0.8), True uses
        ``mu = gt_latent`` (probability ``train_gt_ratio`` = 0.2); a (B,) bool tensor picks per sample.
        Returns ``z``, ``logdet`` (B,), ``mu``, ``logp`` (B,), ``nll`` (B,, bits per latent pixel) plus the
        condition dict entries (``cond``, ``color_map``, ``bottleneck``, ``skips``).
        """
        c = self.condition(lq)
        if gt_latent.shape != c["color_map"].shape:
            raise ValueError(f"gt_latent {tuple(gt_latent.shape)} must match the latent {tuple(c['color_map'].shape)}")
        z, logdet = self.flowUpsamplerNet(gt_latent, c["cond"])
        if isinstance(mu_from_gt, Tensor):
            mu = torch.where(mu_from_gt.view(-1, 1, 1, 1).to(torch.bool), gt_latent, c["color_map"])
        else:
            mu = gt_latent if mu_from_gt else c["color_map"]
        return {**c, "z": z, "logdet": logdet, "mu": mu, "logp": gaussian_logp(z, mu), "nll": flow_nll(z, logdet, mu)}

    def reverse(self, lq: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """Inference direction: ``z_hat = f^-1(color_map; cond)`` with z = mu exactly (no noise, as official).

        Returns ``z_hat`` (B, z, h, w), ``logdet`` (B,, reverse log-determinant from 0) and the condition dict.
        """
        c = self.condition(lq)
        z_hat, logdet = self.flowUpsamplerNet(c["color_map"], c["cond"], reverse=True)
        return {**c, "z_hat": z_hat, "logdet": logdet}

    # ------------------------------------------------------------------------------------ the image path
    def refine_latent(self, rev: Mapping[str, Any], codebook: Tensor) -> dict[str, Any]:
        """Latent hook: the decoder inputs from a reverse-flow result ``rev`` (:meth:`reverse`) and the VQGAN
        ``codebook`` (K, d). Returns ``z_nl`` (NL-decoder input, B x d x h x w), ``quant_nl`` (its quantisation, or
        None: then the VQGAN quantises ``z_nl``) and ``z_mf`` (the ``D_MF`` input; Stage III only).

        Here the official path: ``z_hat`` for both decoders. The NAT networks override it
        (:meth:`~glare_nat_arch.glare_nat_arch.GLARENATNet.refine_latent`) and may add entries.
        """
        z_hat = rev["z_hat"]
        return {"z_nl": z_hat, "quant_nl": None, "z_mf": z_hat}

    @staticmethod
    def decode_nl(
        vqgan: GLAREVQGAN, lat: Mapping[str, Any], return_rgb: bool
    ) -> tuple[Tensor | None, list[Tensor], Tensor, Tensor | None]:
        """The frozen normal-light decoder on :meth:`refine_latent`'s output.

        Returns ``(rgb (B, 3, H, W) or None, [n1, n0], quant (B, d, h, w), indices (B, h, w) or None)``; ``indices``
        is None when ``lat`` brings its own quantisation ``quant_nl``.
        """
        quant, indices = lat.get("quant_nl"), None
        if quant is None:
            quant, _, indices = vqgan.quantize_latent(lat["z_nl"])
        rgb, feats = vqgan.decode_quant(quant, return_rgb=return_rgb)
        return rgb, feats, quant, indices

    def enhance(self, lq: Tensor, vqgan: GLAREVQGAN, return_intermediates: bool = False) -> Tensor | dict[str, Any]:
        """Stage-II enhancement: ``lq`` (B, 3, H, W) in [0, 1], H and W multiples of :attr:`downscale` (pad first:
        :func:`~glare_nat_arch.padding.pad_to_multiple`) -> raw RGB (B, 3, H, W) of the frozen VQGAN decoder.

        Path: log -> ``E_c`` -> reverse flow -> :meth:`refine_latent` -> quantise -> ``D_NL``. With
        ``return_intermediates`` a dict: ``output``, ``z_hat``, ``cond``, ``color_map`` and the
        :meth:`refine_latent` entries.
        """
        rev = {k: v for k, v in self.reverse(lq).items() if k in ("z_hat", "cond", "color_map")}  # skips freed
        lat = self.refine_latent(rev, vqgan.quantize.embedding.weight)
        out, _, _, _ = self.decode_nl(vqgan, lat, return_rgb=True)
        if not return_intermediates:
            return out
        return {"output": out, **rev, **lat}


@ARCH_REGISTRY.register()
class GLARENet(GLAREFlowNet):
    """GLARE Stage III (official ``VQLLFLOWDeformable``): Stage II plus the AFT decoder ``deformable_decoder``.

    Extra args: ``mix_init`` (official (-1.0, -0.6)), ``per_sample_rescale`` (True: each sample's own mean ratio,
    as the official training computed it with one sample per GPU, and as its inference does for one image; False:
    one batch-global ratio, the official code on a single replica; :class:`~glare_nat_arch.aft.MultiScaleDecoder`),
    ``out_ch``, ``dcn_impl`` / ``dcn_im2col_budget_mb`` (deformable-conv kernel, :mod:`glare_nat_arch.deform`; the
    default ``auto`` changes memory, not results). ``D_MF`` uses the encoder's ``ch`` / ``ch_mult`` /
    ``num_res_blocks`` / ``attn_resolutions`` (as the official code).

    ``glare_nat_models.checkpoint.load_official`` accepts a full ``net_G.pth`` (824 tensors; its unused
    ``flowUpsamplerNet.f.0.*`` and ``deformable_decoder.{conv_out,scale,bias,enc}.*`` exist here as never-used
    parameters so that loading is strict) or, with ``stage2_only=True``, a Stage-II checkpoint (``RRDB.*`` and
    ``flowUpsamplerNet.*`` only).
    """

    def __init__(
        self,
        *args,
        out_ch: int = 3,
        mix_init: Sequence[float] = (-1.0, -0.6),
        per_sample_rescale: bool = True,
        dcn_impl: str = "auto",
        dcn_im2col_budget_mb: float = 256.0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.deformable_decoder = MultiScaleDecoder(
            self.size,
            out_ch=out_ch,
            mix_init=mix_init,
            per_sample_rescale=per_sample_rescale,
            dcn_impl=dcn_impl,
            dcn_im2col_budget_mb=dcn_im2col_budget_mb,
        )

    def decoder_mid_hook(self, rev: Mapping[str, Any], lat: Mapping[str, Any], record: dict | None, **options):
        """``D_MF`` hook: a ``h -> h`` transform of the bottleneck feature after ``mid`` (B, C, h, w), or None (the
        official path). ``record``, when a dict, receives tensors for ``return_intermediates``. The NAT-III network
        overrides it (:meth:`~glare_nat_arch.glare_nat_arch.GLARENATNet.decoder_mid_hook`) and takes ``options``."""
        if options:
            raise TypeError(f"{type(self).__name__}.forward got unexpected options {sorted(options)}")
        return None

    def forward(
        self, lq: Tensor, vqgan: GLAREVQGAN, return_intermediates: bool = False, **options
    ) -> Tensor | dict[str, Tensor]:
        """Enhance ``lq`` (B, 3, H, W) in [0, 1], H and W multiples of :attr:`downscale` (pad first:
        :func:`~glare_nat_arch.padding.pad_to_multiple`; the models' ``test()`` does).

        Path: log -> ``E_c`` -> reverse flow (``z_hat``) -> latent hook :meth:`refine_latent` -> frozen VQGAN
        quantise + ``D_NL`` features ``[n1, n0]`` (its RGB only with ``return_intermediates``) ->
        ``D_MF(z_mf, [n1, n0], [s0, s1])`` with :meth:`decoder_mid_hook` after its ``mid`` block. The hooks of this
        class are the official path; ``options`` go to :meth:`decoder_mid_hook`.

        Returns the raw output (B, 3, H, W) (no clamp), or with ``return_intermediates`` a dict with ``output`` plus
        ``z_hat``, ``cond``, ``color_map``, ``bottleneck``, ``s0``, ``s1``, the
        :meth:`refine_latent` entries, ``z_dec`` (= ``z_nl``), ``z_hat_quant`` / ``z_hat_indices`` (the
        quantisation fed to ``D_NL``; indices None when the latent hook brings it), ``dnl_rgb``, ``n1``, ``n0``,
        the per-level fusion tensors and what :meth:`decoder_mid_hook` records.
        """
        rev = self.reverse(lq)
        lat = self.refine_latent(rev, vqgan.quantize.embedding.weight)
        dnl_rgb, nl_feats, quant, indices = self.decode_nl(vqgan, lat, return_rgb=return_intermediates)
        record: dict | None = {} if return_intermediates else None
        mid_hook = self.decoder_mid_hook(rev, lat, record, **options)
        inter: dict | None = {} if return_intermediates else None
        out = self.deformable_decoder(lat["z_mf"], nl_feats, rev["skips"], intermediates=inter, mid_hook=mid_hook)
        if not return_intermediates:
            return out
        extra = {k: rev[k] for k in ("z_hat", "cond", "color_map", "bottleneck")}
        nl = {"z_dec": lat["z_nl"], "z_hat_quant": quant, "z_hat_indices": indices, "dnl_rgb": dnl_rgb}
        skips = {"s0": rev["skips"][0], "s1": rev["skips"][1], "n1": nl_feats[0], "n0": nl_feats[-1]}
        return {"output": out, **extra, **lat, **nl, **skips, **inter, **record}
