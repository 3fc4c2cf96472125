"""``make study``: the proxy-scale study of whether the NATs help GLARE, run end to end on a CPU.

Steps, each an ordinary command printed before it runs (stock BasicSR loops through ``basicsr/train.py`` /
``basicsr/test.py``, the benchmark CLI ``scripts/benchmark_lol.py``):

1. the data set (``scripts/make_study_data.py``): training crops of 12 scikit-image photos, four other photos held
   out whole as the test split;
2. the trainings (``options/study/``): Stage I (VQGAN), a stock BasicSR RRDBNet baseline with about the CPU time of
   Stages I-III, Stage II, Stage III, and per seed (10, 11, 12) NAT-II and Stage III with both NATs;
3. the evaluations on the held-out photos: every model in both metric protocols and NIQE (benchmark), NAT-II's token
   statistics and oracle PSNRs (``basicsr/test.py``, ``nat_val_stats_latest.json``), the decoding rounds T = 2 / 4 / 6
   of one NAT-II model (``--sweep``), the VQGAN's reconstruction and codebook usage;
4. ``results/study/report.md`` + ``results/study/study.json`` (:mod:`study_report`).

Jobs run ``--jobs`` at a time (default 2: one thread each on a 2-core machine) in dependency order; each job's output
goes to ``results/study/logs/<job>.log`` and a line per start / finish (plus a heartbeat every minute) shows progress.
The per-seed option files are written to ``results/study/options/`` from the committed ones. A job that fails stops
the study (running jobs finish) with its log's tail. ``--resume`` skips the jobs an interrupted run finished.

Usage: ``python scripts/run_study.py [--jobs 2] [--resume] [--only-report] [--smoke]``; ``--smoke`` runs every step
for a few iterations (a check of the pipeline, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("datasets/study_lol")
OUT = Path("results/study")
OPT = Path("options/study")
SEEDS = (10, 11, 12)
#: decoding rounds of Table II (network_g.nat2.decode.iters; 4 is the option files' value)
SWEEP = "network_g.nat2.decode.iters=2,4,6"
#: weights of decode.flow_prior measured (0 = off, the option files' value)
FLOW_PRIORS = (0.5, 1.0, 2.0)
#: NAT mechanisms measured from one checkpoint (seed SEEDS[0]): (benchmark folder, test option key, training jobs
#: it needs, --sweep)
MECHANISMS = [
    (
        "mech_revision",
        "test_stage2_nat_s{s}",
        ("train_stage2_nat_s{s}",),
        "network_g.nat2.decode.remask_scope=new_only,all",
    ),
    ("mech_soft_codes", "test_stage3_nat_s{s}", ("train_stage3_nat_s{s}",), "network_g.nat2.feedback.mode=hard,soft"),
    (
        "mech_flow_prior",
        "test_stage2_nat_s{s}",
        ("train_stage2_nat_s{s}",),
        "network_g.nat2.decode.flow_prior=" + ",".join(f"{x:g}" for x in (0.0, *FLOW_PRIORS)),
    ),
    (
        "mech_halton",
        "test_stage2_nat_s{s}",
        ("train_stage2_nat_s{s}",),
        "network_g.nat2.decode.order=confidence,halton",
    ),
]
#: Variants of the NAT-II option files of seed SEEDS[0]: name -> (option files, (group, key, value) under
#: network_g.nat2). ``hidden``: [MASK] hides the flow latent at masked positions (the refiner sees only the
#: conditioning there), one more training against the default that shows it the flow latent; ``prior<x>``: the
#: flow's code distribution with weight x in the prediction (decode.flow_prior), the seed's own checkpoint;
#: ``halton``: the Halton commit order (decode.order), the seed's own checkpoint.
VARIANTS = {
    "hidden": (("train_stage2_nat", "test_stage2_nat"), ("model", "mask_hides_latent", True)),
    **{f"prior{x:g}": (("test_stage2_nat",), ("decode", "flow_prior", x)) for x in FLOW_PRIORS},
    "halton": (("test_stage2_nat",), ("decode", "order", "halton")),
}


@dataclass
class Job:
    """One command of the study; ``deps``: names of the jobs that must have finished first."""

    name: str
    cmd: list[str]
    deps: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()  #: folders removed before it runs (BasicSR would archive them)
    proc: subprocess.Popen | None = field(default=None, repr=False)
    start: float = 0.0


# ------------------------------------------------------------------------------------------------ option files
def _load(path: Path) -> dict:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


def _smoke(opt: dict, iters: int = 4) -> dict:
    """A few iterations, a validation at the end, nothing else changed."""
    train = opt.get("train")
    if train:
        train["total_iter"] = iters
        train["warmup_iter"] = min(train.get("warmup_iter", -1), 1)
        if "nat3" in train:
            train["nat3"]["warmup"] = 1
        opt["val"]["val_freq"] = iters
        opt["logger"].update(print_freq=1, save_checkpoint_freq=100000)
    return opt


def write_options(smoke: bool, gen: Path) -> dict[str, Path]:
    """``{key: option file}`` of every study command; per-seed (and ``--smoke``) files written to ``gen``
    (``results/study/options``); paths relative to the repository root where possible.

    Keys: ``train_<stage>`` / ``test_<stage>`` of ``options/study``; seeded ones get ``_s<seed>``, with the seed in
    ``manual_seed``, the experiment / result name and the checkpoint paths of the same seed.
    """
    gen.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def put(key: str, opt: dict) -> None:
        path = gen / f"{key}.yml"
        path.write_text(yaml.safe_dump(opt, sort_keys=False, width=120), encoding="utf-8")
        files[key] = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path

    for src in sorted((ROOT / OPT).glob("*.yml")):
        key = src.stem
        seeded = "nat" in key  # the NAT trainings and every test that reads a NAT checkpoint: one file per seed
        if not seeded:
            if smoke:
                put(key, _smoke(_load(src.relative_to(ROOT))))
            else:
                files[key] = src.relative_to(ROOT)
            continue
        for seed in SEEDS:
            opt = _load(src.relative_to(ROOT))
            opt["name"] = f"{opt['name']}_s{seed}"
            if "manual_seed" in opt:
                opt["manual_seed"] = seed
            for k, v in opt["path"].items():
                if isinstance(v, str) and ("study_stage2_nat/" in v or "study_stage3_nat/" in v):
                    opt["path"][k] = v.replace("_nat/", f"_nat_s{seed}/")
            put(f"{key}_s{seed}", _smoke(opt) if smoke else opt)
            for variant, (keys, (group, knob, value)) in VARIANTS.items():
                if seed != SEEDS[0] or key not in keys:
                    continue
                var = deepcopy(opt)
                var["name"] = var["name"].replace("_nat_", f"_nat_{variant}_")
                var["network_g"]["nat2"].setdefault(group, {})[knob] = value
                if "train_stage2_nat" in keys:  # a training of its own: read its checkpoint
                    for k, v in var["path"].items():
                        if isinstance(v, str) and "study_stage2_nat_s" in v:
                            var["path"][k] = v.replace("study_stage2_nat_s", f"study_stage2_nat_{variant}_s")
                put(f"{key}_{variant}_s{seed}", _smoke(var) if smoke else var)
    return files


# ------------------------------------------------------------------------------------------------------- jobs
def build_jobs(files: dict[str, Path]) -> list[Job]:
    """Every command in priority order (trainings first: they are the critical path)."""
    py = sys.executable

    def train(key: str, deps: tuple[str, ...] = ()) -> Job:
        name = _load(files[key])["name"]
        return Job(key, [py, "basicsr/train.py", "-opt", str(files[key])], deps, (f"experiments/{name}",))

    def bench(folder: str, key: str | None, deps: tuple[str, ...], *extra: str) -> Job:
        cmd = [py, "scripts/benchmark_lol.py", "--lolv1", str(DATA), "--out", str(OUT / folder)]
        cmd += ["--unpaired", f"heldout={DATA / 'eval15' / 'low'}"]
        cmd += ["--brightness", "1.0", "--save-images", "--quiet", "--grid-count", "0"]
        cmd += ["--identity"] if key is None else ["-opt", str(files[key])]
        return Job(f"bench_{folder}", cmd + list(extra), deps, (str(OUT / folder),))

    def test(key: str, deps: tuple[str, ...]) -> Job:
        name = _load(files[key])["name"]
        return Job(key, [py, "basicsr/test.py", "-opt", str(files[key])], deps, (f"results/{name}",))

    jobs = [
        train("train_stage1_vqgan"),
        train("train_baseline_rrdbnet"),
        train("train_stage2_flow", ("train_stage1_vqgan",)),
        train("train_stage3_aft", ("train_stage2_flow",)),
    ]
    jobs += [train(f"train_stage2_nat_s{s}", ("train_stage2_flow",)) for s in SEEDS]
    jobs += [train(f"train_stage3_nat_s{s}", ("train_stage2_flow", f"train_stage2_nat_s{s}")) for s in SEEDS]
    jobs.append(train(f"train_stage2_nat_hidden_s{SEEDS[0]}", ("train_stage2_flow",)))
    jobs += [
        test("test_stage1_vqgan", ("train_stage1_vqgan",)),
        bench("input", None, ()),
        bench("baseline", "test_baseline_rrdbnet", ("train_baseline_rrdbnet",)),
        bench("stage2", "test_stage2_flow", ("train_stage2_flow",)),
        bench("stage3", "test_stage3_aft", ("train_stage3_aft",)),
    ]
    for s in SEEDS:
        nat2 = f"train_stage2_nat_s{s}"
        jobs += [
            test(f"test_stage2_nat_s{s}", (nat2,)),
            bench(f"stage2_nat_s{s}", f"test_stage2_nat_s{s}", (nat2,)),
            bench(f"stage3_nat_latent_s{s}", f"test_stage3_nat_latent_s{s}", (nat2, "train_stage3_aft")),
            bench(f"stage3_nat_s{s}", f"test_stage3_nat_s{s}", (f"train_stage3_nat_s{s}",)),
        ]
    s = SEEDS[0]
    jobs += [
        bench("sweep_stage2_nat", f"test_stage2_nat_s{s}", (f"train_stage2_nat_s{s}",), "--sweep", SWEEP),
        bench(
            "sweep_stage3_nat_latent",
            f"test_stage3_nat_latent_s{s}",
            (f"train_stage2_nat_s{s}", "train_stage3_aft"),
            "--sweep",
            SWEEP,
        ),
    ]
    for folder, key, deps, values in MECHANISMS:
        jobs.append(bench(folder, key.format(s=s), tuple(d.format(s=s) for d in deps), "--sweep", values))
    hidden = f"stage2_nat_hidden_s{s}"
    jobs += [test(f"test_{hidden}", (f"train_{hidden}",)), bench(hidden, f"test_{hidden}", (f"train_{hidden}",))]
    jobs += [test(f"test_stage2_nat_prior{x:g}_s{s}", (f"train_stage2_nat_s{s}",)) for x in FLOW_PRIORS]
    jobs.append(test(f"test_stage2_nat_halton_s{s}", (f"train_stage2_nat_s{s}",)))
    return jobs


def _tail(path: Path, n: int = 30) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-n:])


def _last_iter(path: Path) -> str:
    """The last ``iter: N`` of a training log (BasicSR writes ``1,000``), for the heartbeat."""
    for line in reversed(_tail(path, 200).splitlines()):
        found = re.search(r"iter:\s*([\d,]+)", line)
        if found and "eta:" in line:
            return found.group(1).replace(",", "")
    return "-"


def run_jobs(jobs: list[Job], n_parallel: int, done: dict[str, float], state: Path) -> None:
    """Start ready jobs (all deps done) in list order, at most ``n_parallel`` at once; exit 1 on a failure."""
    logs = ROOT / OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = [j for j in jobs if j.name not in done]
    running: list[Job] = []
    failed: Job | None = None
    t0, beat = time.perf_counter(), time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    while pending or running:
        while failed is None and len(running) < n_parallel:
            job = next((j for j in pending if all(d in done for d in j.deps)), None)
            if job is None:
                break
            pending.remove(job)
            for folder in job.remove:
                for old in (ROOT / folder).parent.glob(Path(folder).name + "*"):
                    if old.is_dir() and (old.name == Path(folder).name or "_archived_" in old.name):
                        shutil.rmtree(old)
            print(f"[{_clock(t0)}] start {job.name}: {' '.join(job.cmd)}", flush=True)
            with open(logs / f"{job.name}.log", "w", encoding="utf-8") as log:
                job.proc = subprocess.Popen(job.cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            job.start = time.perf_counter()
            running.append(job)
        if failed is not None and not running:
            break
        if not running:  # nothing runnable and nothing running: a dependency failed or is missing
            sys.exit(f"study: cannot start {[j.name for j in pending]} (missing dependencies)")
        time.sleep(2)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            sec = time.perf_counter() - job.start
            if job.proc.returncode != 0:
                print(f"[{_clock(t0)}] FAILED {job.name} ({sec:.0f} s), log {logs / (job.name + '.log')}:", flush=True)
                print(_tail(logs / f"{job.name}.log"), flush=True)
                failed = failed or job
                continue
            done[job.name] = sec
            state.write_text(json.dumps(done, indent=1))
            n_done = sum(j.name in done for j in jobs)
            print(f"[{_clock(t0)}] done {job.name} in {sec:.0f} s ({n_done}/{len(jobs)} jobs)", flush=True)
        if time.perf_counter() - beat > 60 and running:
            beat = time.perf_counter()
            now = ", ".join(
                f"{j.name} {time.perf_counter() - j.start:.0f} s"
                + (f" (iter {_last_iter(logs / (j.name + '.log'))})" if j.name.startswith("train_") else "")
                for j in running
            )
            print(f"[{_clock(t0)}] running: {now}; waiting: {len(pending)}", flush=True)
    if failed is not None:
        sys.exit(
            f"study stopped: {failed.name} failed (results/study/logs/{failed.name}.log); fix it and run "
            "`python scripts/run_study.py --resume` to continue"
        )


def _clock(t0: float) -> str:
    sec = int(time.perf_counter() - t0)
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="commands run at the same time (default 2)")
    p.add_argument("--resume", action="store_true", help="skip the jobs an earlier run of the study finished")
    p.add_argument("--only-report", action="store_true", help="rebuild the report from existing results")
    p.add_argument("--smoke", action="store_true", help="a few iterations per training: checks the pipeline only")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    sys.path.insert(0, str(ROOT / "scripts"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per job (the Makefile's setting); the report says it
    state = ROOT / OUT / "jobs.json"
    if not args.only_report:
        if not args.resume and (ROOT / OUT).exists():
            shutil.rmtree(ROOT / OUT)
        (ROOT / OUT).mkdir(parents=True, exist_ok=True)
        done = json.loads(state.read_text()) if args.resume and state.is_file() else {}
        t0 = time.perf_counter()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        commit = head.stdout.strip() or "unknown"
        if "data" not in done:
            cmd = [sys.executable, "scripts/make_study_data.py", "--out", str(DATA)]
            print(f"$ {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            done["data"] = time.perf_counter() - t0
        files = write_options(args.smoke, ROOT / OUT / "options")
        run_jobs(build_jobs(files), args.jobs, done, state)
        run_file = ROOT / OUT / "run.json"
        before = json.loads(run_file.read_text()) if args.resume and run_file.is_file() else {}
        if before.get("commit", commit) != commit:  # a resumed study ran at more than one commit
            commit = f"{before['commit']}, resumed at {commit}"
        run_file.write_text(
            json.dumps(
                {
                    "wall_s": before.get("wall_s", 0.0) + time.perf_counter() - t0,
                    "jobs": args.jobs,
                    "smoke": args.smoke,
                    "commit": commit,
                },
                indent=1,
            )
        )
    import study_report

    report = study_report.write_report(ROOT / OUT, SEEDS)
    print(f"\nstudy report: {report.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
