"""The global random-number streams of a training process: capture, restore, gather over ranks.

Exact resume (:mod:`glare_nat_models.exact_resume`) stores :func:`capture_rng_states` in every training state
(``rng_states``) and restores them where the uninterrupted run stood. Validation leaves the streams as it found them
(:func:`rng_neutral`), so a resumed run continues with the same random numbers. In a distributed run ``model.save``
first gathers every rank's streams (:func:`all_ranks_captured`, a collective) so that each rank restores its own.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "rank_and_world",
    "local_rng_states",
    "capture_rng_states",
    "restore_rng_states",
    "rng_states_for_this_rank",
    "gather_rng_states",
    "all_ranks_captured",
    "rng_neutral",
]

_RANK_RNG_STATES: list[dict] | None = None  # every rank's RNG states while a distributed model.save runs


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_rng_states() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and initialised CUDA) RNG states."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002  (BasicSR draws from the legacy global RNG)
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def capture_rng_states() -> dict[str, Any]:
    """Snapshot of every global RNG a training step may draw from (python, numpy, torch CPU and CUDA).

    Inside :func:`all_ranks_captured` (a distributed ``model.save``) the result also holds ``ranks``: the states of
    every rank, indexed by rank (gathered before rank 0 writes the training state).
    """
    states = local_rng_states()
    if _RANK_RNG_STATES is not None:
        states["ranks"] = _RANK_RNG_STATES
    return states


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` needs tuples; a state that went through a checkpoint may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` for this process (missing entries are left alone)."""
    if "python" in states:
        random.setstate(_as_python_state(states["python"]))
    if "numpy" in states:
        np.random.set_state(states["numpy"])  # noqa: NPY002
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def rng_states_for_this_rank(states: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of a saved ``rng_states`` that belongs to this process, or None (with a warning) if absent.

    A state saved by a distributed run holds ``ranks``; it is used when the world size is unchanged. Without
    it (single-process save, or another world size) only rank 0 restores the top-level states.
    """
    rank, world = rank_and_world()
    ranks = states.get("ranks")
    if ranks is not None and len(ranks) == world:
        return ranks[rank]
    if rank == 0:
        return {k: v for k, v in states.items() if k != "ranks"}
    logging.getLogger("basicsr").warning(
        f"glare-nat exact resume: no saved RNG states for rank {rank} (saved world size "
        f"{len(ranks) if ranks is not None else 1}, now {world}); its random streams restart from the seed."
    )
    return None


def gather_rng_states() -> list[dict] | None:
    """Every rank's RNG states, indexed by rank (a collective call), or None when not distributed."""
    _, world = rank_and_world()
    if world == 1:
        return None
    out: list[Any] = [None] * world
    dist.all_gather_object(out, local_rng_states())
    return out


@contextlib.contextmanager
def all_ranks_captured() -> Iterator[None]:
    """Within the block :func:`capture_rng_states` also returns every rank's states (gathered on entry: call it on
    every rank)."""
    global _RANK_RNG_STATES
    _RANK_RNG_STATES = gather_rng_states()
    try:
        yield
    finally:
        _RANK_RNG_STATES = None


def rng_neutral(method: Callable) -> Callable:
    """Wrap a model method (``validation``) so that the global RNG states are restored after it."""

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        states = local_rng_states()
        try:
            return method(self, *args, **kwargs)
        finally:
            restore_rng_states(states)

    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    wrapper.__name__ = method.__name__
    wrapper.__doc__ = f"{method.__doc__ or ''}\n\n(glare-nat: the global RNG states are restored afterwards.)"
    return wrapper
