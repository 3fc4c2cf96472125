"""BasicSR model methods that write and read checkpoints, shared by ``GLAREBaseModel`` and, through the launcher
patches (:func:`glare_nat_models.launcher.patch_basicsr`), by stock BasicSR models such as ``SRModel``.

* ``save_network`` / ``save_training_state``: stock file names and layout (``net_g_<iter>.pth`` =
  ``{'params': ..., 'params_ema': ...}``, ``<iter>.state``), written atomically with
  :func:`glare_nat_models.checkpoint.atomic_torch_save` on rank 0, retried ``_save_retries`` times and then raised
  (stock ignored a failed write). The training state additionally holds ``rng_states`` (exact resume,
  :mod:`glare_nat_models.exact_resume`) and, when fp16 is on, the GradScaler states (``scalers``).
* ``load_network``: strict by default, with a readable report (:func:`glare_nat_models.checkpoint.load_network_file`).
* ``resume_training``: stock, plus the GradScaler states.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from os import path as osp
from typing import Any

from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only
from torch import nn

from glare_nat_models.checkpoint import LoadReport, atomic_torch_save, load_network_file
from glare_nat_models.rng_states import capture_rng_states

__all__ = ["CheckpointMethods", "training_state", "save_with_retry"]

SAVE_RETRIES = 3
SAVE_RETRY_DELAY = 1.0  # seconds between retries of a failed checkpoint write


def training_state(model: Any, epoch: int, current_iter: int) -> dict[str, Any]:
    """The stock ``<iter>.state`` content (epoch, iter, optimizer and scheduler states) plus ``rng_states`` and, for
    models with GradScalers (``_scalers``), their states under ``scalers``."""
    state: dict[str, Any] = {
        "epoch": epoch,
        "iter": current_iter,
        "optimizers": [o.state_dict() for o in model.optimizers],
        "schedulers": [s.state_dict() for s in model.schedulers],
        "rng_states": capture_rng_states(),  # exact resume
    }
    scalers = getattr(model, "_scalers", None)
    if scalers:
        state["scalers"] = {k: s.state_dict() for k, s in scalers.items()}
    return state


def save_with_retry(
    obj: Any,
    save_path: str,
    retries: int = SAVE_RETRIES,
    delay: float = SAVE_RETRY_DELAY,
    logger: logging.Logger | None = None,
) -> None:
    """:func:`~glare_nat_models.checkpoint.atomic_torch_save`, retried; raises ``OSError`` naming ``save_path`` after
    ``retries`` failed attempts (the previous file, if any, is untouched)."""
    logger = logger or get_root_logger()
    for attempt in range(1, retries + 1):
        try:
            atomic_torch_save(obj, save_path)
            return
        except Exception as e:  # noqa: BLE001 - retried, then re-raised
            logger.warning(f"Saving {save_path} failed ({e}); attempt {attempt}/{retries}")
            if attempt == retries:
                raise OSError(f"cannot save {save_path} after {attempt} attempts: {e}") from e
            time.sleep(delay)


def _save(model: Any, obj: Any, save_path: str) -> None:
    """:func:`save_with_retry` with the model's retry policy (the defaults for stock models)."""
    retries = getattr(model, "_save_retries", SAVE_RETRIES)
    save_with_retry(obj, save_path, retries, getattr(model, "_save_retry_delay", SAVE_RETRY_DELAY))


class CheckpointMethods:
    """Mixin (before ``SRModel`` / ``BaseModel`` in the bases) with BasicSR's checkpoint method names."""

    _save_retries = SAVE_RETRIES
    _save_retry_delay = SAVE_RETRY_DELAY

    @master_only
    def save_network(self, net: nn.Module | list, net_label: str, current_iter: int, param_key: Any = "params") -> None:
        """Stock file name and layout, written atomically; a write that still fails after retries raises."""
        if current_iter == -1:
            current_iter = "latest"
        save_path = osp.join(self.opt["path"]["models"], f"{net_label}_{current_iter}.pth")
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError("save_network: the lengths of net and param_key differ")
        save_dict = {}
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict(
                ((k[7:] if k.startswith("module.") else k), v.detach().cpu()) for k, v in state_dict.items()
            )
        _save(self, save_dict, save_path)

    @master_only
    def save_training_state(self, epoch: int, current_iter: int) -> None:
        """Stock ``<iter>.state`` + RNG states (+ GradScaler states when fp16 is on), written atomically."""
        if current_iter == -1:
            return
        save_path = osp.join(self.opt["path"]["training_states"], f"{current_iter}.state")
        _save(self, training_state(self, epoch, current_iter), save_path)

    def resume_training(self, resume_state: dict) -> None:
        """Stock optimizer / scheduler states, then the GradScaler states (``scalers``) if any."""
        super().resume_training(resume_state)  # type: ignore[misc]
        for name, sd in (resume_state.get("scalers") or {}).items():
            scaler = self._scaler(name)
            if scaler is not None:
                scaler.load_state_dict(sd)

    def load_network(
        self,
        net: nn.Module,
        load_path: str,
        strict: bool = True,
        param_key: str | None = "params",
        prefixes: Any = None,
        drop_prefixes: Any = (),
    ) -> LoadReport:
        """Strict by default: a readable report of missing / unexpected / mismatched keys, raised or logged.

        ``param_key`` ``None`` reads a bare state dict. Unreadable files raise ``CheckpointError`` naming the file.
        ``prefixes`` restricts the expected keys of ``net`` (e.g. ``('RRDB.', 'flowUpsamplerNet.')``);
        ``drop_prefixes`` removes documented unused keys from the file first.
        """
        logger = get_root_logger()
        net = self.get_bare_model(net)
        logger.info(f"Loading {type(net).__name__} from {load_path}, param key [{param_key}], strict={strict}.")
        return load_network_file(
            net, load_path, param_key, strict, prefixes=prefixes, drop_prefixes=drop_prefixes, logger=logger
        )
