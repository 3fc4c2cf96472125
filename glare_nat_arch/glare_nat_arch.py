"""GLARE with the NAT refiners (docs/nat.md "Feedback into GLARE"): registered wrapper networks.

* :class:`GLARENATFlowNet` = :class:`~glare_nat_arch.glare_arch.GLAREFlowNet` (Stage II) + ``nat2``
  (:class:`~glare_nat_arch.nat_arch.LatentNAT`). :meth:`GLARENATFlowNet.enhance` is the Stage-II image path with the
  latent NAT: ``x_hat = flow^-1`` -> NAT-II -> frozen VQGAN decoder RGB.
* :class:`GLARENATNet` = :class:`~glare_nat_arch.glare_arch.GLARENet` (Stage III) + ``nat2`` feeding both decoders
  + ``nat3`` (:class:`~glare_nat_arch.decoder_nat_arch.DecoderNAT`) on ``D_MF``'s bottleneck (H/4) features right
  after its ``mid`` block.

Both plug into the one GLARE path through its hooks: the latent hook ``refine_latent`` (reverse-flow result ->
NL-decoder input, its quantisation and the ``D_MF`` input) and ``decoder_mid_hook`` (``D_MF``'s ``mid_hook``);
the forward passes are :meth:`GLAREFlowNet.enhance <glare_nat_arch.glare_arch.GLAREFlowNet.enhance>` and
:meth:`GLARENet.forward <glare_nat_arch.glare_arch.GLARENet.forward>`.

State-dict names: the GLARE part keeps the official names (``RRDB.*``, ``flowUpsamplerNet.*``,
``deformable_decoder.*``, see :data:`GLARE_PREFIXES`); the refiners live under ``nat2.*`` and ``nat3.*``
(:data:`NAT_PREFIXES`). With both refiners disabled the state dict equals ``GLARENet``'s, so the official
``net_G.pth`` loads strictly; with refiners, load it restricted to :data:`GLARE_PREFIXES` (the models'
``path.pretrain_network_glare``) and the NAT weights from their own file.

The ``nat2`` / ``nat3`` arguments are the nested option blocks of docs/nat.md (network part; the training knobs
live in the ``train`` options). Their schema and defaults are :class:`~glare_nat_arch.nat_options.NAT2Options` /
:class:`~glare_nat_arch.nat_options.NAT3Options`; unknown keys, wrong types and choice values that are not
implemented raise one :class:`~glare_nat_arch.nat_options.NATOptionsError` naming every key.

Feedback (docs/nat.md "Feedback into GLARE"): the NL-decoder (frozen VQGAN, which re-quantises its input) gets
``z_nl = x_hat`` outside the ever-masked set and ``C[v^T]`` inside it, so untouched positions see exactly GLARE's
input; ``D_MF`` gets ``z_out`` of the refiner (``mf_input: refined``; hard or soft per ``feedback.mode``) or
``x_hat`` (``mf_input: flow``, usable with an official Stage-III decoder without retraining). With nothing masked
both equal ``x_hat`` and the output is bit-identical to GLARE's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.decoder_nat_arch import DecoderNAT
from glare_nat_arch.glare_arch import GLAREFlowNet, GLARENet
from glare_nat_arch.nat_arch import LatentNAT
from glare_nat_arch.nat_options import NAT2Options, NAT3Options, parse_network_options
from glare_nat_arch.nat_uncertainty import (
    FLOW_MC_HEAT,
    FLOW_MC_SAMPLES,
    histogram_entropy,
    nearest_codes,
    sample_train_mask,
)

__all__ = [
    "GLARE_PREFIXES",
    "NAT_PREFIXES",
    "vqgan_codebook",
    "GLARENATFlowNet",
    "GLARENATNet",
]

#: State-dict prefixes of the GLARE part (official names).
GLARE_PREFIXES = ("RRDB.", "flowUpsamplerNet.", "deformable_decoder.")
#: State-dict prefixes of the refiners.
NAT_PREFIXES = ("nat2.", "nat3.")


def vqgan_codebook(vqgan: nn.Module) -> Tensor:
    """The ``K x d`` codebook of a GLARE VQGAN (``quantize.embedding.weight``)."""
    return vqgan.quantize.embedding.weight


class _LatentNATMixin:
    """The NAT-II part shared by the Stage-II and Stage-III wrappers (needs ``self.nat2`` and its options)."""

    nat2: LatentNAT | None
    nat2_options: NAT2Options | None
    nat2_enabled: bool

    def _setup_nat2(
        self, options: NAT2Options | None, codebook_size: int, code_dim: int, cond_channels: int, need: bool
    ) -> None:
        """``self.nat2`` from the parsed ``network_g.nat2`` (None = absent); ``need`` keeps a disabled NAT-II for
        NAT-III's uncertainty map."""
        self.nat2_enabled = bool(options and options.enable)
        if options is None and need:
            options = NAT2Options(enable=False)
        self.nat2_options = options
        keep = self.nat2_enabled or need
        self.nat2 = LatentNAT(codebook_size, options, code_dim, cond_channels) if keep else None

    @property
    def mf_input(self) -> str:
        """``refined`` or ``flow`` (docs/nat.md "Feedback into GLARE")."""
        return self.nat2_options.feedback.mf_input if self.nat2_options else "flow"

    @torch.no_grad()
    def nat2_score(self, rev: Mapping[str, Any], codebook: Tensor) -> Tensor | None:
        """The ``flow_mc`` uncertainty (docs/nat.md) of a reverse-flow result, or None for the other sources.

        ``FLOW_MC_SAMPLES`` latents ``f^-1(color_map + FLOW_MC_HEAT * eps; cond)`` (``eps`` from a generator seeded
        0, so inference stays deterministic), their nearest codes, and the normalised entropy of each position's
        code histogram (:func:`~glare_nat_arch.nat_uncertainty.histogram_entropy`): ``B x h x w`` in [0, 1].
        Costs ``FLOW_MC_SAMPLES`` more flow passes (the flow is the small part of GLARE).
        """
        if self.nat2 is None or self.nat2.uncertainty_source != "flow_mc":
            return None
        color_map, cond = rev["color_map"], rev["cond"]
        gen = torch.Generator().manual_seed(0)
        codes = []
        for _ in range(FLOW_MC_SAMPLES):
            eps = torch.randn(color_map.shape, generator=gen).to(device=color_map.device, dtype=color_map.dtype)
            z, _ = self.flowUpsamplerNet(color_map + FLOW_MC_HEAT * eps, cond, reverse=True)
            codes.append(nearest_codes(z, codebook, self.nat2.chunk))
        return histogram_entropy(torch.stack(codes)).to(rev["z_hat"].device)

    def refine_latent(self, rev: Mapping[str, Any], codebook: Tensor) -> dict[str, Any]:
        """Apply NAT-II to a reverse-flow result (``rev`` of :meth:`GLAREFlowNet.reverse`): the latent hook of
        :meth:`GLAREFlowNet.enhance` and :meth:`GLARENet.forward`.

        Returns dict: ``z_nl`` (NL-decoder input, ``B x d x h x w``), ``quant_nl`` (its quantisation
        ``C[v^T]``, known from the decoding, or None when nothing was refined: then quantise ``z_nl``), ``z_mf``
        (``D_MF`` input), ``uncertainty`` (``B x h x w``, NAT-III's U; None without ``nat2``, and None from NAT-II
        when this network has no NAT-III) and ``refine`` (the :meth:`LatentNAT.refine` dict, or None when NAT-II is
        not applied).
        """
        z_hat = rev["z_hat"]
        if self.nat2 is None:
            return {"z_nl": z_hat, "quant_nl": None, "z_mf": z_hat, "uncertainty": None, "refine": None}
        if not self.nat2_enabled:  # kept only for NAT-III's uncertainty map (NAT-III only)
            with torch.no_grad():
                unc = self.nat2.uncertainty(z_hat, codebook, self.nat2_score(rev, codebook)).score
            return {"z_nl": z_hat, "quant_nl": None, "z_mf": z_hat, "uncertainty": unc, "refine": None}
        need_u = getattr(self, "nat3", None) is not None
        score = self.nat2_score(rev, codebook)
        with torch.no_grad():  # discrete decoding; NAT-II learns from its masked-token loss (TRAINED_OUTSIDE_FORWARD)
            ref = self.nat2.refine(
                z_hat, codebook, rev["color_map"], rev["cond"], stats=need_u, score=score, soft_codes=False
            )
        if ref["z_out"] is z_hat:  # nothing masked: GLARE's own latent for both decoders
            z_nl, quant_nl, z_ref = z_hat, None, z_hat
        else:
            union = ref["mask_union"][:, None]
            z_nl = torch.where(union, ref["z_q"].to(z_hat.dtype), z_hat)
            # never-masked positions keep v0 = the quantiser's nearest code of z_hat (the same distances; with another
            # row-block size only a near-tie within float rounding could go the other way), so C[v^T] is z_nl
            # quantised: no second nearest-code search over the K codes
            quant_nl = ref["z_q"].to(z_hat.dtype)
            # the refiner's latent (equal to z_hat outside the masked set), with GLARE's own gradient path there
            z_ref = torch.where(union, ref["z_out"], z_hat)
        z_mf = z_ref if self.mf_input == "refined" else z_hat
        return {"z_nl": z_nl, "quant_nl": quant_nl, "z_mf": z_mf, "uncertainty": ref["uncertainty"], "refine": ref}


