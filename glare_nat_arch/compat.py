"""Compatibility shims that let stock BasicSR 1.4.2 run on current PyTorch / torchvision / SciPy.

Nothing in site-packages is edited. The import-time aliases below run when any glare-nat package is
imported, which must happen before the first ``import basicsr`` in the process. Run-time patches of
BasicSR functions are applied by :func:`patch_basicsr` (called by the launchers).

Shims (user-facing summary: ``docs/compat.md``):

1. ``torchvision.transforms.functional_tensor`` was removed in torchvision 0.17; basicsr imports
   ``rgb_to_grayscale`` from it at ``import basicsr`` time. We register an alias module.
2. ``scipy.ndimage.filters`` (used by basicsr's NIQE) is deprecated; alias it to ``scipy.ndimage`` if
   it ever disappears.
3. ``distutils.version.LooseVersion`` (used by basicsr's arch_util) is aliased to
   ``packaging.version.Version`` if ``distutils`` is unavailable.
4. ``basicsr.train.load_resume_state`` maps storages to CUDA and searches the cwd; replaced by a
   CPU-safe version that uses ``opt['path']['training_states']``.
5. ``--opt`` on the command line is rewritten to the stock ``-opt``.
6. Exact resume: the stock loop restarts the saved epoch from its first batch, so a run resumed from a
   mid-epoch (or end-of-epoch) checkpoint sees different data than an uninterrupted run.
   ``basicsr.train.create_train_val_dataloader`` is wrapped so that, on resume, the epoch is recomputed
   from the iteration and the batches the interrupted run already consumed in that epoch are skipped;
   random-number-generator states saved in the training state (``rng_states``) are restored right before
   the first resumed batch is drawn (mid-epoch checkpoint), or right before the DataLoader of the resumed
   epoch draws its base seed (checkpoint at an epoch end), which is where the uninterrupted run stands.
   ``rng_states`` are written by the glare-nat models and, through shim 9, by stock BasicSR models.
   Exact (bit-identical on CPU) with ``num_worker_per_gpu: 0``; with loader workers, the workers' RNG
   restart from their seeds (stock ``worker_init_fn``) and only the sample order is exact.
7. Distributed launch on CPU: ``basicsr.utils.options.init_dist`` (the name ``parse_options`` calls) is
   replaced by :func:`init_dist`: backend from ``dist_params.backend`` of the option file (both launchers;
   stock honours it only for SLURM), else NCCL when the run uses CUDA and gloo otherwise; the CUDA device
   (``LOCAL_RANK`` / ``SLURM_LOCALID``) is set only when CUDA is used (stock: ``rank % device_count()``,
   a ``ZeroDivisionError`` on CPU). For SLURM an existing ``MASTER_ADDR`` is kept (stock always calls
   ``scontrol``).
8. ``BaseModel.model_to_device`` wraps with ``DistributedDataParallel(device_ids=None)`` on the CPU
   (stock passes ``[torch.cuda.current_device()]``, which fails without CUDA).
9. Stock ``BaseModel.save_training_state`` (used by ``SRModel``) additionally stores ``rng_states`` and
   writes atomically (``.tmp`` + ``os.replace``); stock silently ignored a failed write.
10. ``BaseModel.validation`` leaves the global RNG streams as it found them (validation draws a DataLoader
    base seed from the torch RNG), so a run resumed after a checkpoint followed by a validation continues
    with the same random numbers as the uninterrupted run.
11. Distributed runs: ``basicsr.train.build_model`` is wrapped so that ``model.save`` first gathers every
    rank's RNG states (a collective; the state file itself is written by rank 0 only), and each rank
    restores its own on resume.
12. ``--local-rank`` (passed by ``python -m torch.distributed.launch`` since torch 2.0) is rewritten to the
    stock ``--local_rank``.
13. Training ends at ``total_iter``: the stock loop plans its epochs with ``ceil(images * enlarge / (batch *
    world))`` iterations each, but its loader drops every process's last partial batch, so it stops early
    whenever the data set is not a multiple of ``batch * world``. The wrapped
    ``create_train_val_dataloader`` recounts the epochs from ``len(train_loader)``.
14. ``datasets.train.total_batch_size``: the recipe's batch per optimiser step, whatever the number of processes;
    it is split into BasicSR's ``batch_size_per_gpu`` (world size under a distributed launch, GPU count under
    DataParallel), refusing a split that does not divide it. Plain ``batch_size_per_gpu`` keeps its stock meaning.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import subprocess
import sys
import types
from collections.abc import Iterator
from typing import Any

from glare_nat_arch.train_schedule import epochs_from_loader, resolve_total_batch

__all__ = [
    "apply_import_shims",
    "patch_basicsr",
    "normalise_argv",
    "load_resume_state",
    "capture_rng_states",
    "restore_rng_states",
    "training_state",
    "rng_states_for_this_rank",
    "dist_backend",
    "init_dist",
    "model_to_device",
]

_FUNCTIONAL_TENSOR = "torchvision.transforms.functional_tensor"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def alias_functional_tensor() -> bool:
    """Register ``torchvision.transforms.functional_tensor`` if torchvision no longer ships it.

    Returns True when the alias was installed by this call.
    """
    if sys.modules.get(_FUNCTIONAL_TENSOR) is not None or _importable(_FUNCTIONAL_TENSOR):
        return False
    from torchvision.transforms import functional as F

    mod = types.ModuleType(_FUNCTIONAL_TENSOR)
    mod.rgb_to_grayscale = F.rgb_to_grayscale  # type: ignore[attr-defined]
    mod.__doc__ = "glare-nat alias: torchvision removed this module in 0.17 (basicsr 1.4.2 imports it)."
    sys.modules[_FUNCTIONAL_TENSOR] = mod
    return True


def alias_scipy_filters() -> bool:
    """Alias ``scipy.ndimage.filters`` to ``scipy.ndimage`` once SciPy removes the old module."""
    name = "scipy.ndimage.filters"
    if sys.modules.get(name) is not None or _importable(name):
        return False
    import scipy.ndimage

    sys.modules[name] = scipy.ndimage
    return True


def alias_loose_version() -> bool:
    """Provide ``distutils.version.LooseVersion`` (basicsr arch_util) when distutils is missing."""
    if _importable("distutils.version"):
        return False
    from packaging.version import Version

    distutils = sys.modules.get("distutils") or types.ModuleType("distutils")
    version = types.ModuleType("distutils.version")
    version.LooseVersion = Version  # type: ignore[attr-defined]
    distutils.version = version  # type: ignore[attr-defined]
    sys.modules["distutils"] = distutils
    sys.modules["distutils.version"] = version
    return True


def apply_import_shims() -> None:
    """Install every import-time alias (idempotent)."""
    alias_functional_tensor()
    alias_scipy_filters()
    alias_loose_version()


def load_resume_state(opt: dict):
    """CPU-safe replacement of ``basicsr.train.load_resume_state``.

    Auto-resume looks in ``opt['path']['training_states']`` (under the launcher's root, not the cwd);
    storages are mapped to CPU unless CUDA is available and ``num_gpu != 0``.
    """
    import os

    import torch
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
    use_cuda = torch.cuda.is_available() and opt.get("num_gpu", 0) != 0
    if use_cuda:
        device_id = torch.cuda.current_device()
        resume_state = torch.load(
            resume_state_path, map_location=lambda storage, loc: storage.cuda(device_id), weights_only=False
        )
    else:
        resume_state = torch.load(resume_state_path, map_location="cpu", weights_only=False)
    check_resume(opt, resume_state["iter"])
    global _RESUME_STATE
    _RESUME_STATE = resume_state
    return resume_state


_RESUME_STATE: dict | None = None  # the state returned by load_resume_state, for the dataloader wrapper
_RANK_RNG_STATES: list[dict] | None = None  # every rank's RNG states while a distributed model.save runs


def _dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _local_rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

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

    Inside a distributed ``model.save`` (shim 11) the result also holds ``ranks``: the states of every rank,
    indexed by rank (gathered before rank 0 writes the training state).
    """
    states = _local_rng_states()
    if _RANK_RNG_STATES is not None:
        states["ranks"] = _RANK_RNG_STATES
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_states` for this process (missing entries are left alone)."""
    import numpy as np
    import torch

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
    rank, world = _dist_info()
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


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` needs tuples; a state that went through a checkpoint may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class _ResumeSampler:
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


def _wrap_create_train_val_dataloader(original):
    def create_train_val_dataloader(opt, logger):
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
        sampler = _ResumeSampler(batch_sampler.sampler, consumed, rng)
        batch_sampler.sampler = sampler
        logger.info(
            f"glare-nat exact resume: iteration {done} -> epoch {state['epoch']}, skipping {consumed} samples "
            f"already seen in that epoch; RNG states {'restored' if rng else 'not saved'}."
        )
        return (train_loader, sampler, *result[2:])  # the loop calls set_epoch on the returned sampler

    create_train_val_dataloader.__wrapped__ = original  # type: ignore[attr-defined]
    return create_train_val_dataloader


# ---------------------------------------------------------------- distributed training (shims 7, 8, 11)
def _options_from_argv(argv: list[str]) -> dict:
    """The option file named by ``-opt`` in ``argv`` (parsed like BasicSR does), or {} when there is none."""
    import argparse

    import yaml
    from basicsr.utils.options import ordered_yaml

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-opt")
    args, _ = parser.parse_known_args(argv[1:])
    if not args.opt or not os.path.isfile(args.opt):
        return {}
    with open(args.opt, encoding="utf-8") as f:
        return yaml.load(f, Loader=ordered_yaml()[0]) or {}


def _slurm_environment(port: int | None) -> int:
    """Set ``MASTER_ADDR/PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` from SLURM's variables.

    Returns the local rank (``SLURM_LOCALID``).
    """
    if "MASTER_ADDR" not in os.environ:
        node_list = os.environ["SLURM_NODELIST"]
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", node_list], capture_output=True, text=True)
            addr = out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else ""
        except OSError:
            addr = ""
        if not addr:
            raise RuntimeError(
                f"--launcher slurm: cannot resolve the first host of SLURM_NODELIST={node_list!r} with "
                "`scontrol show hostnames`; export MASTER_ADDR in the job script"
            )
        os.environ["MASTER_ADDR"] = addr
    if port is not None:
        os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    local_rank = os.environ.get("SLURM_LOCALID", os.environ["SLURM_PROCID"])
    os.environ["LOCAL_RANK"] = local_rank
    return int(local_rank)


def dist_backend(opt: dict, backend: str | None = None, cuda_available: bool | None = None) -> tuple[str, bool]:
    """``(backend, use_cuda)`` for a distributed run of the options ``opt``.

    ``use_cuda``: CUDA is available and ``opt['num_gpu'] != 0`` (``auto`` counts as CUDA). Backend: ``backend``, else
    ``opt['dist_params']['backend']``, else ``nccl`` with CUDA and ``gloo`` without. NCCL without CUDA raises.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    use_cuda = cuda_available and opt.get("num_gpu", "auto") != 0
    backend = backend or (opt.get("dist_params") or {}).get("backend") or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise RuntimeError(
            "dist_params.backend is nccl, but this run uses no CUDA device (num_gpu 0 or no GPU): use gloo"
        )
    return backend, use_cuda


def init_dist(launcher: str, backend: str | None = None, port: int | None = None) -> str:
    """CPU-aware replacement of ``basicsr.utils.dist_util.init_dist`` (same arguments). Returns the backend.

    The backend is chosen by :func:`dist_backend` from the ``-opt`` file of ``sys.argv``; the CUDA device
    (``LOCAL_RANK`` modulo the visible devices) is set only when the run uses CUDA.
    """
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    opt = _options_from_argv(sys.argv)
    backend, use_cuda = dist_backend(opt, backend)
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method("spawn")
    if launcher == "pytorch":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    elif launcher == "slurm":
        local_rank = _slurm_environment(port if port is not None else (opt.get("dist_params") or {}).get("port"))
    else:
        raise ValueError(f"Invalid launcher type: {launcher}")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"glare-nat: {launcher} launch, {backend} backend, rank {rank} of {world}", flush=True)
    return backend


def model_to_device(self, net):
    """``BaseModel.model_to_device`` with ``DistributedDataParallel(device_ids=None)`` for CPU models."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    net = net.to(self.device)
    if self.opt["dist"]:
        device_ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        find_unused = self.opt.get("find_unused_parameters", False)
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt["num_gpu"] > 1:
        net = DataParallel(net)
    return net


def _gather_rng_states() -> list[dict] | None:
    """Every rank's RNG states, indexed by rank (a collective call), or None when not distributed."""
    import torch.distributed as dist

    _, world = _dist_info()
    if world == 1:
        return None
    out: list[Any] = [None] * world
    dist.all_gather_object(out, _local_rng_states())
    return out


def _wrap_build_model(original):
    def build_model(opt):
        model = original(opt)
        if opt.get("dist"):
            save = model.save

            def save_with_rank_rng_states(epoch, current_iter):
                global _RANK_RNG_STATES
                _RANK_RNG_STATES = _gather_rng_states()  # on every rank, before rank 0 writes the state
                try:
                    save(epoch, current_iter)
                finally:
                    _RANK_RNG_STATES = None

            model.save = save_with_rank_rng_states
        return model

    build_model.__wrapped__ = original  # type: ignore[attr-defined]
    return build_model


# ---------------------------------------------------------------- stock model methods (shims 9, 10)
def training_state(model: Any, epoch: int, current_iter: int) -> dict[str, Any]:
    """The stock ``<iter>.state`` content (epoch, iter, optimizer and scheduler states) plus ``rng_states``."""
    return {
        "epoch": epoch,
        "iter": current_iter,
        "optimizers": [o.state_dict() for o in model.optimizers],
        "schedulers": [s.state_dict() for s in model.schedulers],
        "rng_states": capture_rng_states(),  # exact resume (shim 6)
    }


def save_training_state(self, epoch: int, current_iter: int) -> None:
    """Stock ``BaseModel.save_training_state`` plus ``rng_states``, written atomically (rank 0 only)."""
    import torch

    if current_iter == -1:
        return
    state = training_state(self, epoch, current_iter)
    path = os.path.join(self.opt["path"]["training_states"], f"{current_iter}.state")
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rng_neutral(method):
    def validation(self, *args, **kwargs):
        states = _local_rng_states()
        try:
            return method(self, *args, **kwargs)
        finally:
            restore_rng_states(states)

    validation.__wrapped__ = method  # type: ignore[attr-defined]
    validation.__doc__ = f"{method.__doc__ or ''}\n\n(glare-nat: the global RNG states are restored afterwards.)"
    return validation


def patch_basicsr() -> None:
    """Apply run-time patches to already-imported BasicSR modules (idempotent)."""
    import basicsr.utils.dist_util
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.dist_util import master_only

    import basicsr.train

    basicsr.train.load_resume_state = load_resume_state
    current = basicsr.train.create_train_val_dataloader
    if not hasattr(current, "__wrapped__"):
        basicsr.train.create_train_val_dataloader = _wrap_create_train_val_dataloader(current)
    if not hasattr(basicsr.train.build_model, "__wrapped__"):
        basicsr.train.build_model = _wrap_build_model(basicsr.train.build_model)
    basicsr.utils.options.init_dist = init_dist  # parse_options looks the name up in its own module
    basicsr.utils.dist_util.init_dist = init_dist
    BaseModel.model_to_device = model_to_device
    if getattr(BaseModel.save_training_state, "__wrapped__", None) is not save_training_state:
        BaseModel.save_training_state = master_only(save_training_state)
    if not hasattr(BaseModel.validation, "__wrapped__"):
        BaseModel.validation = _rng_neutral(BaseModel.validation)


def normalise_argv(argv: list[str]) -> list[str]:
    """Rewrite ``--opt`` (Restormer/Retinexformer habit) to BasicSR's ``-opt`` and ``--local-rank`` (torch >= 2.0
    ``torch.distributed.launch``) to ``--local_rank``."""
    out = []
    for arg in argv:
        if arg == "--opt":
            out.append("-opt")
        elif arg.startswith("--opt="):
            out.extend(["-opt", arg[len("--opt=") :]])
        elif arg == "--local-rank" or arg.startswith("--local-rank="):
            out.append("--local_rank" + arg[len("--local-rank") :])
        else:
            out.append(arg)
    return out


apply_import_shims()
