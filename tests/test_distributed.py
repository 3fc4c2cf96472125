"""Distributed training through BasicSR's own launcher on the CPU: ``torchrun ... --launcher pytorch`` (gloo).

Comparison with one process (``test_ddp_matches_single_process``): 2 processes x batch 2 against 1 process x
batch 4, on 8 training pairs without random augmentation (full 32x48 images, no flip). ``EnlargedSampler`` draws
one permutation ``p`` of the 8 indices per epoch (seeded by the epoch, identical in every process); rank ``r``
takes ``p[r::2]``, so at every iteration the two ranks together hold ``p[4i:4i+4]``, exactly the single
process's batch. DDP averages the two ranks' gradients of the L1 mean loss, i.e. the gradient of the mean over
the same 4 samples; the network is initialised from the same seed (DDP broadcasts rank 0's weights). The only
difference is the float32 summation order of the gradients; each of the two gradients is ~1e-5 (absolute,
gradients up to ~0.3) away from the float64 gradient. After 4 Adam steps (lr 1e-3) the weights agree to ~1e-7
(measured 1.25e-7); the test allows 1e-6. Training without gradient synchronisation, or on the wrong samples,
gives ~4e-3, and the weights move by ~2e-3 between iterations 2 and 4, so the tolerance cannot hide a real
difference.

Resume under DDP (``test_ddp_resume_is_exact``): with random crops and flips, each rank draws from its own RNG
streams (seed + rank); the training state keeps every rank's streams and each rank restores its own, so a run
resumed from a mid-epoch checkpoint ends bit-identical to the uninterrupted run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from glare_nat_models import distributed, launcher, rng_states
from tests.train_runs import (
    assert_identical,
    demo_options,
    experiment,
    finish,
    free_port,
    load_params,
    make_demo,
    max_abs_diff,
    remove_experiment,
    start_training,
    write_yaml,
)

TOLERANCE = 1e-6  # max |w_ddp - w_single| after 4 iterations (module docstring)


def _options(demo: Path, name: str, batch: int, augment: bool, total_iter: int) -> dict:
    opt = demo_options(demo, name)
    train = opt["datasets"]["train"]
    train.update(batch_size_per_gpu=batch, gt_size=16 if augment else None, use_hflip=augment)
    opt["train"]["total_iter"] = total_iter
    opt["val"]["val_freq"] = 2
    opt["logger"] = {"print_freq": 1, "save_checkpoint_freq": 2, "use_tb_logger": False}
    return opt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three trainings at once: 1 x batch 4 and 2 x batch 2 (no augmentation), 2 x batch 1 (crops, flips)."""
    tmp = tmp_path_factory.mktemp("dist")
    demo = make_demo(tmp / "demo", n_train=10)  # 8 training pairs, 2 held out for validation
    tag = uuid.uuid4().hex[:8]
    names = {k: f"pytest_dist_{k}_{tag}" for k in ("single", "ddp", "aug")}
    files = {
        "single": write_yaml(_options(demo, names["single"], 4, False, 4), tmp / "single.yml"),
        "ddp": write_yaml(_options(demo, names["ddp"], 2, False, 4), tmp / "ddp.yml"),
        "aug": write_yaml(_options(demo, names["aug"], 1, True, 5), tmp / "aug.yml"),
    }
    procs = {
        "single": start_training(files["single"]),
        "ddp": start_training(files["ddp"], nproc=2),
        "aug": start_training(files["aug"], nproc=2),
    }
    try:
        outputs = {k: finish(p) for k, p in procs.items()}
        yield {"names": names, "files": files, "outputs": outputs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        remove_experiment(*names.values())


def test_ddp_matches_single_process(runs):
    single, ddp = (experiment(runs["names"][k]) for k in ("single", "ddp"))
    out = runs["outputs"]["ddp"]
    assert "pytorch launch, gloo backend, rank 0 of 2" in out and "rank 1 of 2" in out
    w_single = load_params(single / "models" / "net_g_latest.pth")
    w_ddp = load_params(ddp / "models" / "net_g_latest.pth")
    moved = max_abs_diff(w_single, load_params(single / "models" / "net_g_2.pth"))
    assert max_abs_diff(w_single, w_ddp) <= TOLERANCE
    assert moved >= 100 * TOLERANCE  # the comparison is meaningful: training changed the weights

    logs = list(ddp.glob("train_*.log"))
    assert len(logs) == 1  # only rank 0 writes a log
    log = logs[0].read_text()
    assert "World size (gpu number): 2" in log and "iter:       4" in log
    assert "# psnr:" in log  # validation ran (on rank 0) under DDP
    assert sorted(p.name for p in (ddp / "training_states").iterdir()) == ["2.state", "4.state"]


def test_ddp_resume_is_exact(runs, tmp_path):
    """Resume 2 processes from the mid-epoch checkpoint of iteration 2 (``path.resume_state``)."""
    exp = experiment(runs["names"]["aug"])
    state = torch.load(exp / "training_states" / "2.state", map_location="cpu", weights_only=False)
    ranks = state["rng_states"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["python"] != ranks[1]["python"]  # per-rank streams (seed + rank)
    final = load_params(exp / "models" / "net_g_latest.pth")

    opt = yaml.safe_load(runs["files"]["aug"].read_text())
    opt["path"]["resume_state"] = str(exp / "training_states" / "2.state")
    finish(start_training(write_yaml(opt, tmp_path / "resume.yml"), nproc=2))
    log = max(exp.glob("train_*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "Resuming training from epoch: 0, iter: 2" in log and "skipping 2 samples" in log
    assert_identical(load_params(exp / "models" / "net_g_latest.pth"), final)


# ------------------------------------------------------------------ the shims in-process (world size 1)
@pytest.fixture
def one_process_group(monkeypatch, tmp_path):
    """Environment of a 1-process torchrun of a CPU option file; the process group is destroyed afterwards."""
    monkeypatch.setattr(mp, "set_start_method", lambda *a, **k: None)  # keep the pytest process's start method
    monkeypatch.setattr(distributed, "_LAUNCH_OPTIONS", {"num_gpu": 0})  # the launcher's options, read once
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_finish_launch_without_a_process_group_returns():
    assert not dist.is_initialized()
    launcher.finish_launch()  # single-process run: nothing to do, the launcher returns normally


_FINISH_SCRIPT = """
import logging, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from glare_nat_models.launcher import finish_launch

dist.init_process_group("gloo")
net = DistributedDataParallel(torch.nn.Linear(3, 2))
net(torch.randn(4, 3)).sum().backward()
logging.basicConfig(stream=sys.stdout, level=logging.INFO)
logging.getLogger("run").info("trained on rank %d", dist.get_rank())
print("buffered line", end="")
finish_launch()
print("finish_launch returned")
"""


def test_finish_launch_ends_a_ddp_rank_cleanly():
    """In a distributed run ``finish_launch`` tears the group down and ends the process itself: status 0, every
    log line and buffered output written, nothing after it runs (interpreter finalisation with DDP's leaked gloo
    threads could abort: docstring of ``finish_launch``)."""
    import subprocess
    import sys

    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    root = Path(__file__).resolve().parents[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FINISH_SCRIPT],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), PYTHONPATH=str(root)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert f"trained on rank {rank}" in out and out.endswith("buffered line"), out
        assert "finish_launch returned" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU failure of stock basicsr")
def test_stock_init_dist_fails_on_cpu(one_process_group):
    from basicsr.utils.dist_util import _init_dist_pytorch

    with pytest.raises(ZeroDivisionError):
        _init_dist_pytorch("gloo")


def test_init_dist_and_model_to_device_on_cpu(one_process_group):
    from types import SimpleNamespace

    from torch.nn.parallel import DistributedDataParallel

    assert distributed.init_dist("pytorch") == "gloo"  # num_gpu 0, also on a CUDA machine
    model = SimpleNamespace(opt={"dist": True, "num_gpu": 0}, device=torch.device("cpu"))
    net = distributed.model_to_device(model, torch.nn.Linear(3, 2))
    assert isinstance(net, DistributedDataParallel) and net.device_ids is None
    net(torch.ones(4, 3)).sum().backward()  # gradient all-reduce over gloo
    assert net.module.weight.grad is not None
    assert rng_states.gather_rng_states() is None  # world size 1: nothing to gather


def test_backend_choice():
    assert distributed.dist_backend({"num_gpu": "auto"}, cuda_available=True) == ("nccl", True)
    assert distributed.dist_backend({"num_gpu": 1}, cuda_available=True) == ("nccl", True)
    assert distributed.dist_backend({"num_gpu": 0}, cuda_available=True) == ("gloo", False)
    assert distributed.dist_backend({"num_gpu": "auto"}, cuda_available=False) == ("gloo", False)
    assert distributed.dist_backend({"dist_params": {"backend": "gloo"}}, cuda_available=True) == ("gloo", True)
    assert distributed.dist_backend({}, backend="gloo", cuda_available=True) == ("gloo", True)
    with pytest.raises(RuntimeError, match="no CUDA device.*use gloo"):
        distributed.dist_backend({"num_gpu": 0, "dist_params": {"backend": "nccl"}}, cuda_available=True)


def test_init_dist_reads_dist_params_of_the_option_file(one_process_group, tmp_path):
    """Stock ``parse_options`` passes ``dist_params`` only to the SLURM launcher; the patch reads it for both, from the
    option file the launcher read once (``prepare_launch``)."""
    opt_file = write_yaml({"num_gpu": 0, "dist_params": {"backend": "nccl"}}, tmp_path / "x.yml")
    argv = ["train.py", "-opt", str(opt_file), "--launcher", "pytorch"]
    launcher.patch_basicsr(launcher.read_option_file(argv)[1])
    with pytest.raises(RuntimeError, match="no CUDA device.*use gloo"):
        distributed.init_dist("pytorch")
    write_yaml({"num_gpu": 0, "dist_params": {"backend": "gloo"}}, opt_file)
    distributed.set_launch_options(launcher.read_option_file(argv)[1])
    assert distributed.init_dist("pytorch") == "gloo"


def test_init_dist_slurm_environment(one_process_group, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key)
    for key, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_NODELIST", "node[001-002]")
    monkeypatch.setenv("PATH", "")  # no scontrol: without MASTER_ADDR the host cannot be resolved
    with pytest.raises(RuntimeError, match=r"SLURM_NODELIST='node\[001-002\]'.*MASTER_ADDR"):
        distributed.init_dist("slurm")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert distributed.init_dist("slurm", port=free_port()) == "gloo"
    assert dist.get_world_size() == 1
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")


def test_patch_basicsr_installs_distributed_shims():
    import basicsr.utils.options
    from basicsr.models.base_model import BaseModel

    import basicsr.train

    launcher.patch_basicsr()
    launcher.patch_basicsr()  # idempotent
    assert basicsr.utils.options.init_dist is distributed.init_dist
    assert BaseModel.model_to_device is distributed.model_to_device
    assert basicsr.train.build_model.__wrapped__.__module__ == "basicsr.models"
    assert launcher.normalise_argv(["train.py", "--local-rank=1", "--local-rank", "0"]) == [
        "train.py",
        "--local_rank=1",
        "--local_rank",
        "0",
    ]
