"""Kill-and-resume: a training killed with SIGKILL and resumed ends with bit-identical weights (CPU).

Two models: stock ``SRModel`` + RRDBNet (``options/demo``), and glare-nat ``GLAREFlowModel`` (Stage II) with EMA
and dropout, so that its steps draw from the torch RNG as well as from python's. Same seed, random crops and
flips, 6 training pairs, batch 2 (3 iterations per epoch), checkpoints and validation every 2 iterations, 7
iterations in all:

* reference: one uninterrupted run;
* crash 1: SIGKILL right after the checkpoint of iteration 2 (mid-epoch 0), resumed with ``--auto_resume``;
* crash 2: that resumed run SIGKILLed after the checkpoint of iteration 6 (end of epoch 1), resumed with an
  explicit ``path.resume_state``; it ends at iteration 7.

The final ``net_g_latest.pth`` (``params``, and ``params_ema`` for the EMA model) must equal the reference bit for
bit. What makes it exact (``glare_nat_models.exact_resume``, ``glare_nat_models.rng_states``): the resumed epoch
skips the samples already consumed, the RNG states saved in the training state are restored where the uninterrupted
run stood, and validation does not consume random numbers of the training streams. The control
(``test_resume_without_rng_states_differs``) shows the comparison is sensitive: the same resume from a state whose
``rng_states`` were removed gives other weights.
"""

from __future__ import annotations

import subprocess
import uuid
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml
from basicsr.archs import build_network

import glare_nat_models  # noqa: F401  (registers GLAREVQGAN for the tiny checkpoint)
from tests.train_runs import (
    KilledRun,
    assert_identical,
    demo_options,
    experiment,
    finish,
    load_params,
    make_demo,
    max_abs_diff,
    remove_experiment,
    start_training,
    write_yaml,
)

DATA = Path(__file__).resolve().parent / "data"
TOTAL_ITER = 7
SCHEDULE = {"print_freq": 1, "save_checkpoint_freq": 2, "use_tb_logger": False}


def _stock_options(demo: Path, name: str) -> dict:
    opt = demo_options(demo, name)
    opt["datasets"]["train"].update(gt_size=16, use_hflip=True, batch_size_per_gpu=2)
    opt["train"]["total_iter"] = TOTAL_ITER
    opt["val"]["val_freq"] = 2
    opt["logger"] = dict(SCHEDULE)
    return opt


def _flow_options(demo: Path, name: str, vq_path: Path) -> dict:
    opt = yaml.safe_load((DATA / "tiny_stage2_flow.yml").read_text())
    stock = _stock_options(demo, name)
    opt.update(name=name, num_gpu=0, manual_seed=10, datasets=stock["datasets"], logger=stock["logger"])
    opt["path"]["pretrain_network_vq"] = str(vq_path)
    opt["network_g"]["dropout"] = 0.1  # training draws from the torch RNG too (the stock model only from python's)
    opt["train"].update(total_iter=TOTAL_ITER, ema_decay=0.9)
    opt["val"].update(val_freq=2, save_img=False)
    return opt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    demo = make_demo(tmp / "demo", n_train=8)  # 6 training pairs, 2 held out for validation
    torch.manual_seed(0)
    vq_opt = yaml.safe_load((DATA / "tiny_stage2_flow.yml").read_text())["network_vq"]
    torch.save({"params": build_network(deepcopy(vq_opt)).state_dict()}, tmp / "vq.pth")
    tag = uuid.uuid4().hex[:8]
    names = [f"pytest_resume_{kind}_{run}_{tag}" for kind in ("stock", "flow") for run in ("ref", "crash")]
    try:
        yield tmp, demo, tmp / "vq.pth", tag
    finally:
        remove_experiment(*names)


def _options(kind: str, demo: Path, vq: Path, name: str) -> dict:
    return _stock_options(demo, name) if kind == "stock" else _flow_options(demo, name, vq)


