"""The NAT options (docs/nat.md "Options"): one schema, defaults in one place.

Four frozen dataclasses own every NAT knob and its default:

* :class:`NAT2Options` -> YAML ``network_g.nat2`` (groups ``grid``, ``model``, ``uncertainty``, ``decode``,
  ``feedback``), :class:`NAT3Options` -> ``network_g.nat3`` (groups ``model``, ``mask``): the networks'
  configuration, read by :class:`~glare_nat_arch.nat_arch.LatentNAT` / :class:`~glare_nat_arch.decoder_nat_arch.
  DecoderNAT` and the GLARE wrappers;
* :class:`NAT2TrainOptions` -> ``train.nat2``, :class:`NAT3TrainOptions` -> ``train.nat3``: the training knobs,
  read by :mod:`glare_nat_models.nat_model`.

:func:`parse_options` turns a (partial) YAML block into its dataclass; unknown keys, wrong types, values out of
range and choice values that are not implemented are collected and raised together as one
:class:`NATOptionsError` naming each full option key (``network_g.nat2.decode.iters``). :func:`nat_option_problems`
runs the same checks over a whole option tree for the launchers' preflight, before BasicSR creates any folder.
:func:`leaves` lists every key with its field metadata (default, meaning), from which a test renders and checks the
docs/nat.md tables.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "AUTONAT_SUB_T4",
    "COND_MODES",
    "POS_ENCODINGS",
    "SCHEDULE_NAMES",
    "NATOptionsError",
    "NAT2Options",
    "NAT3Options",
    "NAT2TrainOptions",
    "NAT3TrainOptions",
    "parse_options",
    "parse_network_options",
    "collect_options",
    "nat_option_problems",
    "explicit_value",
    "leaves",
]

#: ``model.cond_mode`` values (docs/nat.md "Token embedding and conditioning").
COND_MODES = ("additive", "adaln", "xattn")
#: ``model.pos`` values.
POS_ENCODINGS = ("sincos2d+peg", "sincos2d", "peg")
#: Named ``decode.schedule`` values (or a list of ratios ``r_1..r_(T-1)``).
SCHEDULE_NAMES = ("cosine", "linear", "square", "cubic", "arccos", "root", "autonat_sub")
#: docs/nat.md: AutoNAT-L's searched T=8 ratios sub-sampled at steps 2, 4, 6 (``schedule: autonat_sub``, T=4).
AUTONAT_SUB_T4 = (0.880, 0.746, 0.407)

_NUM = "number"
_AUTO_NUM = "number_or_auto"
_SCHEDULE = "schedule"
_OPT_INT = "int_or_null"


def knob(
    default: Any,
    doc: str,
    kind: str | None = None,
    choices: tuple = (),
    low: float | None = None,
    high: float | None = None,
    autos: tuple[str, ...] = (),
) -> Any:
    """A schema leaf: ``default`` plus metadata (``doc`` for the docs table, ``kind`` for the type check:
    ``int``, ``number``, ``bool``, ``str``, ``number_or_auto``, ``int_or_null``, ``schedule``; inferred from the
    default when omitted), allowed ``choices``, inclusive ``low`` / ``high`` bounds and the ``auto`` names."""
    if kind is None:
        kind = {bool: "bool", int: "int", float: _NUM, str: "str"}[type(default)]
    meta = {"doc": doc, "kind": kind, "choices": choices, "low": low, "high": high, "autos": autos}
    return field(default=default, metadata=meta)


def group(cls: type) -> Any:
    """A nested option group (its own dataclass, all defaults)."""
    return field(default_factory=cls, metadata={"group": True})


# --------------------------------------------------------------------------------------------- network_g.nat2
@dataclass(frozen=True)
class NAT2Grid:
    """``network_g.nat2.grid``: the token grid."""

    merge: int = knob(2, "token merge factor (1 = a token per latent position: 4x the tokens, 16x attention)", low=1)


@dataclass(frozen=True)
class TransformerSize:
    """The size keys both NATs' ``model`` blocks share."""

    dim: int = knob(384, "transformer width", low=1)
    depth: int = knob(6, "transformer blocks", low=1)
    heads: int = knob(6, "attention heads (must divide `dim`)", low=1)


