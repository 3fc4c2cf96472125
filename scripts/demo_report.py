"""The `make demo` report: tables, explanations, labelled image grid and curves from the demo's outputs.

Called by ``scripts/run_demo.py`` (also ``python scripts/run_demo.py --only-report`` after a run). Reads the
training logs under ``experiments/demo_*``, the benchmark records under ``results/demo/*`` and the demo data set,
and writes ``results/demo/report.md`` with ``grid.png`` and ``curves.png``. Every sentence that states a result
is built from the numbers it prints, so it stays true when another machine gives other digits.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: folder -> (what the row is, what to expect from it)
ROW_NOTES = {
    "input": "the low-light input itself, scored as if it were the output: the floor every model must beat.",
    "baseline": "stock BasicSR `RRDBNet` (scale 1) trained with L1 on the same pairs for the same kind of budget: "
    "a direct image-to-image regressor, no codebook.",
    "stage2": "GLARE stage II: conditional encoder + reverse flow, decoded by the frozen VQGAN decoder. It can only "
    "output what the codebook prior can reconstruct, so it is bounded by the VQGAN's own quality.",
    "stage2_nat": "stage II with the latent NAT replacing the flow's codes at uncertain positions.",
    "stage3": "GLARE stage III: the AFT decoder fuses the encoder's low-light features with the normal-light "
    "decoder's, restoring detail the codebook cannot hold.",
    "stage3_nat_latent": "stage III fed by the latent NAT's codes.",
    "stage3_nat_dual": "stage III with the latent NAT and the decoder NAT (mask-aware refinement of D_MF features).",
}

#: NAT validation statistic -> (meaning, what a good value is)
STAT_NOTES = {
    "n_images": ("held-out training images the statistics are computed on", ""),
    "n_positions": ("latent positions (tokens) over those images", ""),
    "n_masked": ("positions whose flow code was uncertain enough to be masked", ""),
    "masked_frac": ("fraction of positions masked (entropy above the calibrated tau)", "the calibration target (0.25)"),
    "acc_flow_masked": ("on masked positions: how often the flow's nearest code equals the teacher's code", "higher"),
    "acc_nat_masked": ("on masked positions: how often the NAT's code equals the teacher's code", "above the flow's"),
    "acc_flow_all": ("on all positions: flow code = teacher code", "higher"),
    "acc_nat_all": ("on all positions: NAT output code = teacher code", "at least the flow's"),
    "auroc_entropy": ("how well the flow entropy ranks wrong flow codes above right ones", "1 perfect, 0.5 chance"),
    "auroc_score": ("the same for the score that masks (the entropy by default)", "1 perfect, 0.5 chance"),
    "psnr_nat": ("PSNR of images decoded from the NAT's codes (VQGAN decoder, no stage III)", "above the flow's"),
    "psnr_oracle_flow_codes": ("PSNR decoded from the flow's codes: stage II without NAT", ""),
    "psnr_oracle_gt_at_mask0": (
        "PSNR decoded from the flow's codes with the teacher's codes at the masked "
        "positions: the most a perfect latent NAT could reach",
        "",
    ),
    "psnr_oracle_all_gt": ("PSNR decoded from the teacher's codes everywhere: the VQGAN's own ceiling", ""),
    "tau": ("calibrated entropy threshold above which a position is masked", ""),
    "dist_temp": ("calibrated temperature of the code distribution (median nearest-code gap)", ""),
}


def machine() -> str:
    """CPU model, threads, torch version, date and commit: what every number of the report depends on."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    rev = commit.stdout.strip() or "unknown"
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True, text=True).stdout.strip()
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return f"{date}, commit `{rev}`, {cpu}, OMP_NUM_THREADS={threads}, torch {torch.__version__}"


def data_summary(data: Path, train_opt: dict) -> list[str]:
    import cv2

    train = sorted((data / "our485" / "high").glob("*.png"))
    test = sorted((data / "eval15" / "high").glob("*.png"))
    h, w = cv2.imread(str(train[0])).shape[:2] if train else (0, 0)
    holdout = (train_opt["datasets"]["train"].get("holdout") or {}).get("count", 0)
    return [
        f"- {len(train)} training pairs of {w}x{h} pixels, of which {holdout} are held out for validation and "
        f"checkpoint statistics; {len(test)} test pairs. Made by `scripts/make_demo_lol.py` from four scikit-image "
        "photos: every pair is a random crop of one of them, darkened by a camera model (exposure x0.02-0.10 in "
        "linear light, a colour cast, Poisson-Gaussian noise, 8-bit). The test pairs are other crops of the same "
        "four photos, so the test split measures fitting, not generalisation to new scenes.",
    ]


def _log(name: str) -> Path | None:
    logs = sorted((ROOT / "experiments" / name).glob("train_*.log"))
    return logs[-1] if logs else None


