"""GLARE with the NAT refiners (docs/nat.md "Feedback into GLARE"): registered wrapper networks.

* :class:`GLARENATFlowNet` = :class:`~glare_nat_arch.glare_arch.GLAREFlowNet` (Stage II) + ``nat2``
  (:class:`~glare_nat_arch.nat_arch.LatentNAT`). :meth:`GLARENATFlowNet.enhance` is the Stage-II image path with the
  latent NAT: ``x_hat = flow^-1`` -> NAT-II -> frozen VQGAN decoder RGB.
* :class:`GLARENATNet` = :class:`~glare_nat_arch.glare_arch.GLARENet` (Stage III) + ``nat2`` feeding both decoders
  + ``nat3`` (:class:`~glare_nat_arch.nat_arch.DecoderNAT`) on ``D_MF``'s bottleneck (H/4) features right after its
  ``mid`` block.

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
live in the ``train`` options, see :mod:`glare_nat_models.nat_model`). Missing keys take the documented defaults
(:data:`NAT2_DEFAULTS`, :data:`NAT3_DEFAULTS`), unknown keys and non-default values of knobs that are not
implemented raise a ``ValueError`` naming the key.

Feedback (docs/nat.md "Feedback into GLARE"): the NL-decoder (frozen VQGAN, which re-quantises its input) gets
``z_nl = x_hat`` outside the ever-masked set and ``C[v^T]`` inside it, so untouched positions see exactly GLARE's
input; ``D_MF`` gets ``z_out`` of the refiner (``mf_input: refined``; hard or soft per ``feedback.mode``) or
``x_hat`` (``mf_input: flow``, usable with an official Stage-III decoder without retraining). With nothing masked
both equal ``x_hat`` and the output is bit-identical to GLARE's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from copy import deepcopy
from typing import Any

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

from glare_nat_arch.glare_arch import GLAREFlowNet, GLARENet
from glare_nat_arch.nat_arch import COND_MODES, POS_ENCODINGS, DecoderNAT, LatentNAT
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
    "NAT2_DEFAULTS",
    "NAT3_DEFAULTS",
    "AUTONAT_SUB_T4",
    "SUPPORTED_VALUES",
    "resolve_nat_config",
    "build_latent_nat",
    "build_decoder_nat",
    "vqgan_codebook",
    "GLARENATFlowNet",
    "GLARENATNet",
]

#: State-dict prefixes of the GLARE part (official names).
GLARE_PREFIXES = ("RRDB.", "flowUpsamplerNet.", "deformable_decoder.")
#: State-dict prefixes of the refiners.
NAT_PREFIXES = ("nat2.", "nat3.")

#: docs/nat.md "Options" ``nat2`` (network part) with the documented defaults.
NAT2_DEFAULTS: dict[str, Any] = {
    "enable": True,
    "grid": {"merge": 2},
    "model": {
        "dim": 384,
        "depth": 6,
        "heads": 6,
        "mlp_ratio": 4,
        "dropout": 0.1,
        "uvit_skips": False,
        "pos": "sincos2d+peg",
        "cond_mode": "additive",
        "tok_init": "random",
        "mask_hides_latent": False,
    },
    "uncertainty": {
        "source": "entropy",
        "dist_temp": "auto_median_gap",
        "knn": 64,
        "tau": "auto",
        "rho_target": 0.25,
        "rho_max": 0.5,
    },
    "decode": {
        "iters": 4,
        "schedule": "cosine",
        "conf": "logp",
        "sample_temp": 0.0,
        "choice_temp": 0.0,
        "remask_rule": "schedule",
        "remask_scope": "new_only",
        "early_stop": None,
    },
    "feedback": {"mode": "hard", "mf_input": "refined"},
}

#: docs/nat.md ``nat3`` (network part) with the documented defaults (``train_random_r_max`` / ``lambda_mfm`` are
#: training options: ``train.nat3``).
NAT3_DEFAULTS: dict[str, Any] = {
    "enable": False,
    "level": "h4",
    "model": {"dim": 384, "depth": 4, "heads": 6, "patch": 2},
    "mask": {"tau3": "auto", "rho3_max": 0.5},
    "iters": 1,
    "residual": "masked_only",
}

#: docs/nat.md: AutoNAT-L's searched T=8 ratios sub-sampled at steps 2, 4, 6 (``schedule: autonat_sub``, T=4).
AUTONAT_SUB_T4 = (0.880, 0.746, 0.407)

#: The implemented values of the choice knobs (others raise, naming the option): {block: {path: values}}.
SUPPORTED_VALUES: dict[str, dict[str, tuple]] = {
    "nat2": {
        "model.uvit_skips": (False, True),
        "model.pos": POS_ENCODINGS,
        "model.cond_mode": COND_MODES,
        "model.tok_init": ("random", "codebook_lift"),
        "uncertainty.source": ("entropy", "margin", "flow_mc"),
        "decode.remask_rule": ("schedule", "threshold"),
        "feedback.mode": ("hard", "soft"),
        "feedback.mf_input": ("refined", "flow"),
    },
    "nat3": {"level": ("h4",), "iters": (1,), "residual": ("masked_only", "all")},
}


def resolve_nat_config(
    cfg: Mapping[str, Any] | None,
    defaults: Mapping[str, Any],
    where: str,
    supported: Mapping[str, tuple] | None = None,
) -> dict[str, Any]:
    """Merge a (partial) nested option block over ``defaults``; unknown keys raise ``ValueError`` naming them.

    Args:
        cfg: the user's block (``None`` = all defaults).
        defaults: e.g. :data:`NAT2_DEFAULTS`.
        where: option path used in messages, e.g. ``'network_g.nat2'``.
        supported: ``{'model.pos': (allowed, ...)}``; other values raise (knobs declared but not implemented).
    """
    out = deepcopy(dict(defaults))
    if cfg is not None and not isinstance(cfg, Mapping):
        raise ValueError(f"option {where} must be a mapping, got {type(cfg).__name__}")
    for key, value in (cfg or {}).items():
        if key not in defaults:
            raise ValueError(f"option {where}.{key} is unknown; known keys: {sorted(defaults)}")
        if isinstance(defaults[key], Mapping):
            out[key] = resolve_nat_config(value, defaults[key], f"{where}.{key}")
        else:
            out[key] = value
    for path, allowed in (supported or {}).items():
        node: Any = out
        for part in path.split("."):
            node = node[part]
        if node not in allowed:
            raise ValueError(
                f"option {where}.{path} = {node!r} is not implemented; supported: {list(allowed)} "
                "(docs/nat.md 'Options' lists it as an ablation)"
            )
    return out


def _auto_or_float(value: Any, key: str, auto_names: tuple[str, ...]) -> float | None:
    if value is None or value in auto_names:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"option {key} must be a number or one of {list(auto_names)}, got {value!r}") from None


def build_latent_nat(cfg: Mapping[str, Any], codebook_size: int, code_dim: int, cond_channels: int) -> LatentNAT:
    """A :class:`LatentNAT` from a resolved ``nat2`` block (see :data:`NAT2_DEFAULTS`)."""
    m, u, d = cfg["model"], cfg["uncertainty"], cfg["decode"]
    schedule = d["schedule"]
    if schedule == "autonat_sub":
        if int(d["iters"]) != 4:
            raise ValueError(f"option nat2.decode.schedule 'autonat_sub' needs iters 4, got {d['iters']}")
        schedule = list(AUTONAT_SUB_T4)
    return LatentNAT(
        codebook_size,
        dim=int(m["dim"]),
        depth=int(m["depth"]),
        heads=int(m["heads"]),
        mlp_ratio=float(m["mlp_ratio"]),
        dropout=float(m["dropout"]),
        cond_channels=cond_channels,
        code_dim=code_dim,
        merge=int(cfg["grid"]["merge"]),
        pos=m["pos"],
        uvit_skips=bool(m["uvit_skips"]),
        cond_mode=m["cond_mode"],
        tok_init=m["tok_init"],
        mask_hides_latent=bool(m["mask_hides_latent"]),
        iters=int(d["iters"]),
        schedule=schedule,
        conf=d["conf"],
        sample_temp=float(d["sample_temp"]),
        choice_temp=float(d["choice_temp"]),
        remask_scope=d["remask_scope"],
        remask_rule=d["remask_rule"],
        early_stop=None if d["early_stop"] is None else int(d["early_stop"]),
        knn=int(u["knn"]),
        dist_temp=_auto_or_float(u["dist_temp"], "nat2.uncertainty.dist_temp", ("auto", "auto_median_gap")),
        uncertainty_source=u["source"],
        tau=_auto_or_float(u["tau"], "nat2.uncertainty.tau", ("auto",)),
        rho_max=float(u["rho_max"]),
        feedback=cfg["feedback"]["mode"],
    )


def build_decoder_nat(cfg: Mapping[str, Any], in_channels: int, cond_channels: int) -> DecoderNAT:
    """A :class:`DecoderNAT` from a resolved ``nat3`` block (see :data:`NAT3_DEFAULTS`)."""
    m = cfg["model"]
    return DecoderNAT(
        in_channels=in_channels,
        dim=int(m["dim"]),
        depth=int(m["depth"]),
        heads=int(m["heads"]),
        cond_channels=cond_channels,
        patch=int(m["patch"]),
        tau3=_auto_or_float(cfg["mask"]["tau3"], "nat3.mask.tau3", ("auto",)),
        rho3_max=float(cfg["mask"]["rho3_max"]),
        residual=cfg["residual"],
    )


def vqgan_codebook(vqgan: nn.Module) -> Tensor:
    """The ``K x d`` codebook of a GLARE VQGAN (``quantize.embedding.weight``)."""
    return vqgan.quantize.embedding.weight


class _LatentNATMixin:
    """The NAT-II part shared by the Stage-II and Stage-III wrappers (needs ``self.nat2`` and configs)."""

    nat2: LatentNAT | None
    nat2_cfg: dict[str, Any] | None
    nat2_enabled: bool

    def _setup_nat2(self, nat2: Mapping | None, codebook_size: int, code_dim: int, cond_channels: int, need: bool):
        self.nat2_cfg = (
            None
            if nat2 is None
            else resolve_nat_config(nat2, NAT2_DEFAULTS, "network_g.nat2", SUPPORTED_VALUES["nat2"])
        )
        self.nat2_enabled = bool(self.nat2_cfg and self.nat2_cfg["enable"])
        if self.nat2_cfg is None and need:
            self.nat2_cfg = resolve_nat_config({"enable": False}, NAT2_DEFAULTS, "network_g.nat2")
        keep = self.nat2_enabled or need
        self.nat2 = build_latent_nat(self.nat2_cfg, codebook_size, code_dim, cond_channels) if keep else None

    def apply_option_values(self) -> dict[str, float]:
        """Write the numeric ``dist_temp`` / ``tau`` (and NAT-III ``tau3``) of the options into the buffers.

        Call after loading a checkpoint: explicit option values win over the checkpoint's calibrated ones; ``auto``
        keeps the checkpoint's value (NaN = not calibrated yet). Returns the values written.
        """
        written: dict[str, float] = {}
        if self.nat2 is not None:
            u = self.nat2_cfg["uncertainty"]
            for name, autos in (("dist_temp", ("auto", "auto_median_gap")), ("tau", ("auto",))):
                value = _auto_or_float(u[name], f"nat2.uncertainty.{name}", autos)
                if value is not None:
                    getattr(self.nat2, name).fill_(value)
                    written[name] = value
        nat3 = getattr(self, "nat3", None)
        if nat3 is not None:
            value = _auto_or_float(self.nat3_cfg["mask"]["tau3"], "nat3.mask.tau3", ("auto",))
            if value is not None:
                nat3.tau3.fill_(value)
                written["tau3"] = value
        return written

    @property
    def mf_input(self) -> str:
        """``refined`` or ``flow`` (docs/nat.md "Feedback into GLARE")."""
        return self.nat2_cfg["feedback"]["mf_input"] if self.nat2_cfg else "flow"

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
            unc = self.nat2.uncertainty(z_hat, codebook, self.nat2_score(rev, codebook)).score
            return {"z_nl": z_hat, "quant_nl": None, "z_mf": z_hat, "uncertainty": unc, "refine": None}
        need_u = getattr(self, "nat3", None) is not None
        score = self.nat2_score(rev, codebook)
        ref = self.nat2.refine(
            z_hat, codebook, rev["color_map"], rev["cond"], stats=need_u, score=score, soft_codes=False
        )
        if ref["z_out"] is z_hat:  # nothing masked: GLARE's own latent for both decoders
            z_nl, quant_nl = z_hat, None
        else:
            z_nl = torch.where(ref["mask_union"][:, None], ref["z_q"].to(z_hat.dtype), z_hat)
            # never-masked positions keep v0 = the quantiser's nearest code of z_hat (the same distances; with another
            # row-block size only a near-tie within float rounding could go the other way), so C[v^T] is z_nl
            # quantised: no second nearest-code search over the K codes
            quant_nl = ref["z_q"].to(z_hat.dtype)
        z_mf = ref["z_out"] if self.mf_input == "refined" else z_hat
        return {"z_nl": z_nl, "quant_nl": quant_nl, "z_mf": z_mf, "uncertainty": ref["uncertainty"], "refine": ref}


@ARCH_REGISTRY.register()
class GLARENATFlowNet(_LatentNATMixin, GLAREFlowNet):
    """Stage II + NAT-II. Args: those of :class:`GLAREFlowNet`, plus ``codebook_size`` (the VQGAN's ``n_embed``)
    and ``nat2`` (docs/nat.md "Options" block; None = no refiner, then :meth:`enhance` is GLARE's Stage-II path).

    ``forward`` is still the Stage-II NLL pass of :class:`GLAREFlowNet`; the image path is :meth:`enhance`.
    """

    def __init__(self, *args, codebook_size: int = 8192, nat2: Mapping | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.codebook_size = int(codebook_size)
        z_channels, cond_channels = self.RRDB.color_conv.out_channels, self.RRDB.cond_conv[0].out_channels
        self._setup_nat2(nat2, self.codebook_size, z_channels, cond_channels, need=False)


@ARCH_REGISTRY.register()
class GLARENATNet(_LatentNATMixin, GLARENet):
    """Stage III + NAT-II (latent) + NAT-III (decoder). Args: those of :class:`GLARENet`, plus ``codebook_size``,
    ``nat2`` and ``nat3`` (docs/nat.md blocks; None = absent). NAT-III needs NAT-II's code distribution for its
    uncertainty map, so ``nat3.enable`` with ``nat2`` absent or ``nat2.enable: false`` keeps a ``nat2`` module for
    the uncertainty only (its refiner is not applied).
    """

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
        self.nat3_cfg = (
            None
            if nat3 is None
            else resolve_nat_config(nat3, NAT3_DEFAULTS, "network_g.nat3", SUPPORTED_VALUES["nat3"])
        )
        nat3_on = bool(self.nat3_cfg and self.nat3_cfg["enable"])
        cond_channels = self.RRDB.cond_conv[0].out_channels
        self._setup_nat2(nat2, self.codebook_size, self.RRDB.color_conv.out_channels, cond_channels, need=nat3_on)
        mid_channels = self.deformable_decoder.conv_in.out_channels
        self.nat3 = build_decoder_nat(self.nat3_cfg, mid_channels, cond_channels) if nat3_on else None

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
