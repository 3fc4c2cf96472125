"""Checkpoint file helpers shared by the models and the scripts.

* :func:`atomic_torch_save` writes ``<path>.tmp`` and renames it over ``<path>`` with ``os.replace``, so a crash
  or a failing write never leaves a half-written checkpoint and never destroys the previous one.
* :func:`read_checkpoint` loads a file on the CPU and turns truncated / corrupt / missing files into a
  :class:`CheckpointError` that names the file.
* :func:`select_state_dict` picks the sub-dict of a BasicSR checkpoint (``param_key``; ``None`` = bare state dict,
  the layout of the official GLARE ``net_G.pth``) and strips ``module.`` prefixes.
* :func:`compare_state_dicts` / :class:`LoadReport` list missing, unexpected and shape-mismatched keys;
  :func:`load_state_dict_checked` loads strictly (raising :class:`StrictLoadError` with the report) or, when asked,
  non-strictly (skipping mismatched tensors and logging the report).
* :func:`load_official` / :func:`from_official` load the official GLARE weights (``vqgan.pkl``, ``net_G.pth``, a
  Stage-II checkpoint, or their converted ``{'params': ...}`` files) strictly into the networks (which read no files).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import nn

from glare_nat_arch.glare_arch import GLARENet
from glare_nat_arch.vqgan_arch import GLAREVQGAN, VQGAN_UNUSED_PREFIXES

__all__ = [
    "CheckpointError",
    "StrictLoadError",
    "LoadReport",
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_text",
    "read_checkpoint",
    "select_state_dict",
    "compare_state_dicts",
    "load_state_dict_checked",
    "load_network_file",
    "read_state_dict",
    "load_official",
    "from_official",
]

_MAX_LISTED = 20  # keys listed per category in a report; the rest are counted


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used (missing, truncated, corrupt, wrong layout). The message names the file."""


