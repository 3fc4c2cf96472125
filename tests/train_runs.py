"""Helpers for the tests that run real trainings in subprocesses (test_distributed.py, test_resume.py).

Every run goes through the repo-root launcher ``basicsr/train.py`` (or ``torchrun`` on it) on the CPU with
``OMP_NUM_THREADS=1``; experiments are written under ``<root>/experiments/<name>`` where ``root`` is the
repository (the launcher's fixed root), so callers remove them with :func:`remove_experiment`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "basicsr" / "train.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")

# A launcher that saves as usual but, right after the checkpoint of iteration PAUSE_AT is written, creates
# MARKER and sleeps: the test then kills it with SIGKILL from outside (a real crash, at a known point).
_PAUSING_LAUNCHER = textwrap.dedent(
    """
    import os, runpy, sys, time
    launcher = {launcher!r}
    pause_at, marker = int(os.environ["GLARE_TEST_PAUSE_AT"]), os.environ["GLARE_TEST_MARKER"]
    sys.argv = [launcher] + sys.argv[1:]
    ns = runpy.run_path(launcher, run_name="glare_nat_launcher")
    ns["_bootstrap"]()
    import basicsr.train as bt
    build = bt.build_model

    def build_model(opt):
        model = build(opt)
        save = model.save

        def save_then_pause(epoch, current_iter):
            save(epoch, current_iter)
            if current_iter == pause_at:
                open(marker, "w").close()
                time.sleep(3600)

        model.save = save_then_pause
        return model

    bt.build_model = build_model
    bt.train_pipeline(ns["ROOT"])
    """
)


def make_demo(out: Path, n_train: int, n_test: int = 2, size: str = "32x48") -> Path:
    """Synthetic LOL-v1 tree from ``scripts/make_demo_lol.py`` (deterministic)."""
    cmd = [sys.executable, "scripts/make_demo_lol.py", "--out", str(out), "--size", size]
    cmd += ["--n-train", str(n_train), "--n-test", str(n_test)]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True)
    return out


def demo_options(demo_root: Path, name: str, holdout: int = 2) -> dict:
    """``options/demo/train_baseline_rrdbnet.yml`` pointed at ``demo_root``, with ``holdout`` validation pairs.

    ``num_gpu: 0``: these runs are CPU runs (gloo, bit-exact comparisons) on any machine.
    """
    opt = yaml.safe_load((REPO_ROOT / "options/demo/train_baseline_rrdbnet.yml").read_text())
    opt["name"] = name
    opt["num_gpu"] = 0
    for key in ("train", "val"):
        opt["datasets"][key]["dataroot"] = str(demo_root)
        opt["datasets"][key]["holdout"]["count"] = holdout
    return opt


def write_yaml(opt: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_training(opt_file: Path, *args: str, nproc: int = 1, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``basicsr/train.py -opt opt_file args`` (``nproc > 1``: under torchrun with ``--launcher pytorch``)."""
    if nproc == 1:
        cmd = [sys.executable, str(LAUNCHER), "-opt", str(opt_file), *args]
    else:
        cmd = [str(TORCHRUN), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
        cmd += [str(LAUNCHER), "-opt", str(opt_file), "--launcher", "pytorch", *args]
    return _popen(cmd, _env(env))


def _popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` with stdout + stderr going to an unnamed temporary file (a pipe could fill up and block)."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)  # type: ignore[attr-defined]
    return proc.log.read()  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for ``proc``; its output, or an AssertionError with the output's tail when it failed."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out = output(proc)
    assert proc.returncode == 0, f"training failed (rc {proc.returncode}):\n{out[-4000:]}"
    return out


class KilledRun:
    """A training that is SIGKILLed from outside right after the checkpoint of iteration ``pause_at`` is written.

    ``start`` returns at once (several can run side by side); :meth:`kill_after_checkpoint` waits for the
    checkpoint, kills the process with SIGKILL and checks that it died of it.
    """

    def __init__(self, opt_file: Path, pause_at: int, marker: Path, *args: str) -> None:
        script = marker.with_suffix(".py")
        script.write_text(_PAUSING_LAUNCHER.format(launcher=str(LAUNCHER)))
        self.pause_at, self.marker = pause_at, marker
        env = _env({"GLARE_TEST_PAUSE_AT": str(pause_at), "GLARE_TEST_MARKER": str(marker)})
        self.proc = _popen([sys.executable, str(script), "-opt", str(opt_file), *args], env)

    def kill_after_checkpoint(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if self.proc.poll() is not None:
                out = output(self.proc)[-4000:]
                raise AssertionError(f"training ended before iteration {self.pause_at}:\n{out}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no checkpoint at iteration {self.pause_at} within {timeout} s")
            time.sleep(0.05)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL


def experiment(name: str) -> Path:
    return REPO_ROOT / "experiments" / name


def remove_experiment(*names: str) -> None:
    """Remove ``experiments/<name>*`` (including ``_archived_`` copies BasicSR makes on a rerun)."""
    for name in names:
        for p in (REPO_ROOT / "experiments").glob(f"{name}*"):
            shutil.rmtree(p, ignore_errors=True)


def load_params(path: Path, keys: Sequence[str] = ("params",)) -> dict[str, torch.Tensor]:
    """``{f'{key}.{name}': tensor}`` for each ``key`` of a BasicSR checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{k}.{n}": t for k in keys for n, t in ckpt[k].items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical tensors (same keys, dtypes and values), else a message with the worst difference."""
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)}/{len(a)} tensors differ; max abs diff {max_abs_diff(a, b):.3e}"