@pytest.fixture(scope="module")
def chains(setup):
    """Both models' reference runs and crash/resume chains, plus the control; each phase runs in parallel.

    Returns, per model: the reference's final weights (read before the control overwrites the stock one), the
    crash chain's experiment name, and the control's final weights (stock model only).
    """
    tmp, demo, vq, tag = setup
    kinds = ("stock", "flow")
    refs = {k: write_yaml(_options(k, demo, vq, f"pytest_resume_{k}_ref_{tag}"), tmp / f"{k}_ref.yml") for k in kinds}
    crash = {k: write_yaml(_options(k, demo, vq, f"pytest_resume_{k}_crash_{tag}"), tmp / f"{k}.yml") for k in kinds}
    name = {k: yaml.safe_load(crash[k].read_text())["name"] for k in kinds}
    ref_dir = {k: experiment(yaml.safe_load(refs[k].read_text())["name"]) for k in kinds}
    keys = {"stock": ("params",), "flow": ("params", "params_ema")}
    started = []  # every process, killed in the end if a failure left it running

    def launch(opt_file: Path) -> subprocess.Popen:
        started.append(start_training(opt_file))
        return started[-1]

    try:
        procs = [launch(refs[k]) for k in kinds]
        # crash 1: SIGKILL after the mid-epoch checkpoint of iteration 2
        runs = [KilledRun(crash[k], 2, tmp / f"{k}_kill2") for k in kinds]
        started += [r.proc for r in runs]
        for run in runs:
            run.kill_after_checkpoint()
        # crash 2: auto-resume from 2, SIGKILL after the epoch-end checkpoint of iteration 6
        runs = [KilledRun(crash[k], 6, tmp / f"{k}_kill6", "--auto_resume") for k in kinds]
        started += [r.proc for r in runs]
        for run in runs:
            run.kill_after_checkpoint()
        for p in procs:
            finish(p)
        expected = {k: load_params(ref_dir[k] / "models" / "net_g_latest.pth", keys[k]) for k in kinds}
        # explicit resume from 6 to the end, and the control: the stock reference resumed from 4 without RNG states
        procs = []
        for k in kinds:
            opt = yaml.safe_load(crash[k].read_text())
            opt["path"]["resume_state"] = str(experiment(name[k]) / "training_states" / "6.state")
            procs.append(launch(write_yaml(opt, tmp / f"{k}_resume6.yml")))
        state_file = ref_dir["stock"] / "training_states" / "4.state"
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        del state["rng_states"]
        torch.save(state, state_file)
        opt = yaml.safe_load(refs["stock"].read_text())
        opt["path"]["resume_state"] = str(state_file)
        procs.append(launch(write_yaml(opt, tmp / "stock_no_rng.yml")))
        for p in procs:
            finish(p)
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
    control = load_params(ref_dir["stock"] / "models" / "net_g_latest.pth")
    return {"expected": expected, "keys": keys, "crash": name, "ref_dir": ref_dir, "control": control}


@pytest.mark.parametrize("kind", ["stock", "flow"])
def test_killed_and_resumed_training_ends_bit_identical(chains, kind):
    crash = experiment(chains["crash"][kind])
    keys, expected = chains["keys"][kind], chains["expected"][kind]
    assert_identical(load_params(crash / "models" / "net_g_latest.pth", keys), expected)

    logs = "".join(p.read_text() for p in sorted(crash.glob("train_*.log")))
    assert "Resuming training from epoch: 0, iter: 2" in logs and "skipping 4 samples" in logs  # mid-epoch
    assert "Resuming training from epoch: 2, iter: 6" in logs and "skipping 0 samples" in logs  # epoch end
    assert logs.count("RNG states restored") == 2
    assert sorted(p.name for p in (crash / "training_states").iterdir()) == ["2.state", "4.state", "6.state"]
    # the run trained past the last checkpoint: the weights at 6 differ from the final ones
    assert max_abs_diff(load_params(crash / "models" / "net_g_6.pth", keys), expected) > 0


def test_resume_without_rng_states_differs(chains):
    """Control: the stock model resumed from a mid-epoch state whose ``rng_states`` were removed diverges."""
    log = max(chains["ref_dir"]["stock"].glob("train_*.log"), key=lambda p: p.stat().st_mtime).read_text()
    assert "iter: 4" in log and "skipping 2 samples" in log and "RNG states not saved" in log
    assert max_abs_diff(chains["control"], chains["expected"]["stock"]) > 1e-4