@ARCH_REGISTRY.register()
class GLARENATFlowNet(_LatentNATMixin, GLAREFlowNet):
    """Stage II + NAT-II. Args: those of :class:`GLAREFlowNet`, plus ``codebook_size`` (the VQGAN's ``n_embed``)
    and ``nat2`` (docs/nat.md "Options" block; None = no refiner, then :meth:`enhance` is GLARE's Stage-II path).

    ``forward`` is still the Stage-II NLL pass of :class:`GLAREFlowNet`; the image path is :meth:`enhance`.
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {**GLAREFlowNet.TINY, "codebook_size": 16, "nat2": LatentNAT.TINY["options"]}
    #: trained by the masked-token loss (``nat2.forward``: logits at masked positions), not through ``forward``
    TRAINED_OUTSIDE_FORWARD: ClassVar[tuple[str, ...]] = ("nat2.",)

    def __init__(self, *args, codebook_size: int = 8192, nat2: Mapping | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.codebook_size = int(codebook_size)
        z_channels, cond_channels = self.RRDB.color_conv.out_channels, self.RRDB.cond_conv[0].out_channels
        options = parse_network_options({"nat2": nat2})["nat2"]
        self._setup_nat2(options, self.codebook_size, z_channels, cond_channels, need=False)


@ARCH_REGISTRY.register()
class GLARENATNet(_LatentNATMixin, GLARENet):
    """Stage III + NAT-II (latent) + NAT-III (decoder). Args: those of :class:`GLARENet`, plus ``codebook_size``,
    ``nat2`` and ``nat3`` (docs/nat.md blocks; None = absent). NAT-III needs NAT-II's code distribution for its
    uncertainty map, so ``nat3.enable`` with ``nat2`` absent or ``nat2.enable: false`` keeps a ``nat2`` module for
    the uncertainty only (its refiner is not applied).
    """

    #: keyword arguments of a small instance (tests build every registered network from its ``TINY``)
    TINY: ClassVar[dict[str, Any]] = {**GLARENATFlowNet.TINY, "nat3": DecoderNAT.TINY["options"]}
    #: NAT-II learns from its masked-token loss; its hard codes pass no gradient to the decoders
    TRAINED_OUTSIDE_FORWARD: ClassVar[tuple[str, ...]] = ("nat2.",)

    def __init__(
        self,
        *args,
        codebook_size: int = 8192,
        nat2: Mapping | None = None,
        nat3: Mapping | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.codebook_size = int(codebook_size)
        options = parse_network_options({"nat2": nat2, "nat3": nat3})
        self.nat3_options: NAT3Options | None = options["nat3"]
        nat3_on = bool(self.nat3_options and self.nat3_options.enable)
        cond_channels = self.RRDB.cond_conv[0].out_channels
        z_channels = self.RRDB.color_conv.out_channels
        self._setup_nat2(options["nat2"], self.codebook_size, z_channels, cond_channels, need=nat3_on)
        mid_channels = self.deformable_decoder.conv_in.out_channels
        self.nat3 = DecoderNAT(mid_channels, self.nat3_options, cond_channels) if nat3_on else None

    def decoder_mid_hook(
        self,
        rev: Mapping[str, Any],
        lat: Mapping[str, Any],
        record: dict | None,
        nat3_random_r_max: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Callable[[Tensor], Tensor] | None:
        """NAT-III as ``D_MF``'s ``mid_hook`` (``h -> h'`` on the bottleneck feature, B x C x h x w), or None without
        NAT-III. Its mask comes from ``lat["uncertainty"]`` (:meth:`refine_latent`, B x h x w) and the condition
        ``rev["cond"]``; ``nat3_random_r_max > 0`` (training) adds random patches, r3 ~ U(0, r_max) (docs/nat.md),
        drawn from ``generator``. Stores ``nat3_h_mid`` (features after ``mid``), ``nat3_h`` (refined) and
        ``nat3_mask`` (patch mask) in ``record`` when given (only then are they kept alive through the decoder).

        :meth:`GLARENet.forward <glare_nat_arch.glare_arch.GLARENet.forward>` calls it; its ``options`` are
        ``nat3_random_r_max`` and ``generator``.
        """
        nat3 = self.nat3
        if nat3 is None:
            return None
        cond, uncertainty = rev["cond"], lat["uncertainty"]

        def hook(h_mid: Tensor) -> Tensor:
            mask = nat3.patch_mask(uncertainty)
            if nat3_random_r_max > 0:
                rand = sample_train_mask(
                    torch.zeros_like(mask, dtype=torch.float32), 0.0, nat3_random_r_max, 0.0, generator
                )
                mask = mask | rand
            h_new, mask = nat3(h_mid, cond, uncertainty, mask=mask)
            if record is not None:
                record.update(nat3_h_mid=h_mid, nat3_h=h_new, nat3_mask=mask)
            return h_new

        return hook
