"""The docs/nat.md option tables and the design-knob map, rendered from the NAT option schema (test helpers)."""

from __future__ import annotations

from typing import Any

from glare_nat_arch.nat_options import NAT2Options, NAT2TrainOptions, NAT3Options, leaves


def _shown(value: Any) -> str:
    if value is None:
        return "`~`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`{value}`"
    return str(value)


def options_table(cls: type) -> str:
    """The docs/nat.md table (``| key | default | what it does |``) of a schema dataclass."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    rows += [f"| `{key}` | {_shown(f.default)} | {f.metadata['doc']} |" for key, f in leaves(cls)]
    return "\n".join(rows)


def _spec_knobs(block: str, cls: type, yaml_prefix: str) -> dict[str, str]:
    return {f"{block}.{key}": f"{yaml_prefix}.{key}" for key, _ in leaves(cls)}


#: docs/nat.md design knob -> its YAML key (``network_g.*`` for the networks, ``train.*`` / ``datasets.*`` for
#: training; the optimiser knobs of ``nat2.train`` map to BasicSR's own keys so that they are not duplicated).
NAT_KNOB_LOCATIONS: dict[str, str] = {
    **_spec_knobs("nat2", NAT2Options, "network_g.nat2"),
    **{f"nat2.train.{k}": f"train.nat2.{k}" for k, _ in leaves(NAT2TrainOptions) if not k.startswith("calib_")},
    "nat2.train.lr": "train.optim_g.lr",
    "nat2.train.wd": "train.optim_g.weight_decay",
    "nat2.train.betas": "train.optim_g.betas",
    "nat2.train.warmup": "train.warmup_iter",
    "nat2.train.steps": "train.total_iter",
    "nat2.train.ema": "train.ema_decay",
    "nat2.train.batch": "datasets.train.total_batch_size",
    **_spec_knobs("nat3", NAT3Options, "network_g.nat3"),
    "nat3.mask.train_random_r_max": "train.nat3.train_random_r_max",
    "nat3.lambda_mfm": "train.nat3.lambda_mfm",
}