@dataclass(frozen=True)
class NAT2Model(TransformerSize):
    """``network_g.nat2.model``: the transformer."""

    mlp_ratio: float = knob(4.0, "MLP hidden width / `dim`", low=0)
    dropout: float = knob(0.1, "dropout in training", low=0, high=1)
    uvit_skips: bool = knob(False, "U-ViT long skips: block `i`'s output is concatenated into its mirror block")
    pos: str = knob("sincos2d+peg", "position encoding: `sincos2d`, `peg` or both", choices=POS_ENCODINGS)
    cond_mode: str = knob(
        "additive",
        "`additive`, `adaln` or `xattn` ([conditioning](#token-embedding-and-conditioning))",
        choices=COND_MODES,
    )
    tok_init: str = knob(
        "random", "`codebook_lift`: code embeddings start from the codebook", choices=("random", "codebook_lift")
    )
    mask_hides_latent: bool = knob(False, "hide `x_hat` and the score at `[MASK]` positions")


@dataclass(frozen=True)
class NAT2Uncertainty:
    """``network_g.nat2.uncertainty``: the flow's code distribution and the initial mask."""

    source: str = knob(
        "entropy",
        "uncertainty that masks: `entropy`, `margin`, `flow_mc` ([sources](#uncertainty-sources))",
        choices=("entropy", "margin", "flow_mc"),
    )
    dist_temp: float | str = knob(
        "auto_median_gap",
        "`T_d`; `auto` / `auto_median_gap` = calibrated, or a number (wins over the checkpoint's value)",
        _AUTO_NUM,
        low=0,
        autos=("auto", "auto_median_gap"),
    )
    knn: int = knob(64, "nearest codes in the flow distribution", low=1)
    tau: float | str = knob(
        "auto",
        "mask threshold; `auto` = calibrated (kept from the checkpoint), a number "
        "overrides it; `1.0` masks nothing (GLARE's output)",
        _AUTO_NUM,
        autos=("auto",),
    )
    rho_target: float = knob(0.25, "target masked fraction for `tau: auto` (and `tau3: auto`)", low=0, high=1)
    rho_max: float = knob(0.5, "cap on the masked fraction per image", low=0, high=1)


@dataclass(frozen=True)
class NAT2Decode:
    """``network_g.nat2.decode``: the decoding rounds."""

    iters: int = knob(4, "decoding rounds `T`", low=1)
    schedule: str | tuple = knob(
        "cosine",
        "[mask schedule](#mask-schedules): `cosine`, `linear`, `square`, `cubic`, `arccos`, `root`, "
        "`autonat_sub` (T=4) or ratios `[r_1, ..., r_(T-1)]`",
        _SCHEDULE,
    )
    conf: str = knob(
        "logp", "confidence rule: `logp`, `neg_entropy`, `margin`", choices=("logp", "neg_entropy", "margin")
    )
    sample_temp: float = knob(0.0, "0 = argmax; > 0 samples `softmax(logits / sample_temp)`", low=0)
    choice_temp: float = knob(0.0, "Gumbel noise on the confidence, annealed `choice_temp (1 - t/T)`", low=0)
    remask_rule: str = knob(
        "schedule", "`threshold`: stay masked while the NAT's entropy exceeds `tau`", choices=("schedule", "threshold")
    )
    remask_scope: str = knob("new_only", "`all`: any token may be masked again", choices=("new_only", "all"))
    order: str = knob(
        "confidence",
        "which masked tokens commit first: `confidence` (the most confident, MaskGIT) or `halton` (a fixed order "
        "spread over the grid)",
        choices=("confidence", "halton"),
    )
    early_stop: int | None = knob(
        None, "stop after this round, committing everything (`~` = run all `T`)", _OPT_INT, low=1
    )
    flow_prior: float = knob(
        0.0,
        "weight `lambda` of the flow's code distribution in the prediction: `log p_NAT + lambda log p_flow` "
        "(0 = the NAT alone; large = keep the flow's codes)",
        low=0,
    )

    @property
    def ratios(self) -> str | list[float]:
        """The schedule for :func:`~glare_nat_arch.nat_uncertainty.mask_schedule` (``autonat_sub`` expanded)."""
        if self.schedule == "autonat_sub":
            return list(AUTONAT_SUB_T4)
        return self.schedule if isinstance(self.schedule, str) else list(self.schedule)


