"""Distributed launch of BasicSR's stock loop on CPUs as well as GPUs (applied by :mod:`glare_nat_models.launcher`).

* :func:`init_dist` replaces ``basicsr.utils.options.init_dist`` (the name ``parse_options`` calls): the backend is
  ``dist_params.backend`` of the option file (both launchers; stock honours it only for SLURM), else NCCL when the
  run uses CUDA and gloo otherwise; the CUDA device (``LOCAL_RANK`` / ``SLURM_LOCALID``) is set only when CUDA is
  used (stock: ``rank % device_count()``, a ``ZeroDivisionError`` on CPU). For SLURM an existing ``MASTER_ADDR`` is
  kept (stock always calls ``scontrol``). The option file is the one the launcher read
  (:func:`set_launch_options`); it is not read again.
* :func:`model_to_device` replaces ``BaseModel.model_to_device``: ``DistributedDataParallel(device_ids=None)`` on
  the CPU (stock passes ``[torch.cuda.current_device()]``, which fails without CUDA).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["set_launch_options", "dist_backend", "init_dist", "model_to_device"]

_LAUNCH_OPTIONS: Mapping = {}  # the option file of this launch, as the launcher read it


def set_launch_options(opt: Mapping | None) -> None:
    """Remember the launch's option file (read once by the launcher) for :func:`init_dist`."""
    global _LAUNCH_OPTIONS
    _LAUNCH_OPTIONS = opt or {}


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


def dist_backend(opt: Mapping, backend: str | None = None, cuda_available: bool | None = None) -> tuple[str, bool]:
    """``(backend, use_cuda)`` for a distributed run of the options ``opt``.

    ``use_cuda``: CUDA is available and ``opt['num_gpu'] != 0`` (``auto`` counts as CUDA). Backend: ``backend``, else
    ``opt['dist_params']['backend']``, else ``nccl`` with CUDA and ``gloo`` without. NCCL without CUDA raises.
    """
    if cuda_available is None:
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

    The backend is chosen by :func:`dist_backend` from the launch's option file (:func:`set_launch_options`); the
    CUDA device (``LOCAL_RANK`` modulo the visible devices) is set only when the run uses CUDA.
    """
    opt = _LAUNCH_OPTIONS
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


def model_to_device(self: Any, net: nn.Module) -> nn.Module:
    """``BaseModel.model_to_device`` with ``DistributedDataParallel(device_ids=None)`` for CPU models."""
    net = net.to(self.device)
    if self.opt["dist"]:
        device_ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        find_unused = self.opt.get("find_unused_parameters", False)
        net = DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=find_unused)
    elif self.opt["num_gpu"] > 1:
        net = DataParallel(net)
    return net