def stage_rows(trainings: list[tuple[str, str]], timings: dict[str, float]) -> list[str]:
    """Per training: iterations, parameters of each network (from the log), wall time."""
    import yaml

    lines = ["| training | option file | iterations | parameters (from the log) | wall time |", "|---|---|---|---|---|"]
    for name, opt in trainings:
        total = yaml.safe_load((ROOT / opt).read_text())["train"]["total_iter"]
        log = _log(name)
        nets = re.findall(r"Network: (\w+), with parameters: ([\d,]+)", log.read_text()) if log else []
        params = ", ".join(f"{n} {p}" for n, p in nets) or "-"
        sec = timings.get(f"train {name}")
        lines.append(f"| {name} | `{opt}` | {total} | {params} | {f'{sec:.0f} s' if sec else '-'} |")
    return lines


def vqgan_validation(name: str = "demo_stage1_vqgan") -> list[str]:
    log = _log(name)
    if log is None:
        return []
    text = log.read_text()
    psnr = [float(v) for v in re.findall(r"# psnr: ([\d.]+)", text)]
    usage = re.findall(r"iter (\d+): (\d+)/(\d+) codes used, perplexity ([\d.]+)", text)
    rows = ["| iteration | held-out PSNR (dB) | codes used | perplexity |", "|---|---|---|---|"]
    seen = []
    for (it, used, k, ppl), p in zip(usage, psnr):
        if seen and int(it) == seen[-1][0] + 1 and p == seen[-1][1]:
            continue  # BasicSR validates once more after the last iteration: the same weights
        seen.append((int(it), p))
        rows.append(f"| {it} | {p:.2f} | {used}/{k} | {ppl} |")
    psnr = [p for _, p in seen]
    falls = any(b < a for a, b in zip(psnr, psnr[1:]))
    verdict = (
        "The held-out PSNR falls between two validations: the prior degraded."
        if falls
        else "The held-out PSNR rises at every validation: the GAN phase (last 50 iterations, warm-up ramp, capped "
        "adaptive weight) does not degrade the prior."
    )
    return [
        "## Stage I: the codebook prior",
        "",
        "Reconstruction of held-out normal-light images by the VQGAN, and how much of its codebook it uses (perplexity:"
        " the effective number of codes; K for uniform use of all K codes, 1 for a collapse onto one).",
        "",
        *rows,
        "",
        verdict,
        "",
    ]


def metric_rows(rows: list[tuple[str, str, str | None]], out: Path) -> tuple[list[str], dict, dict]:
    lines = [
        "| model | PSNR | SSIM | PSNR GT-mean | SSIM GT-mean | what it is |",
        "|---|---|---|---|---|---|",
    ]
    values, protocols = {}, {}
    for label, folder, _opt in rows:
        rec = json.loads((out / folder / "results.json").read_text())
        row = next(r for r in rec["results"] if float(r["brightness"]) == 1.0)
        values[folder] = row
        protocols = rec.get("protocols", protocols)
        lines.append(
            f"| {label} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['psnr_gtmean']:.2f} | "
            f"{row['ssim_gtmean']:.4f} | {ROW_NOTES.get(folder, '')} |"
        )
    return lines, values, protocols


def metric_reading(values: dict) -> list[str]:
    """Sentences on what this run's numbers show, built from them."""
    out = []
    models = {k: v for k, v in values.items() if k != "input"}
    if "input" in values and models:
        best = max(models, key=lambda k: models[k]["psnr_gtmean"])
        ident = values["input"]["psnr_gtmean"]
        if ident >= models[best]["psnr_gtmean"]:
            out.append(
                f"- Under GT-mean the identity scores {ident:.2f} dB, at or above every trained model (best: {best}, "
                f"{models[best]['psnr_gtmean']:.2f} dB). This is expected on this data: the darkening is an exposure "
                "factor in linear light, which after the gamma is one global factor in sRGB, exactly what GT-mean "
                "divides out; what remains of the input's error is noise and a colour cast, while tiny networks "
                "trained for a few hundred steps still blur. Plain PSNR, which keeps brightness, ranks the models."
            )
        else:
            out.append(f"- Under GT-mean every trained model beats the identity ({ident:.2f} dB).")
    if "baseline" in values and "stage2" in values and "stage3" in values:
        b2, b3, base = (values[k]["psnr"] for k in ("stage2", "stage3", "baseline"))
        out.append(
            f"- Stage II {b2:.2f} dB, stage III {b3:.2f} dB, the RRDBNet baseline {base:.2f} dB (plain PSNR). "
            "Stage III starts its 6-million-parameter decoder from scratch and trains it for 100 iterations here, so "
            "it can trail stage II, whose output is the VQGAN's own decoding; in the images stage III keeps more "
            "detail and more noise, stage II is smoother."
        )
    for a, b, what in (
        ("stage2", "stage2_nat", "the latent NAT on stage II"),
        ("stage3", "stage3_nat_latent", "the latent NAT on stage III"),
        ("stage3_nat_latent", "stage3_nat_dual", "adding the decoder NAT"),
    ):
        if a in values and b in values:
            d = values[b]["psnr"] - values[a]["psnr"]
            out.append(f"- {what}: {d:+.2f} dB plain PSNR ({values[a]['psnr']:.2f} -> {values[b]['psnr']:.2f}).")
    return out