@dataclass(frozen=True)
class NAT2Feedback:
    """``network_g.nat2.feedback``: what GLARE's decoders get."""

    mode: str = knob("hard", "`soft`: expected code for `D_MF`", choices=("hard", "soft"))
    mf_input: str = knob("refined", "`flow`: `D_MF` keeps `x_hat` (Stage III only)", choices=("refined", "flow"))


@dataclass(frozen=True)
class NAT2Options:
    """``network_g.nat2``: the latent NAT (NAT-II)."""

    enable: bool = knob(True, "apply the latent NAT")
    grid: NAT2Grid = group(NAT2Grid)
    model: NAT2Model = group(NAT2Model)
    uncertainty: NAT2Uncertainty = group(NAT2Uncertainty)
    decode: NAT2Decode = group(NAT2Decode)
    feedback: NAT2Feedback = group(NAT2Feedback)

    def problems(self, where: str) -> list[str]:
        """Checks that involve several keys."""
        out = []
        d, m = self.decode, self.model
        if m.dim % m.heads:
            out.append(f"{where}.model.heads = {m.heads} does not divide {where}.model.dim = {m.dim}")
        if d.early_stop is not None and d.early_stop > d.iters:
            out.append(f"{where}.decode.early_stop = {d.early_stop} exceeds {where}.decode.iters = {d.iters}")
        if d.schedule == "autonat_sub" and d.iters != 4:
            out.append(f"{where}.decode.schedule = 'autonat_sub' needs {where}.decode.iters = 4, got {d.iters}")
        if not isinstance(d.schedule, str) and len(d.schedule) not in (d.iters - 1, d.iters):
            out.append(f"{where}.decode.schedule needs {d.iters - 1} ratios for iters = {d.iters}, got {d.schedule}")
        if d.remask_rule == "threshold" and d.remask_scope != "new_only":
            out.append(f"{where}.decode.remask_rule = 'threshold' needs {where}.decode.remask_scope = 'new_only'")
        if d.order == "halton" and (d.remask_rule != "schedule" or d.remask_scope != "new_only"):
            out.append(
                f"{where}.decode.order = 'halton' needs {where}.decode.remask_rule = 'schedule' and "
                f"{where}.decode.remask_scope = 'new_only' (a fixed order neither thresholds nor revises)"
            )
        return out


# --------------------------------------------------------------------------------------------- network_g.nat3
@dataclass(frozen=True)
class NAT3Model(TransformerSize):
    """``network_g.nat3.model``: the transformer."""

    depth: int = knob(4, "transformer blocks", low=1)
    patch: int = knob(2, "patch side", low=1)


@dataclass(frozen=True)
class NAT3Mask:
    """``network_g.nat3.mask``: the patch mask."""

    tau3: float | str = knob(
        "auto",
        "patch-uncertainty threshold (`auto` = calibrated, or a number that wins over the checkpoint's value)",
        _AUTO_NUM,
        autos=("auto",),
    )
    rho3_max: float = knob(0.5, "cap on the masked patch fraction", low=0, high=1)


@dataclass(frozen=True)
class NAT3Options:
    """``network_g.nat3``: the decoder NAT (NAT-III)."""

    enable: bool = knob(False, "apply the decoder NAT")
    level: str = knob("h4", "insertion point: after `D_MF`'s `mid` block", choices=("h4",))
    model: NAT3Model = group(NAT3Model)
    mask: NAT3Mask = group(NAT3Mask)
    iters: int = knob(1, "passes", choices=(1,))
    residual: str = knob("masked_only", "`all`: add `delta` everywhere", choices=("masked_only", "all"))

    def problems(self, where: str) -> list[str]:
        m = self.model
        return (
            [f"{where}.model.heads = {m.heads} does not divide {where}.model.dim = {m.dim}"] if m.dim % m.heads else []
        )


# --------------------------------------------------------------------------------------------- train.nat2 / nat3
_CALIB_DATASET = "dataset (`datasets.<name>`) whose images calibrate the `auto` values"
#: ``train.nat2.r_dist`` values: how the training masking ratio is drawn
RATIO_DISTS = ("uniform", "maskgit_cos", "beta_12_3")


