"""``make demo``: synthetic demo set -> every training stage on CPU -> benchmark -> ``results/demo/report.md``.

Each step is an ordinary command a user could type (printed before it runs): the stock BasicSR loops through
``basicsr/train.py`` / ``basicsr/test.py`` with the options in ``options/demo/``, and the benchmark CLI
(``scripts/benchmark_lol.py``) on the demo test split. The report holds the metrics of every model in both
protocols (plain and GT-mean), an image grid (input | stage II | stage III | ... | ground truth), a plot of the
training losses and the wall time of every step, all measured by this run. Evaluation extras (:func:`benchmark_extras`):
NIQE rows of the low-light input and the dual-NAT model on a folder of darkened photos without ground truth, and the
dual-NAT model's decoding rounds T = 2 / 4 / 6 from one checkpoint (``--sweep``), with latency and peak memory.

Usage: ``python scripts/run_demo.py [--skip-train] [--only-report]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("datasets/demo_lol")
OUT = Path("results/demo")

#: (experiment name, training option file) in dependency order.
TRAININGS = [
    ("demo_baseline_rrdbnet", "options/demo/train_baseline_rrdbnet.yml"),
    ("demo_stage1_vqgan", "options/demo/train_stage1_vqgan.yml"),
    ("demo_stage2_flow", "options/demo/train_stage2_flow.yml"),
    ("demo_stage2_nat", "options/demo/train_stage2_nat.yml"),
    ("demo_stage3_aft", "options/demo/train_stage3_aft.yml"),
    ("demo_stage3_nat", "options/demo/train_stage3_nat.yml"),
]

#: (row label, benchmark folder name, test option file or None for the input itself).
ROWS = [
    ("low-light input (identity)", "input", None),
    ("stock BasicSR RRDBNet (baseline)", "baseline", "options/demo/test_baseline_rrdbnet.yml"),
    ("GLARE stage II (flow + VQGAN decoder)", "stage2", "options/demo/test_stage2_flow.yml"),
    ("GLARE stage II + NAT (latent)", "stage2_nat", "options/demo/test_stage2_nat.yml"),
    ("GLARE stage III (AFT decoder)", "stage3", "options/demo/test_stage3_aft.yml"),
    ("GLARE + NAT (latent)", "stage3_nat_latent", "options/demo/test_stage3_nat_latent.yml"),
    ("GLARE + NAT (latent and decoder)", "stage3_nat_dual", "options/demo/test_stage3_nat.yml"),
]

#: Darkened whole photos without ground truth (``make_demo_lol.py --unpaired``), and the evaluation extras:
#: (benchmark folder, arguments). The sweep's T = 4 is the option file's own value (the nat2 default).
UNPAIRED = DATA / "unpaired"
SWEEP_KEY = "network_g.nat2.decode.iters"
EXTRAS = [
    ("unpaired_input", ["--identity", "--unpaired", f"dark={UNPAIRED}"]),
    (
        "sweep_nat_rounds",
        ["-opt", "options/demo/test_stage3_nat.yml", "--lolv1", str(DATA), "--unpaired", f"dark={UNPAIRED}"]
        + ["--sweep", f"{SWEEP_KEY}=2,4,6"],
    ),
]


def run(cmd: list[str], timings: list[tuple[str, float]], label: str) -> None:
    """Run one step from the repo root, echo the command, stop the demo with its output on failure."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    timings.append((label, time.perf_counter() - t0))
    if proc.returncode != 0:
        sys.exit(f"demo step failed ({label}): {' '.join(cmd)}")


def train_all(timings: list[tuple[str, float]]) -> None:
    for name, opt in TRAININGS:
        if not (ROOT / opt).is_file():
            sys.exit(f"demo: option file {opt} is missing")
        for old in (ROOT / "experiments").glob(f"{name}*"):
            shutil.rmtree(old)  # a fresh run each time (BasicSR would archive the old folder)
        run([sys.executable, "basicsr/train.py", "-opt", opt], timings, f"train {name}")


def benchmark_all(timings: list[tuple[str, float]]) -> None:
    for _label, folder, opt in ROWS:
        out = OUT / folder
        cmd = [sys.executable, "scripts/benchmark_lol.py", "--lolv1", str(DATA), "--out", str(out)]
        cmd += ["--brightness", "1.0", "--save-images", "--quiet", "--grid-count", "0"]
        cmd += ["--identity"] if opt is None else ["-opt", opt]
        run(cmd, timings, f"benchmark {folder}")