def nat_rows(stats: dict) -> list[str]:
    lines = ["| statistic | value | meaning | good value |", "|---|---|---|---|"]
    for k, v in stats.items():
        meaning, good = STAT_NOTES.get(k, ("", ""))
        shown = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"| {k} | {shown} | {meaning} | {good} |")
    lines.append("")
    flow, gt0, allgt = (
        stats.get(k) for k in ("psnr_oracle_flow_codes", "psnr_oracle_gt_at_mask0", "psnr_oracle_all_gt")
    )
    if None not in (flow, gt0, allgt):
        lines.append(
            f"Reading: with the teacher's codes at every masked position the decoded PSNR would change by "
            f"{gt0 - flow:+.2f} dB over the flow's codes, and with all teacher codes by {allgt - flow:+.2f} dB. "
            "That is the most a perfect latent NAT could add at this scale; the NAT itself changes it by "
            f"{stats.get('psnr_nat', flow) - flow:+.2f} dB."
            + (
                " The teacher's codes are barely better than the flow's (the small VQGAN decodes neighbouring codes "
                "into similar patches), so at this scale the latent NAT has little to gain, whatever its accuracy. "
                "`make study` (docs/study.md) trains a prior for which correct codes matter and measures the NAT "
                "there."
                if allgt - flow < 1.0
                else ""
            )
        )
        if stats.get("acc_nat_masked") is not None and stats.get("acc_flow_masked") is not None:
            better = stats["acc_nat_masked"] >= stats["acc_flow_masked"]
            verdict = "at least as accurate as" if better else "less accurate than"
            lines.append(
                f"On the masked positions the NAT picks the teacher's code {stats['acc_nat_masked']:.1%} of the time, "
                f"the flow {stats['acc_flow_masked']:.1%}: the NAT is {verdict}"
                " the flow there. Code accuracy and PSNR need not agree: a wrong code next to the right one in the "
                "codebook costs little, a right code in a different colour context can cost more."
            )
    return lines


def labelled_grid(path: Path, out: Path, data: Path, columns: list[tuple[str, str]]) -> list[str]:
    """Rows = test images; columns = input, every model, ground truth, each with its name in a header strip."""
    import cv2
    import numpy as np

    from glare_nat_data.image_io import list_images, read_image, write_image

    gts = list_images(data / "eval15" / "high")
    rows, labels = [], []
    for gt_path in gts:
        tiles = []
        for _label, folder in columns:
            found = list((out / folder / "images").rglob(f"{gt_path.stem}.png"))
            if not found:
                raise FileNotFoundError(f"demo grid: no output image {gt_path.stem}.png under {out / folder}")
            tiles.append(read_image(found[0]))
        tiles.append(read_image(gt_path))
        rows.append(np.concatenate(tiles, axis=1))
    labels = [label for label, _ in columns] + ["ground truth"]
    width = rows[0].shape[1] // len(labels)
    header = np.full((22, rows[0].shape[1], 3), 255, dtype=np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label[:18], (i * width + 3, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (0, 0, 0), 1, cv2.LINE_AA)
    body = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    write_image(path, np.concatenate([header, body], axis=0))
    return labels


def plot_curves(path: Path, trainings: list[tuple[str, str]], parse_losses) -> list[str]:
    """Per training run two panels: the losses (``l_*`` terms), and the other logged statistics (log scale when
    they span decades), so large statistics do not flatten the losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, parse_losses(log)) for name, _ in trainings if (log := _log(name))]
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 5.6), squeeze=False)
    for col, (name, series) in enumerate(runs):
        for row, pick in enumerate((lambda t: t.startswith("l_"), lambda t: not t.startswith("l_"))):
            ax = axes[row][col]
            for term, pts in series.items():
                if pick(term) and pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=term)
            ax.set_title(f"{name.replace('demo_', '')}: {'losses' if row == 0 else 'statistics'}", fontsize=8)
            ax.set_xlabel("iteration", fontsize=7)
            if not ax.lines:
                ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                ax.set_xticks([]), ax.set_yticks([])
            else:
                ax.legend(fontsize=5)
                ys = [y for line in ax.lines for y in line.get_ydata() if y > 0]
                if row == 1 and ys and max(ys) / min(ys) > 100:
                    ax.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [r[0] for r in runs]


def figures(
    out: Path, data: Path, columns: list[tuple[str, str]], trainings: list, parse_losses, note: str = ""
) -> list[str]:
    """Write ``grid.png`` (:func:`labelled_grid`) and ``curves.png`` (:func:`plot_curves`) into ``out``; return the
    report's "Images" and "Training curves" sections (``note`` ends the grid's caption)."""
    labels = labelled_grid(out / "grid.png", out, data, columns)
    runs = plot_curves(out / "curves.png", trainings, parse_losses)
    return [
        "## Images",
        "",
        f"Each row is one test image; columns left to right: {', '.join(labels)}{note}.",
        "",
        "![grid](grid.png)",
        "",
        "## Training curves",
        "",
        f"Top row: the losses of each training ({', '.join(runs)}); bottom row: the other logged statistics (e.g. "
        "`d_weight`, `code_usage`, `logdet`), on a log scale where they span decades.",
        "",
        "![curves](curves.png)",
        "",
    ]