def _listed(values: tuple[str, ...]) -> str:
    return ", ".join(f"`{v}`" for v in values)


@dataclass(frozen=True)
class NAT2TrainOptions:
    """``train.nat2``: NAT-II training (the optimiser uses BasicSR's own keys)."""

    r_dist: str = knob("uniform", "masking-ratio distribution: " + _listed(RATIO_DISTS), choices=RATIO_DISTS)
    r_min: float = knob(0.05, "lower bound of the uniform ratio", low=0, high=1)
    r_max: float = knob(0.6, "upper bound of the uniform ratio", low=0, high=1)
    beta_entropy: float = knob(4.0, "weight of the score in the training mask (0 = uniform, `.inf` = top score)", low=0)
    label_smoothing: float = knob(0.1, "cross-entropy label smoothing", low=0, high=1)
    lambda_vis: float = knob(
        0.0, "weight of the cross-entropy at visible positions (logits at all positions: memory)", low=0
    )
    p_gt_visible: float = knob(0.0, "probability per sample that visible tokens are the teacher codes", low=0, high=1)
    unroll_p: float = knob(0.0, "probability of training from the state after `t*` decoding rounds", low=0, high=1)
    full_frames: bool = knob(True, "train on whole frames; must agree with `datasets.train.gt_size: ~`")
    calib_dataset: str = knob("val", _CALIB_DATASET)
    calib_max_images: int = knob(50, "at most this many calibration images", low=1)

    def problems(self, where: str) -> list[str]:
        if self.r_min > self.r_max:
            return [f"{where}.r_min = {self.r_min} exceeds {where}.r_max = {self.r_max}"]
        return []


@dataclass(frozen=True)
class NAT3TrainOptions:
    """``train.nat3``: NAT-III training."""

    train_random_r_max: float = knob(
        0.5, "extra random patches in training masks (fraction `~ U(0, r_max)`)", low=0, high=1
    )
    lambda_mfm: float = knob(0.1, "weight of masked feature modelling", low=0)
    lr: float = knob(2.0e-4, "learning rate of NAT-III's optimiser group", low=0)
    warmup: int = knob(1000, "linear warm-up iterations of NAT-III's group", low=0)
    calib_dataset: str = knob("val", _CALIB_DATASET)
    calib_max_images: int = knob(50, "at most this many calibration images", low=1)


#: The YAML blocks of the schema: option key -> dataclass.
SCHEMA: dict[str, type] = {
    "network_g.nat2": NAT2Options,
    "network_g.nat3": NAT3Options,
    "train.nat2": NAT2TrainOptions,
    "train.nat3": NAT3TrainOptions,
}


