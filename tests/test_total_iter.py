"""Training ends at ``total_iter`` whatever the data set size, batch and number of processes; the total batch of a
recipe (``datasets.train.total_batch_size``) is split over the processes.

Stock BasicSR plans ``ceil(20 / 3) = 7`` iterations per epoch for 20 pairs at batch 3, but its loader drops the
last partial batch (6 batches per epoch), so with ``total_iter: 100`` it ran 16 epochs x 6 = 96 iterations; with
two processes (10 samples each, 3 batches per epoch, 4 planned) it stopped at 78. The launcher counts epochs from
the loader (``glare_nat_models.train_schedule``, applied by ``glare_nat_models.exact_resume`` through the launcher).
"""

from __future__ import annotations

import re
import uuid

import pytest

from tests.train_runs import demo_options, experiment, finish, make_demo, remove_experiment, start_training, write_yaml

TOTAL_ITER = 100


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two processes (torchrun, gloo), 20 training pairs, total batch 3 x processes, 100 iterations."""
    tmp = tmp_path_factory.mktemp("total_iter")
    demo = make_demo(tmp / "demo", n_train=22, size="16x16")  # 20 training pairs, 2 held out
    tag = uuid.uuid4().hex[:8]
    names = {n: f"pytest_total_iter_{n}proc_{tag}" for n in (1, 2)}
    procs = {}
    for nproc, name in names.items():
        opt = demo_options(demo, name, holdout=2)
        opt["datasets"]["train"].pop("batch_size_per_gpu")
        opt["datasets"]["train"].update(total_batch_size=3 * nproc, gt_size=16)  # 3 per process
        opt["network_g"].update(num_feat=4, num_grow_ch=4)
        opt["train"]["total_iter"] = TOTAL_ITER
        opt["val"]["val_freq"] = 10**6
        opt["logger"] = {"print_freq": 1, "save_checkpoint_freq": TOTAL_ITER, "use_tb_logger": False}
        procs[nproc] = start_training(write_yaml(opt, tmp / f"{name}.yml"), nproc=nproc)
    try:
        yield {n: (names[n], finish(p)) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        remove_experiment(*names.values())


@pytest.mark.parametrize("nproc", [1, 2])
def test_training_ends_at_total_iter(runs, nproc):
    name, _ = runs[nproc]
    root = experiment(name)
    log = next(root.glob("train_*.log")).read_text()
    iters = [int(m.replace(",", "")) for m in re.findall(r"epoch:\s*\d+, iter:\s*([\d,]+)", log)]
    assert max(iters) == TOTAL_ITER, f"last logged iteration {max(iters)}"
    assert (root / "models" / f"net_g_{TOTAL_ITER}.pth").is_file()
    assert (root / "training_states" / f"{TOTAL_ITER}.state").is_file()
    per_epoch = 6 if nproc == 1 else 3  # floor(20 / 3), floor(10 / 3): the batches the loader yields
    assert f"{per_epoch} iterations per epoch" in log


@pytest.mark.parametrize("nproc", [1, 2])
def test_total_batch_is_split_over_the_processes(runs, nproc):
    name, out = runs[nproc]
    log = next(experiment(name).glob("train_*.log")).read_text()
    assert f"total batch {3 * nproc} = {nproc} x 3 per process/GPU; optim_g lr 0.001" in log


def test_total_batch_errors_name_the_key():
    from glare_nat_models.train_schedule import resolve_total_batch

    def opt(world: int, **train) -> dict:
        return {"dist": world > 1, "world_size": world, "num_gpu": 0, "datasets": {"train": train}, "train": {}}

    assert resolve_total_batch(opt(1, batch_size_per_gpu=4)) is None  # stock key: stock meaning
    ok = opt(2, total_batch_size=4)
    assert (
        resolve_total_batch(ok).startswith("total batch 4 = 2 x 2")
        and ok["datasets"]["train"]["batch_size_per_gpu"] == 2
    )
    with pytest.raises(ValueError, match="total_batch_size 4 cannot be split over 3"):
        resolve_total_batch(opt(3, total_batch_size=4))
    with pytest.raises(ValueError, match="both total_batch_size and batch_size_per_gpu"):
        resolve_total_batch(opt(1, total_batch_size=4, batch_size_per_gpu=4))
    dp = {"dist": False, "world_size": 1, "num_gpu": 2, "datasets": {"train": {"total_batch_size": 4}}, "train": {}}
    resolve_total_batch(dp)  # DataParallel: BasicSR's loader multiplies the per-GPU batch by the GPU count
    assert dp["datasets"]["train"]["batch_size_per_gpu"] == 2


@pytest.mark.parametrize("stage", ["train_stage2_flow.yml", "train_stage3_aft.yml"])
def test_official_profiles_keep_the_official_total_batch_on_any_process_count(stage):
    """options/official/: all 485 LOL-v1 pairs (no held-out pairs, no validation on the test set) and the official
    total batch per step (stage II 4, stage III 2) on 1, 2 or 4 processes; a count that does not divide it is
    refused. Stage III starts from the official-profile Stage-II run's last checkpoint."""
    import copy

    import yaml

    from glare_nat_models.train_schedule import resolve_total_batch
    from tests.train_runs import REPO_ROOT

    opt = yaml.safe_load((REPO_ROOT / "options" / "official" / stage).read_text())
    total = {"train_stage2_flow.yml": 4, "train_stage3_aft.yml": 2}[stage]
    train = opt["datasets"]["train"]
    assert "holdout" not in train and "batch_size_per_gpu" not in train and set(opt["datasets"]) == {"train"}
    assert "val" not in opt
    for world in (1, 2, 4):
        if total % world:
            with pytest.raises(ValueError, match="cannot be split"):
                resolve_total_batch(dict(copy.deepcopy(opt), dist=world > 1, world_size=world, num_gpu=0))
            continue
        o = dict(copy.deepcopy(opt), dist=world > 1, world_size=world, num_gpu=0)
        assert resolve_total_batch(o).startswith(f"total batch {total} = {world} x {total // world}")
        assert o["datasets"]["train"]["batch_size_per_gpu"] * world == total
    if stage == "train_stage3_aft.yml":
        stage2 = yaml.safe_load((REPO_ROOT / "options" / "official" / "train_stage2_flow.yml").read_text())
        assert opt["path"]["pretrain_network_stage2"] == f"experiments/{stage2['name']}/models/net_g_latest.pth"
        assert opt["network_g"]["per_sample_rescale"] is True