def benchmark_extras(timings: list[tuple[str, float]]) -> None:
    """The input and the dual-NAT model on the unpaired photos, and the decoding-rounds sweep (one process)."""
    for folder, extra in EXTRAS:
        cmd = [sys.executable, "scripts/benchmark_lol.py", *extra, "--out", str(OUT / folder)]
        run(cmd + ["--brightness", "1.0", "--quiet", "--grid-count", "0"], timings, f"benchmark {folder}")


def extras_report() -> list[str]:
    """Report sections of :func:`benchmark_extras` (empty where its results are missing)."""
    recs = {f: ROOT / OUT / f / "results.json" for f, _ in EXTRAS}
    if not all(p.is_file() for p in recs.values()):
        return ["## Unpaired photos and decoding rounds", "", "Not run (`results/demo/sweep_nat_rounds` missing).", ""]
    inp, sweep = (json.loads(p.read_text()) for p in recs.values())

    def label(row: dict) -> str:
        t = row["setting"].split("=")[1]
        return f"GLARE + NAT (latent and decoder), T = {t}" + (" (option file)" if t == "4" else "")

    def runtime(row: dict) -> str:
        mem = "n/a" if row["peak_mem_mib"] is None else f"{row['peak_mem_mib']:.0f}"
        return f"{row['latency_ms']:.1f} | {mem}"

    n_files = inp["datasets"]["dark"]["n_images"]
    lines = ["## Unpaired photos (no reference)", ""]
    lines.append(
        f"`{UNPAIRED}`: {n_files} whole scikit-image photos darkened by the demo's low-light model, longer side 320, "
        "no ground truth (`make_demo_lol.py --unpaired`). NIQE: lower = more natural."
    )
    lines += ["", "| model | n (NIQE) | NIQE | mean brightness | colourfulness | latency (ms) | peak mem (MiB) |"]
    lines.append("|---|---|---|---|---|---|---|")
    rows = [("low-light input (identity)", r) for r in inp["results"]]
    rows += [(label(r), r) for r in sweep["results"] if r["kind"] == "unpaired"]
    for name, r in rows:
        cells = f"{r['niqe_n']} | {float(r['niqe']):.3f} | {r['mean_brightness']:.3f} | {r['colourfulness']:.1f}"
        lines.append(f"| {name} | {cells} | {runtime(r)} |")
    lines += ["", f"## NAT decoding rounds T (dual-NAT model, one checkpoint, `--sweep {SWEEP_KEY}=2,4,6`)", ""]
    lines += ["| T | PSNR | SSIM | PSNR (GT-mean) | SSIM (GT-mean) | latency (ms) | peak mem (MiB) |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in (r for r in sweep["results"] if r["kind"] == "paired"):
        cells = f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_gtmean']:.2f} | {r['ssim_gtmean']:.4f}"
        lines.append(f"| {r['setting'].split('=')[1]} | {cells} | {runtime(r)} |")
    paired = [r for r in sweep["results"] if r["kind"] == "paired"]
    unpaired = [r for r in sweep["results"] if r["kind"] == "unpaired"]
    if paired:
        spread = max(r["psnr"] for r in paired) - min(r["psnr"] for r in paired)
        lines += [
            "",
            f"More decoding rounds re-decide the masked tokens in smaller groups; here T changes PSNR by at most "
            f"{spread:.2f} dB; each round is one more transformer pass (latency column).",
        ]
    if unpaired and inp["results"]:
        ident = float(inp["results"][0]["niqe"])
        best = min(float(r["niqe"]) for r in unpaired)
        lines.append(
            f"On the unpaired photos NIQE goes from {ident:.2f} (input) to {best:.2f} at best: brightening and "
            "denoising make the statistics of the photos more like those of natural images; NIQE judges naturalness "
            "only, not fidelity to a scene, so read it next to the paired metrics."
        )
    dev = sweep["device"]
    lines += ["", f"Runtime on {dev['type']} ({dev['name']}, {dev['torch_threads']} thread(s)), per image.", ""]
    lines += [f"- **{k}**: {sweep['protocols'][k]}" for k in ("niqe", "mean_brightness", "colourfulness", "runtime")]
    return lines + [""]


LOSS_RE = re.compile(r"iter:\s*([\d,]+).*?\]\s*(.*)$")
TERM_RE = re.compile(r"(\w+): ([-+\d.eE]+|nan|inf)")


def parse_losses(log: Path) -> dict[str, list[tuple[int, float]]]:
    """``{term: [(iter, value), ...]}`` from a BasicSR training log (message-logger lines)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = LOSS_RE.search(line)
        if not m or "eta:" not in line:
            continue
        it = int(m.group(1).replace(",", ""))
        tail = line.split("]")[-1]
        for term, val in TERM_RE.findall(tail):
            series.setdefault(term, []).append((it, float(val)))
    return series


#: short column labels of the image grid
GRID_LABELS = {
    "input": "input",
    "baseline": "RRDBNet",
    "stage2": "stage II",
    "stage2_nat": "II + NAT",
    "stage3": "stage III",
    "stage3_nat_latent": "III + NAT-II",
    "stage3_nat_dual": "III + NAT-II/III",
}


def write_report(timings: list[tuple[str, float]]) -> Path:
    """``results/demo/report.md`` (see scripts/demo_report.py): every row, statistic and picture explained."""
    import demo_report as R
    import yaml

    out = ROOT / OUT
    times = dict(timings)
    train_opt = yaml.safe_load((ROOT / TRAININGS[0][1]).read_text())
    metric_lines, values, protocols = R.metric_rows(ROWS, out)
    lines = [
        "# glare-nat demo report",
        "",
        f"Measured by `make demo` (`python scripts/run_demo.py`): {R.machine()}. Total wall time "
        f"{sum(times.values()):.0f} s. Other CPUs give other digits (other kernels, other rounding).",
        "",
        "This is a smoke test of the whole pipeline with tiny networks trained for a few hundred CPU iterations on a "
        "toy data set. Its numbers say what each stage does at this size, nothing about LOL.",
        "",
        "## Data",
        "",
        *R.data_summary(ROOT / DATA, train_opt),
        "",
        "## Trainings",
        "",
        *R.stage_rows(TRAININGS, times),
        "",
        *R.vqgan_validation(),
        "## Test split, both metric protocols",
        "",
        *metric_lines,
        "",
    ]
    if protocols:
        lines += [f"- **{k}**: {v}" for k, v in protocols.items() if k in ("plain", "gtmean")]
    lines += [
        "- SSIM is computed on RGB; LPIPS is not reported (it needs local AlexNet weights, and nothing downloads).",
        "",
        "What this run shows:",
        "",
        *R.metric_reading(values),
        "",
    ]
    nat_stats = ROOT / "experiments" / "demo_stage2_nat" / "nat_val_stats_latest.json"  # written by GLARENATModel
    if nat_stats.is_file():
        lines += ["## Latent NAT: validation statistics (held-out training pairs)", ""]
        lines += [*R.nat_rows(json.loads(nat_stats.read_text())), ""]
    lines += extras_report()
    columns = [(GRID_LABELS.get(folder, folder), folder) for _label, folder, _opt in ROWS]
    lines += R.figures(out, ROOT / DATA, columns, TRAININGS, parse_losses)
    lines += [
        "## Wall time of each step",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {label} | {sec:.1f} |" for label, sec in timings]
    lines.append(f"| total | {sum(s for _, s in timings):.1f} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-train", action="store_true", help="reuse the checkpoints of an earlier demo run")
    p.add_argument("--only-report", action="store_true", help="rebuild the report from existing results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    timings: list[tuple[str, float]] = []
    if not args.only_report:
        make_data = [sys.executable, "scripts/make_demo_lol.py", "--out", str(DATA), "--unpaired", str(UNPAIRED)]
        run(make_data, timings, "make demo data")
        if not args.skip_train:
            train_all(timings)
        benchmark_all(timings)
        benchmark_extras(timings)
    saved = ROOT / OUT / "timings.json"
    if timings:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(timings))
    elif saved.is_file():  # --only-report: the wall times of the run that made the results
        timings = [tuple(t) for t in json.loads(saved.read_text())]
    report = write_report(timings)
    print(f"\ndemo report: {report.relative_to(ROOT)}")
    print(report.read_text().split("## NAT")[0].split("## Images")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