class NATOptionsError(ValueError):
    """Every problem of one or more NAT option blocks, one per line, each naming its full option key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} NAT option problem(s):\n{lines}")


# ------------------------------------------------------------------------------------------------ parsing
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_leaf(f: dataclasses.Field, value: Any, key: str) -> tuple[Any, list[str]]:
    """``(converted value, problems)`` of one leaf against its metadata."""
    meta, kind = f.metadata, f.metadata["kind"]
    autos = meta["autos"]
    number = None
    if kind == "bool" and not isinstance(value, bool):
        return value, [f"{key} must be true or false, got {value!r}"]
    if kind == "str" and not isinstance(value, str):
        return value, [f"{key} must be a string, got {value!r}"]
    if kind in ("int", _OPT_INT):
        if value is None and kind == _OPT_INT:
            return None, []
        if not isinstance(value, int) or isinstance(value, bool):
            return value, [f"{key} must be an integer{' or ~' if kind == _OPT_INT else ''}, got {value!r}"]
        number = value
    if kind == _NUM or (kind == _AUTO_NUM and not (isinstance(value, str) and value in autos)):
        if not _is_number(value):
            extra = f" or one of {list(autos)}" if autos else ""
            return value, [f"{key} must be a number{extra}, got {value!r}"]
        value = number = float(value)
    if kind == _SCHEDULE:
        if isinstance(value, str):
            if value not in SCHEDULE_NAMES:
                return value, [f"{key} = {value!r} is not implemented; supported: {list(SCHEDULE_NAMES)} or ratios"]
        elif isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value):
            value = tuple(float(v) for v in value)
            if any(not 0.0 <= v <= 1.0 for v in value):
                return value, [f"{key}: ratios must lie in [0, 1], got {list(value)}"]
        else:
            return value, [f"{key} must be a schedule name or a list of ratios, got {value!r}"]
    if meta["choices"] and value not in meta["choices"]:
        return value, [f"{key} = {value!r} is not implemented; supported: {list(meta['choices'])}"]
    if number is not None and not math.isnan(number):
        low, high = meta["low"], meta["high"]
        # the auto-or-number temperatures must be positive, the thresholds may be anything
        if kind == _AUTO_NUM and low is not None and not number > low:
            return value, [f"{key} must be > {low} or one of {list(autos)}, got {value!r}"]
        if kind != _AUTO_NUM and ((low is not None and number < low) or (high is not None and number > high)):
            span = f"[{low}, {high}]" if high is not None else f">= {low}"
            return value, [f"{key} must be {'in ' if high is not None else ''}{span}, got {value!r}"]
    return value, []


T = TypeVar("T")


def collect_options(cls: type[T], data: Any, where: str) -> tuple[T | None, list[str]]:
    """``(options, problems)`` of the YAML block ``data`` (None = all defaults) for dataclass ``cls``; options is
    None when there are problems. ``where`` is the block's option key, used in every message."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data, []
    if not isinstance(data, Mapping):
        return None, [f"{where} must be a mapping of options, got {data!r}"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = [f"{where}.{k} is unknown; known keys: {sorted(fields)}" for k in data if k not in fields]
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{where}.{name}"
        if f.metadata.get("group"):
            values[name], sub = collect_options(f.default_factory, data[name], key)
        else:
            values[name], sub = _check_leaf(f, data[name], key)
        problems += sub
    if problems:
        return None, problems
    out = cls(**values)
    check = getattr(out, "problems", None)
    problems = check(where) if check is not None else []
    return (None, problems) if problems else (out, [])


def parse_options(cls: type[T], data: Any, where: str) -> T:
    """:func:`collect_options` raising one :class:`NATOptionsError` that lists every problem."""
    out, problems = collect_options(cls, data, where)
    if problems:
        raise NATOptionsError(problems)
    return out


def parse_network_options(blocks: Mapping[str, Any]) -> dict[str, Any]:
    """``{'nat2': NAT2Options | None, 'nat3': ...}`` of the wrappers' ``network_g.nat2`` / ``nat3`` arguments
    (None stays None = absent); the problems of all blocks raise together as one :class:`NATOptionsError`."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, data in blocks.items():
        out[name], sub = (
            (None, []) if data is None else collect_options(SCHEMA[f"network_g.{name}"], data, f"network_g.{name}")
        )
        problems += sub
    if problems:
        raise NATOptionsError(problems)
    return out


#: ``network_g.type`` -> the NAT blocks it takes.
NAT_NETWORKS = {"GLARENATFlowNet": ("nat2",), "GLARENATNet": ("nat2", "nat3")}


def nat_option_problems(opt: Mapping[str, Any]) -> list[str]:
    """Every NAT option problem of a whole option tree (``network_g.nat2/nat3`` of the NAT networks,
    ``train.nat2/nat3``); empty when all is well. For the launchers' preflight."""
    problems: list[str] = []
    net = opt.get("network_g")
    if isinstance(net, Mapping) and net.get("type") in NAT_NETWORKS:
        allowed = NAT_NETWORKS[net["type"]]
        for block in ("nat2", "nat3"):
            if block in net and block not in allowed:
                problems.append(f"network_g.{block} is unknown for network_g.type {net['type']}")
            elif block in net and net[block] is not None:
                problems += collect_options(SCHEMA[f"network_g.{block}"], net[block], f"network_g.{block}")[1]
    train = opt.get("train")
    if isinstance(train, Mapping):
        for block in ("nat2", "nat3"):
            if train.get(block) is not None:
                problems += collect_options(SCHEMA[f"train.{block}"], train[block], f"train.{block}")[1]
    return problems


def explicit_value(value: float | str | None) -> float | None:
    """A ``number_or_auto`` option as a float, or None for ``auto`` and NaN (the calibrated value is kept)."""
    if value is None or isinstance(value, str) or math.isnan(float(value)):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------- leaves
def leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every leaf of a schema dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            out += leaves(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out
