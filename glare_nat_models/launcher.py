"""What the launchers ``basicsr/train.py`` and ``basicsr/test.py`` do before BasicSR's stock pipelines run.

:func:`prepare_launch` normalises the command line, reads the option file once, checks its inputs
(:func:`glare_nat_models.preflight.preflight`) and applies :func:`patch_basicsr`. Nothing in site-packages is edited;
the patches (user-facing summary: ``docs/compat.md``) are:

* ``--opt`` (Restormer / Retinexformer habit) -> ``-opt``; ``--local-rank`` (``torch.distributed.launch`` since
  torch 2.0) -> ``--local_rank`` (:func:`normalise_argv`);
* ``basicsr.train.load_resume_state`` (CPU-safe, auto-resume under the launcher's root),
  ``create_train_val_dataloader`` (total batch, epochs from the loader, exact resume) and ``build_model`` (every
  rank's RNG states in distributed saves): :mod:`glare_nat_models.exact_resume`;
* ``init_dist`` (backend from the option file, CPU-safe) and ``BaseModel.model_to_device`` (DDP on CPU):
  :mod:`glare_nat_models.distributed`;
* ``BaseModel.save_network`` / ``save_training_state``: atomic, retried writes with RNG states
  (:mod:`glare_nat_models.model_checkpoints`, shared with ``GLAREBaseModel``);
* ``BaseModel.validation`` leaves the global RNG streams as it found them (:func:`~glare_nat_models.rng_states.
  rng_neutral`: validation draws a DataLoader base seed from the torch RNG), so a run resumed after a checkpoint
  followed by a validation continues with the same random numbers as the uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

import yaml

from glare_nat_models.distributed import init_dist, model_to_device, set_launch_options
from glare_nat_models.exact_resume import load_resume_state, wrap_build_model, wrap_create_train_val_dataloader
from glare_nat_models.model_checkpoints import CheckpointMethods
from glare_nat_models.preflight import preflight
from glare_nat_models.rng_states import rng_neutral

__all__ = ["normalise_argv", "read_option_file", "patch_basicsr", "prepare_launch", "finish_launch"]


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


def read_option_file(argv: list[str]) -> tuple[str | None, dict]:
    """``(path, options)`` of the option file named by ``-opt`` in ``argv`` (parsed as BasicSR parses it), or
    ``(None, {})`` when ``argv`` names no readable file (BasicSR then reports that itself)."""
    from basicsr.utils.options import ordered_yaml

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-opt")
    args, _ = parser.parse_known_args(argv[1:])
    if not args.opt or not os.path.isfile(args.opt):
        return None, {}
    with open(args.opt, encoding="utf-8") as f:
        return args.opt, yaml.load(f, Loader=ordered_yaml()[0]) or {}


def patch_basicsr(opt: Mapping | None = None) -> None:
    """Apply the run-time patches to BasicSR (idempotent); ``opt``: the launch's option file, for ``init_dist``."""
    import basicsr.utils.dist_util
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel

    import basicsr.train

    if opt is not None:
        set_launch_options(opt)
    basicsr.train.load_resume_state = load_resume_state
    if not hasattr(basicsr.train.create_train_val_dataloader, "__wrapped__"):
        basicsr.train.create_train_val_dataloader = wrap_create_train_val_dataloader(
            basicsr.train.create_train_val_dataloader
        )
    if not hasattr(basicsr.train.build_model, "__wrapped__"):
        basicsr.train.build_model = wrap_build_model(basicsr.train.build_model)
    basicsr.utils.options.init_dist = init_dist  # parse_options looks the name up in its own module
    basicsr.utils.dist_util.init_dist = init_dist
    BaseModel.model_to_device = model_to_device
    BaseModel.save_network = CheckpointMethods.save_network
    BaseModel.save_training_state = CheckpointMethods.save_training_state
    if not hasattr(BaseModel.validation, "__wrapped__"):
        BaseModel.validation = rng_neutral(BaseModel.validation)


def prepare_launch(argv: list[str]) -> list[str]:
    """Everything a launcher does before BasicSR parses ``argv``; returns the normalised ``argv``.

    Exits (status 2, one message) when the option file misses inputs, before any output or folder.
    """
    argv = normalise_argv(argv)
    opt_file, opt = read_option_file(argv)
    if opt_file is not None:
        preflight(opt_file, opt, auto_resume="--auto_resume" in argv)
    patch_basicsr(opt)
    return argv


def finish_launch() -> None:
    """What a launcher does after BasicSR's loop. Nothing in a single-process run; in a distributed run: wait for
    every rank (rank 0 still saves and validates after the others are done), destroy the process group, flush the
    logs and end the process with status 0 without interpreter finalisation.

    Why the last step: a ``DistributedDataParallel`` wrapper keeps the C++ gloo process group (and its worker
    threads) alive after ``destroy_process_group``, with no Python object left to release it. The threads are then
    torn down during interpreter finalisation, which now and then aborts the process ("terminate called without an
    active exception", SIGABRT, no Python frame), and torchrun reports the whole run as failed although training
    and saving finished. Everything a run writes is on disk at this point (checkpoints are written atomically and
    BasicSR closes its TensorBoard writer), so skipping finalisation loses nothing.
    """
    import logging
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)
