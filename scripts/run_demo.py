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

#: Folders shown in the image grid, left to right (besides input and ground truth).
GRID = ["stage2", "stage3", "stage3_nat_dual"]

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


def plot_losses(path: Path) -> list[str]:
    """One subplot per training run; returns the runs plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for name, _opt in TRAININGS:
        logs = sorted((ROOT / "experiments" / name).glob("train_*.log"))
        if logs:
            runs.append((name, parse_losses(logs[-1])))
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], runs):
        for term, pts in series.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=term)
        ax.set_title(name.replace("demo_", ""), fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [r[0] for r in runs]


def image_grid(path: Path) -> list[str]:
    """Rows = test images; columns = input | GRID models | ground truth (uint8 PNG)."""
    import numpy as np

    from glare_nat_data.image_io import list_images, read_image, write_image

    cols = ["input", *[g for g in GRID if (OUT / g / "images").is_dir()]]
    gts = list_images(ROOT / DATA / "eval15" / "high")
    rows = []
    for gt_path in gts:
        tiles = []
        for col in cols:
            found = list((OUT / col / "images").rglob(f"{gt_path.stem}.png"))
            if not found:
                raise FileNotFoundError(f"demo grid: no output image {gt_path.stem}.png under {OUT / col}")
            tiles.append(read_image(found[0]))
        tiles.append(read_image(gt_path))
        rows.append(np.concatenate(tiles, axis=1))
    write_image(path, (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8))
    return [*cols, "ground truth"]


def write_report(timings: list[tuple[str, float]]) -> Path:
    lines = [
        "# glare-nat demo report",
        "",
        "Everything below was measured by `make demo` (`python scripts/run_demo.py`) on this machine, on the "
        f"synthetic demo set `{DATA}` (made by `scripts/make_demo_lol.py` from scikit-image photos; tiny networks, "
        "a few CPU iterations: a smoke test of the whole pipeline, not a LOL result).",
        "",
        "## Test-split metrics (both protocols)",
        "",
        "| model | PSNR | SSIM | PSNR (GT-mean) | SSIM (GT-mean) |",
        "|---|---|---|---|---|",
    ]
    definitions = None
    for label, folder, _opt in ROWS:
        rec = json.loads((ROOT / OUT / folder / "results.json").read_text())
        row = next(r for r in rec["results"] if float(r["brightness"]) == 1.0)
        lines.append(
            f"| {label} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['psnr_gtmean']:.2f} | {row['ssim_gtmean']:.4f} |"
        )
        definitions = rec.get("protocols", definitions)
    lines += [
        "",
        "LPIPS is not reported: it needs local AlexNet weights (`--lpips-weights`), and nothing downloads.",
        "",
    ]
    if definitions:
        lines += ["Protocol definitions:", ""]
        lines += [f"- **{k}**: {v}" for k, v in definitions.items() if k in ("plain", "gtmean")]
        lines.append("")
    nat_stats = ROOT / "experiments" / "demo_stage2_nat" / "nat_val_stats_latest.json"  # written by GLARENATModel
    if nat_stats.is_file():
        stats = json.loads(nat_stats.read_text())
        lines += ["## NAT validation statistics (held-out training pairs)", ""]
        lines += ["| statistic | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items()]
        lines.append("")
    lines += extras_report()
    cols = image_grid(ROOT / OUT / "grid.png")
    runs = plot_losses(ROOT / OUT / "losses.png")
    lines += [f"## Images: {' | '.join(cols)}", "", "![grid](grid.png)", ""]
    lines += [f"## Training losses ({', '.join(runs)})", "", "![losses](losses.png)", ""]
    lines += ["## Wall time of each step", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {label} | {sec:.1f} |" for label, sec in timings]
    lines.append(f"| total | {sum(s for _, s in timings):.1f} |")
    report = ROOT / OUT / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-train", action="store_true", help="reuse the checkpoints of an earlier demo run")
    p.add_argument("--only-report", action="store_true", help="rebuild the report from existing results")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    timings: list[tuple[str, float]] = []
    if not args.only_report:
        make_data = [sys.executable, "scripts/make_demo_lol.py", "--out", str(DATA), "--unpaired", str(UNPAIRED)]
        run(make_data, timings, "make demo data")
        if not args.skip_train:
            train_all(timings)
        benchmark_all(timings)
        benchmark_extras(timings)
    report = write_report(timings)
    print(f"\ndemo report: {report.relative_to(ROOT)}")
    print(report.read_text().split("## NAT")[0].split("## Images")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