class StrictLoadError(RuntimeError):
    """A state dict does not match the network under strict loading. ``report`` holds the details."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills ``<path>.tmp``, which is flushed, fsynced and renamed over ``path``
    (``os.replace``: atomic on POSIX and Windows).

    On any failure the temporary file is removed, the exception propagates and a previous ``path`` is untouched.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True, map_location: Any = "cpu") -> Any:
    """Load a checkpoint (on the CPU unless ``map_location`` says otherwise); any unreadable file raises
    :class:`CheckpointError` naming ``path``.

    ``weights_only=True`` (torch's safe default) accepts BasicSR checkpoints, training states and the official GLARE
    weights (plain dicts of tensors). Files pickling other objects need ``weights_only=False`` (trusted files only).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty (0 bytes; interrupted save?): {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(
                f"checkpoint {path} pickles objects other than tensors/dicts and cannot be loaded with "
                f"weights_only=True; convert it once to {{'params': state_dict}} (trusted files only). Details: {e}"
            ) from e
        raise CheckpointError(f"checkpoint file is corrupt or truncated: {path} ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - any decoding failure means an unusable file (EOFError, IndexError...)
        raise CheckpointError(f"checkpoint file is corrupt or truncated: {path} ({type(e).__name__}: {e})") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(ckpt: Any, param_key: str | None, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Return the state dict stored in ``ckpt`` under ``param_key`` (``None``: ``ckpt`` itself is the state dict).

    As in stock BasicSR, a missing ``params_ema`` falls back to ``params`` (a run without EMA); any other missing
    key is an error. ``module.`` prefixes (DataParallel) are stripped.

    Raises:
        CheckpointError: the key is absent, or the selected object is not a mapping of tensors; the message names
            ``path`` and lists the available top-level keys.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    if param_key is None:
        sd = ckpt
        if not _is_state_dict(sd):
            keys = sorted(k for k in ckpt if not torch.is_tensor(ckpt[k]))[:10]
            raise CheckpointError(
                f"checkpoint {path}: param_key is ~ (bare state dict) but the file holds non-tensor entries "
                f"{keys}; set param_key_* to one of them (e.g. 'params')"
            )
    else:
        key = param_key
        if key == "params_ema" and key not in ckpt and "params" in ckpt:
            logging.getLogger("basicsr").info(f"Loading {path}: [{param_key}] does not exist, use [params].")
            key = "params"
        if key not in ckpt:
            hint = " (it looks like a bare state dict: set param_key_* to ~)" if _is_state_dict(ckpt) else ""
            raise CheckpointError(
                f"checkpoint {path} has no key '{param_key}'; top-level keys: {sorted(map(str, ckpt))[:10]}{hint}"
            )
        sd = ckpt[key]
        if not _is_state_dict(sd):
            raise CheckpointError(f"checkpoint {path}: entry '{key}' is not a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


@dataclass
class LoadReport:
    """Differences between a network's state dict and a loaded one.

    ``mismatched`` entries are ``(key, expected_shape, loaded_shape)``.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        """Readable multi-line report (at most ``_MAX_LISTED`` keys per category, then a count)."""
        if self.ok:
            return "all keys match"
        lines: list[str] = []

        def _section(title: str, items: list[str]) -> None:
            if not items:
                return
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {s}" for s in items[:_MAX_LISTED])
            if len(items) > _MAX_LISTED:
                lines.append(f"  ... and {len(items) - _MAX_LISTED} more")

        _section("missing keys (in the network, not in the file)", self.missing)
        _section("unexpected keys (in the file, not in the network)", self.unexpected)
        _section(
            "shape-mismatched keys (network vs file)",
            [f"{k}: {list(a)} vs {list(b)}" for k, a, b in self.mismatched],
        )
        return "\n".join(lines)


def compare_state_dicts(
    expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor], prefixes: Iterable[str] | None = None
) -> LoadReport:
    """Compare a network's state dict with a loaded one.

    Args:
        expected: the network's ``state_dict()``.
        loaded: the state dict read from a file.
        prefixes: if given, only network keys starting with one of them are expected; loaded keys outside them
            are reported as unexpected (used to load a Stage-II checkpoint into the Stage-III network).
    """
    prefixes = tuple(prefixes) if prefixes is not None else None
    exp = {k: v for k, v in expected.items() if prefixes is None or k.startswith(prefixes)}
    report = LoadReport()
    report.missing = sorted(k for k in exp if k not in loaded)
    report.unexpected = sorted(k for k in loaded if k not in exp)
    report.mismatched = [
        (k, tuple(exp[k].shape), tuple(loaded[k].shape))
        for k in sorted(exp)
        if k in loaded and tuple(exp[k].shape) != tuple(loaded[k].shape)
    ]
    return report


def load_state_dict_checked(
    net: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    source: str = "<state dict>",
    prefixes: Iterable[str] | None = None,
    logger: logging.Logger | None = None,
    hint: str = "set strict_load_*: false to load the matching part anyway",
) -> LoadReport:
    """Load ``state_dict`` into ``net`` after comparing keys and shapes.

    Strict: any missing / unexpected / mismatched key raises :class:`StrictLoadError` (message: ``source``, the
    network class and the report) and nothing is loaded. Non-strict: the report is logged as a warning, mismatched
    tensors are skipped, the rest is loaded. With ``prefixes``, only those parts of ``net`` are expected (and
    loaded); the rest of the network is left as it is, on purpose, in both modes. ``hint`` ends a strict error.
    """
    logger = logger or logging.getLogger("basicsr")
    report = compare_state_dicts(net.state_dict(), state_dict, prefixes)
    scope = f" (only {', '.join(prefixes)} expected)" if prefixes is not None else ""
    if not report.ok:
        msg = f"{source} does not match {type(net).__name__}{scope}:\n{report.format()}"
        if strict:
            raise StrictLoadError(msg + (f"\n({hint})" if hint else ""), report)
        logger.warning("Non-strict load: " + msg)
    bad = set(report.unexpected) | {k for k, _, _ in report.mismatched}
    filtered = {k: v for k, v in state_dict.items() if k not in bad}
    net.load_state_dict(filtered, strict=False)
    return report


def load_network_file(
    net: nn.Module,
    path: str | os.PathLike,
    param_key: str | None = "params",
    strict: bool = True,
    prefixes: Iterable[str] | None = None,
    drop_prefixes: Iterable[str] = (),
    logger: logging.Logger | None = None,
) -> LoadReport:
    """Read ``path``, select ``param_key`` and load it into ``net`` with :func:`load_state_dict_checked`.

    Keys starting with one of ``drop_prefixes`` (documented unused entries, e.g. the official ``vqgan.pkl``'s
    ``conv_semantic.*``) are removed first and the count is logged.
    """
    path = os.fspath(path)
    logger = logger or logging.getLogger("basicsr")
    sd = select_state_dict(read_checkpoint(path), param_key, path)
    drop_prefixes = tuple(drop_prefixes)
    if drop_prefixes:
        dropped = [k for k in sd if k.startswith(drop_prefixes)]
        if dropped:
            sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefixes)}
            logger.info(f"{path}: dropped {len(dropped)} unused keys under {', '.join(drop_prefixes)}")
    source = f"checkpoint {path} [{param_key}]"
    return load_state_dict_checked(net, sd, strict=strict, source=source, prefixes=prefixes, logger=logger)


def read_state_dict(src: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """A flat state dict from a file or a mapping, unwrapping a BasicSR ``{'params': ...}`` container.

    Returns ``(state_dict, source_name)``. Unreadable files and payloads that are not dicts of tensors raise
    :class:`CheckpointError` naming the file.
    """
    name = "<state dict>"
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        src = read_checkpoint(name)
    wrapped = isinstance(src, Mapping) and isinstance(src.get("params"), Mapping)
    return select_state_dict(src, "params" if wrapped else None, name), name


#: what ``GLARENet`` loads from a Stage-II checkpoint (``load_official(..., stage2_only=True)``)
STAGE2_PREFIXES = ("RRDB.", "flowUpsamplerNet.")


def load_official(
    net: nn.Module, src: str | os.PathLike | Mapping[str, torch.Tensor], stage2_only: bool = False
) -> list[str]:
    """Load official GLARE weights (or a converted ``{'params': ...}`` file) into ``net`` with ``strict=True``.

    * :class:`~glare_nat_arch.vqgan_arch.GLAREVQGAN` (``vqgan.pkl``): only keys under
      :data:`~glare_nat_arch.vqgan_arch.VQGAN_UNUSED_PREFIXES` are dropped first;
    * :class:`~glare_nat_arch.glare_arch.GLAREFlowNet` (a Stage-II checkpoint) / ``GLARENet`` (``net_G.pth``): every
      key must match; with ``stage2_only`` a Stage-II checkpoint is loaded strictly into ``GLARENet``'s ``RRDB`` and
      ``flowUpsamplerNet`` and ``deformable_decoder`` is left untouched (the official Stage-III initialisation).

    Any other extra, missing or shape-mismatched key raises :class:`StrictLoadError` naming the source and every
    offending key; nothing is loaded then. Returns the dropped keys.
    """
    if stage2_only and not isinstance(net, GLARENet):
        raise TypeError(f"load_official: stage2_only needs a GLARENet, got {type(net).__name__}")
    state_dict, name = read_state_dict(src)
    dropped = [k for k in state_dict if k.startswith(VQGAN_UNUSED_PREFIXES)] if isinstance(net, GLAREVQGAN) else []
    for k in dropped:
        del state_dict[k]
    prefixes = STAGE2_PREFIXES if stage2_only else None
    load_state_dict_checked(net, state_dict, strict=True, source=name, prefixes=prefixes, hint="")
    return dropped


def from_official(
    cls: type[nn.Module], src: str | os.PathLike | Mapping[str, torch.Tensor], **kwargs: Any
) -> nn.Module:
    """``cls(**kwargs)`` (official sizes by default) with :func:`load_official` ``src``."""
    net = cls(**kwargs)
    load_official(net, src)
    return net
