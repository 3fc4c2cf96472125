"""How many samples a training step takes and how many epochs a run needs (applied by the launcher patches).

* ``datasets.train.total_batch_size``: the recipe's batch per optimiser step, split into BasicSR's
  ``batch_size_per_gpu`` for the processes (or DataParallel GPUs) of this launch (:func:`resolve_total_batch`).
* Epochs counted from the batches the train loader really yields, so a run ends at ``total_iter``
  (:func:`epochs_from_loader`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["batch_divisor", "resolve_total_batch", "epochs_from_loader"]


def batch_divisor(opt: dict) -> int:
    """Into how many per-process (or per-GPU) batches BasicSR splits one step: the world size under a distributed
    launch, else the DataParallel GPU count (BasicSR's loader multiplies ``batch_size_per_gpu`` by it)."""
    if opt.get("dist"):
        return int(opt.get("world_size", 1))
    return max(1, int(opt.get("num_gpu") or 0))


def resolve_total_batch(opt: dict) -> str | None:
    """Turn ``datasets.train.total_batch_size`` (the recipe's batch per optimiser step) into BasicSR's
    ``batch_size_per_gpu`` for this launch; the one-line summary to log, or None when the option is not used.

    Raises ValueError naming the key when both batch keys are given or the divisor does not divide the total.
    """
    train = (opt.get("datasets") or {}).get("train")
    if not train or train.get("total_batch_size") is None:
        return None
    total, parts = int(train["total_batch_size"]), batch_divisor(opt)
    if train.get("batch_size_per_gpu") is not None:
        raise ValueError(
            "glare-nat: datasets.train gives both total_batch_size and batch_size_per_gpu; keep one "
            "(total_batch_size: the batch per optimiser step, split over the processes)"
        )
    if total % parts:
        raise ValueError(
            f"glare-nat: datasets.train.total_batch_size {total} cannot be split over {parts} processes/GPUs; "
            f"launch a number of processes that divides it (or change the total)"
        )
    train["batch_size_per_gpu"] = total // parts
    lr = {k: v.get("lr") for k, v in (opt.get("train") or {}).items() if k.startswith("optim_") and isinstance(v, dict)}
    lrs = ", ".join(f"{k} lr {v:g}" for k, v in lr.items() if v is not None)
    return f"total batch {total} = {parts} x {total // parts} per process/GPU; {lrs or 'no optimiser'}"


def epochs_from_loader(result: tuple, logger: Any) -> tuple:
    """Count epochs from the batches the train loader really yields, so training ends at ``total_iter``.

    Stock BasicSR counts ``ceil(images * enlarge / (batch * world))`` iterations per epoch, but its loader drops
    the last partial batch of every process (``drop_last=True``), so with a data set that is not a multiple of
    ``batch * world`` it plans too few epochs and the loop ends early (20 pairs, batch 3: iteration 96 of 100;
    two processes: 70 of 100). ``len(train_loader)`` is the number of batches one process gets per epoch.
    """
    train_loader, sampler, val_loaders, _, total_iters = result
    if train_loader is None:
        return result
    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise ValueError(
            f"glare-nat: the train loader yields no batch: datasets.train.batch_size_per_gpu "
            f"({train_loader.batch_size}) exceeds the {len(train_loader.sampler)} samples one process gets per epoch"
        )
    total_epochs = math.ceil(total_iters / per_epoch)
    logger.info(f"glare-nat: {per_epoch} iterations per epoch (last partial batch dropped), {total_epochs} epochs.")
    return (train_loader, sampler, val_loaders, total_epochs, total_iters)
