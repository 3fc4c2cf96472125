"""Exact resume and the epoch plan of BasicSR's stock training loop (applied by :mod:`glare_nat_models.launcher`).

* :func:`load_resume_state` replaces ``basicsr.train.load_resume_state``: the stock one maps storages to CUDA and
  searches the cwd; this one is CPU-safe and auto-resume looks in ``opt['path']['training_states']``.
* :func:`wrap_create_train_val_dataloader`: ``datasets.train.total_batch_size`` is split over the processes and the
  epochs are counted from ``len(train_loader)`` (:mod:`glare_nat_models.train_schedule`), so training ends at
  ``total_iter``. On resume the stock loop restarts the saved epoch from its first batch, so a run resumed from a
  mid-epoch (or end-of-epoch) checkpoint sees different data than an uninterrupted run. Here the epoch is recomputed
  from the iteration and the batches the interrupted run already consumed in that epoch are skipped; the random
  number generator states saved in the training state (``rng_states``) are restored right before the first resumed
  batch is drawn (mid-epoch checkpoint), or right before the DataLoader of the resumed epoch draws its base seed
  (checkpoint at an epoch end), which is where the uninterrupted run stands. Exact (bit-identical on CPU) with
  ``num_worker_per_gpu: 0``; with loader workers, the workers' RNG restart from their seeds (stock
  ``worker_init_fn``) and only the sample order is exact.
* :func:`wrap_build_model`: in distributed runs ``model.save`` first gathers every rank's RNG states (a collective;
  the state file itself is written by rank 0 only), and each rank restores its own on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from glare_nat_models.checkpoint import read_checkpoint
from glare_nat_models.rng_states import all_ranks_captured, restore_rng_states, rng_states_for_this_rank
from glare_nat_models.train_schedule import epochs_from_loader, resolve_total_batch

__all__ = ["load_resume_state", "ResumeSampler", "wrap_create_train_val_dataloader", "wrap_build_model"]

_RESUME_STATE: dict | None = None  # the state returned by load_resume_state, for the dataloader wrapper


def load_resume_state(opt: dict) -> dict | None:
    """CPU-safe replacement of ``basicsr.train.load_resume_state``.

        Auto-resume looks in ``opt['path']['training_states']`` (under the launcher's root, not the cwd);
        storages are mapped to CPU unless CUDA is available and ``num_gpu != 0``. A missing, truncated or corrupt state
    file raises :class:`~glare_nat_models.checkpoint.CheckpointError` naming it.
    """
    from basicsr.utils import check_resume

    resume_state_path = None
    if opt.get("auto_resume"):
        state_path = opt["path"].get("training_states")
        if state_path and os.path.isdir(state_path):
            states = [f for f in os.listdir(state_path) if f.endswith(".state")]
            if states:
                latest = max(float(f[: -len(".state")]) for f in states)
                resume_state_path = os.path.join(state_path, f"{latest:.0f}.state")
                opt["path"]["resume_state"] = resume_state_path
    else:
        resume_state_path = opt["path"].get("resume_state")

    if resume_state_path is None:
        return None
    map_location: Any = "cpu"
    if torch.cuda.is_available() and opt.get("num_gpu", 0) != 0:
        device_id = torch.cuda.current_device()
        map_location = lambda storage, loc: storage.cuda(device_id)  # noqa: E731  (stock BasicSR's mapping)
    # the training state pickles numpy RNG states: trusted files written by this run only
    resume_state = read_checkpoint(resume_state_path, weights_only=False, map_location=map_location)
    check_resume(opt, resume_state["iter"])
    global _RESUME_STATE
    _RESUME_STATE = resume_state
    return resume_state


class ResumeSampler:
    """Wraps the train sampler for the first resumed epoch: skips consumed indices, restores RNG states.

    Delegates ``set_epoch``/``len`` to the wrapped sampler, so the stock loop is unaware of it. The RNG states
    saved with the checkpoint are restored once, where the uninterrupted run stood when it saved:

    * mid-epoch (``skip > 0``): when the first resumed batch is requested, i.e. after the new DataLoader
      iterator drew its base seed (the uninterrupted run drew it at the start of the epoch);
    * at an epoch end (``skip == 0``): in ``set_epoch``, i.e. before the DataLoader iterator of the next epoch
      draws its base seed, as the uninterrupted run does.
    """

    def __init__(self, sampler: Any, skip: int, rng_states: dict | None) -> None:
        self.sampler = sampler
        self.skip = skip
        self.rng_states = rng_states

    def _restore(self) -> None:
        if self.rng_states is not None:
            restore_rng_states(self.rng_states)
            self.rng_states = None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        if self.skip == 0:
            self._restore()

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        self._restore()
        for _ in range(self.skip):
            next(it, None)
        self.skip = 0
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sampler, name)


def wrap_create_train_val_dataloader(original: Callable) -> Callable:
    """``basicsr.train.create_train_val_dataloader`` with the total-batch split, the epoch count from the loader
    and, on resume, the :class:`ResumeSampler` (returned as the sampler, so the loop calls its ``set_epoch``)."""

    def create_train_val_dataloader(opt: dict, logger: logging.Logger) -> tuple:
        summary = resolve_total_batch(opt)
        if summary:
            logger.info(f"glare-nat: {summary}")
        result = original(opt, logger)
        train_loader = result[0]
        result = epochs_from_loader(result, logger)
        state = _RESUME_STATE
        if state is None or train_loader is None or getattr(train_loader, "batch_sampler", None) is None:
            return result
        iters_per_epoch = len(train_loader)
        done = int(state["iter"])
        state["epoch"] = done // iters_per_epoch  # the epoch in which iteration done + 1 falls
        consumed = (done % iters_per_epoch) * train_loader.batch_sampler.batch_size
        batch_sampler = train_loader.batch_sampler
        saved = state.get("rng_states")
        rng = rng_states_for_this_rank(saved) if saved else None
        sampler = ResumeSampler(batch_sampler.sampler, consumed, rng)
        batch_sampler.sampler = sampler
        logger.info(
            f"glare-nat exact resume: iteration {done} -> epoch {state['epoch']}, skipping {consumed} samples "
            f"already seen in that epoch; RNG states {'restored' if rng else 'not saved'}."
        )
        return (train_loader, sampler, *result[2:])  # the loop calls set_epoch on the returned sampler

    create_train_val_dataloader.__wrapped__ = original  # type: ignore[attr-defined]
    return create_train_val_dataloader


def wrap_build_model(original: Callable) -> Callable:
    """``basicsr.train.build_model`` whose models, in distributed runs, gather every rank's RNG states in
    ``model.save`` (on every rank, before rank 0 writes the training state)."""

    def build_model(opt: dict) -> Any:
        model = original(opt)
        if opt.get("dist"):
            save = model.save

            def save_with_rank_rng_states(epoch: int, current_iter: int) -> None:
                with all_ranks_captured():
                    save(epoch, current_iter)

            model.save = save_with_rank_rng_states
        return model

    build_model.__wrapped__ = original  # type: ignore[attr-defined]
    return build_model
