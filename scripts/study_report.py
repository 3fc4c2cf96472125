"""The `make study` report: ``results/study/report.md`` and ``results/study/study.json`` from the study's outputs.

Called by ``scripts/run_study.py`` (also ``python scripts/run_study.py --only-report``). Reads the benchmark records
under ``results/study/*``, NAT-II's token statistics on the test photos (``results/study_test_stage2_nat_s*/``), the
VQGAN's test log and the training logs (``experiments/study_*``). Every verdict is computed from the numbers next
to it, so it stays true when another machine gives other digits.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import demo_report as R
from run_demo import parse_losses

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "datasets" / "study_lol"

#: Table I: (label, benchmark folder; "{s}" = seed)
TABLE_I = [
    ("low-light input (identity)", "input"),
    ("stock BasicSR RRDBNet (baseline)", "baseline"),
    ("GLARE stage II (flow + VQGAN decoder)", "stage2"),
    ("stage II + latent NAT", "stage2_nat_s{s}"),
    ("GLARE stage III (AFT decoder)", "stage3"),
    ("GLARE + latent NAT", "stage3_nat_latent_s{s}"),
    ("GLARE + latent and decoder NAT", "stage3_nat_s{s}"),
]
METRICS = ("psnr", "ssim", "psnr_gtmean", "ssim_gtmean", "niqe")
#: NAT-II statistics shown per seed (name in nat_val_stats -> label)
CEILINGS = {
    "psnr_oracle_flow_codes": "PSNR, flow's codes (stage II)",
    "psnr_nat": "PSNR, NAT's codes",
    "psnr_oracle_gt_at_mask0": "PSNR, teacher codes at the masked positions",
    "psnr_oracle_all_gt": "PSNR, all teacher codes",
    "acc_flow_masked": "masked-token accuracy, flow",
    "acc_nat_masked": "masked-token accuracy, NAT",
    "acc_flow_all": "token accuracy (all positions), flow",
    "acc_nat_all": "token accuracy (all positions), NAT",
    "auroc_score": "AUROC of the masking score for wrong flow codes",
    "masked_frac": "masked fraction",
}
#: the source documents' table (GLARE, + latent NAT, + both), dB on LOL-v1
SOURCE_GAINS = {"latent": 26.60 - 25.52, "both": 27.08 - 25.52}


def _records(out: Path, folder: str) -> dict[str, dict]:
    """``{'paired': row, 'unpaired': row}`` of one benchmark folder (brightness 1, first setting)."""
    rec = json.loads((out / folder / "results.json").read_text())
    rows: dict[str, dict] = {}
    for r in rec["results"]:
        rows.setdefault(r["kind"], r)
    return rows


def _values(out: Path, folder: str) -> dict[str, float]:
    rows = _records(out, folder)
    vals = {k: float(rows["paired"][k]) for k in METRICS[:4]}
    vals["niqe"] = float(rows["unpaired"]["niqe"]) if "unpaired" in rows else float("nan")
    return vals


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table_i(out: Path, seeds: tuple[int, ...]) -> tuple[list[str], dict]:
    lines = [
        "| model | seeds | PSNR | SSIM | PSNR GT-mean | SSIM GT-mean | NIQE |",
        "|---|---|---|---|---|---|---|",
    ]
    data: dict[str, dict] = {}
    for label, folder in TABLE_I:
        if "{s}" not in folder:
            v = _values(out, folder)
            data[folder] = {"label": label, "values": v}
            cells = " | ".join(f"{v[m]:.4f}" if m.startswith("ssim") else f"{v[m]:.2f}" for m in METRICS)
            lines.append(f"| {label} | 1 | {cells} |")
            continue
        per_seed = {s: _values(out, folder.format(s=s)) for s in seeds}
        stats = {m: _mean_sd([per_seed[s][m] for s in seeds]) for m in METRICS}
        key = folder.replace("_s{s}", "")
        data[key] = {"label": label, "per_seed": per_seed, "mean": {m: stats[m][0] for m in METRICS}}
        data[key]["sd"] = {m: stats[m][1] for m in METRICS}
        cells = " | ".join(
            f"{stats[m][0]:.4f} ± {stats[m][1]:.4f}"
            if m.startswith("ssim")
            else f"{stats[m][0]:.2f} ± {stats[m][1]:.2f}"
            for m in METRICS
        )
        lines.append(f"| {label} | {len(seeds)} | {cells} |")
    return lines, data


def _verdict(name: str, nat: dict, base: dict) -> tuple[str, dict]:
    """Sentence and record: NAT row (mean, sd over seeds) against the row without it."""
    diff = nat["mean"]["psnr"] - base["values"]["psnr"]
    sd = nat["sd"]["psnr"]
    if abs(diff) <= sd:
        word = "within one seed standard deviation of"
    elif diff > 0:
        word = "above"
    else:
        word = "below"
    rec = {"psnr_diff": diff, "seed_sd": sd, "not_below_minus_sd": diff >= -sd}
    return f"{name}: {diff:+.2f} dB PSNR ({word} the model without it; seed s.d. {sd:.2f} dB).", rec


def ceilings(out: Path, seeds: tuple[int, ...]) -> tuple[list[str], dict]:
    stats = {}
    for s in seeds:
        path = ROOT / "results" / f"study_test_stage2_nat_s{s}" / "nat_val_stats_latest.json"
        stats[s] = json.loads(path.read_text())
    lines = ["| statistic (held-out test photos) | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|" + "---|" * len(seeds))
    for key, label in CEILINGS.items():
        cells = []
        for s in seeds:
            v = stats[s].get(key)
            cells.append("n/a" if v is None else (f"{v:.2f}" if key.startswith("psnr") else f"{v:.4f}"))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return lines, stats


def prior_quality() -> tuple[list[str], dict]:
    logs = sorted((ROOT / "results" / "study_test_stage1_vqgan").glob("test_*.log"))
    if not logs:
        return ["Not run (`results/study_test_stage1_vqgan` missing)."], {}
    text = logs[-1].read_text()
    psnr = float(re.findall(r"# psnr: ([\d.]+)", text)[-1])
    used, k, ppl = re.findall(r"(\d+)/(\d+) codes used, perplexity ([\d.]+)", text)[-1]
    rec = {"recon_psnr": psnr, "codes_used": int(used), "codebook_size": int(k), "perplexity": float(ppl)}
    return [
        f"VQGAN reconstruction of the held-out normal-light photos: {psnr:.2f} dB PSNR; {used}/{k} codes used on "
        f"them, perplexity {float(ppl):.1f} (the effective number of codes)."
    ], rec


def stage1_validation() -> list[str]:
    """The VQGAN's validation during training (24 held-out training crops): PSNR and codebook usage."""
    logs = sorted((ROOT / "experiments" / "study_stage1_vqgan").glob("train_*.log"))
    if not logs:
        return []
    text = logs[-1].read_text()
    psnr = re.findall(r"# psnr: ([\d.]+)", text)
    usage = re.findall(r"iter (\d+): (\d+)/(\d+) codes used, perplexity ([\d.]+)", text)
    rows = ["| iteration | validation PSNR (dB) | codes used | perplexity |", "|---|---|---|---|"]
    rows += [f"| {it} | {float(p):.2f} | {u}/{k} | {float(ppl):.1f} |" for (it, u, k, ppl), p in zip(usage, psnr)]
    return ["During training (validation crops, not the test photos; the last checkpoint is used):", "", *rows]


MECHANISM_NOTES = {
    "mech_revision": "revision of committed tokens (`decode.remask_scope`: `new_only` = a committed token is final, "
    "`all` = every round re-predicts every token and the least confident go back under [MASK]); stage II + latent NAT",
    "mech_flow_prior": "the flow's code distribution as a prior in the prediction (`decode.flow_prior` = lambda: "
    "the NAT picks `argmax log p_NAT + lambda log p_flow`; 0 = the NAT alone); stage II + latent NAT",
    "mech_halton": "the order in which masked tokens are committed (`decode.order`: `confidence` = the most confident "
    "first, as MaskGIT; `halton` = a fixed 2-D Halton order that spreads each round's commits over the image); "
    "stage II + latent NAT",
    "mech_soft_codes": "decoding through the soft codes (`feedback.mode`: `hard` = D_MF gets the chosen codes, "
    "`soft` = the expected code under the NAT's distribution at masked positions); GLARE + both NATs, trained hard",
}


def mechanisms(out: Path, stats: dict, seeds: tuple[int, ...]) -> list[str]:
    """Decode-time mechanisms (one checkpoint, ``--sweep``) and the training-time one (``mask_hides_latent``)."""
    lines = []
    for folder, note in MECHANISM_NOTES.items():
        if not (out / folder / "results.json").is_file():
            continue
        lines += [f"{note}:", "", *sweep(out, folder, "setting"), ""]
    lines += decode_variant_accuracy(out, stats, seeds[0])
    hidden = ROOT / "results" / f"study_test_stage2_nat_hidden_s{seeds[0]}" / "nat_val_stats_latest.json"
    if hidden.is_file() and (out / f"stage2_nat_hidden_s{seeds[0]}" / "results.json").is_file():
        h = json.loads(hidden.read_text())
        d = stats[seeds[0]]
        v = _values(out, f"stage2_nat_hidden_s{seeds[0]}")
        base = _values(out, f"stage2_nat_s{seeds[0]}")
        lines += [
            f"The refiner seeing the flow's latent at masked positions (`model.mask_hides_latent: false`, the "
            f"option files' value) against hiding it (`true`, the refiner sees only the conditioning there), "
            f"NAT-II seed {seeds[0]}, stage II + latent NAT on the test photos:",
            "",
            "| mask_hides_latent | PSNR | PSNR GT-mean | masked-token accuracy NAT (flow) |",
            "|---|---|---|---|",
            f"| false | {base['psnr']:.2f} | {base['psnr_gtmean']:.2f} | {d['acc_nat_masked']:.4f} "
            f"({d['acc_flow_masked']:.4f}) |",
            f"| true | {v['psnr']:.2f} | {v['psnr_gtmean']:.2f} | {h['acc_nat_masked']:.4f} "
            f"({h['acc_flow_masked']:.4f}) |",
            "",
        ]
    return lines


def decode_variant_accuracy(out: Path, stats: dict, seed: int) -> list[str]:
    """Masked-token accuracy and PSNR of stage II + latent NAT per decoding variant (``decode.flow_prior`` values,
    ``decode.order: halton``) of NAT-II seed ``seed``."""
    from run_study import FLOW_PRIORS

    found = {"flow_prior 0 (the option files)": stats[seed]}
    named = {f"prior{x:g}": f"flow_prior {x:g}" for x in FLOW_PRIORS} | {"halton": "order halton"}
    for variant, label in named.items():
        path = ROOT / "results" / f"study_test_stage2_nat_{variant}_s{seed}" / "nat_val_stats_latest.json"
        if path.is_file():
            found[label] = json.loads(path.read_text())
    if len(found) == 1:
        return []
    lines = [
        f"Token statistics per decoding variant (NAT-II seed {seed}, test photos; decoded by the VQGAN decoder):",
        "",
        "| decoding | PSNR, NAT's codes | masked-token accuracy NAT | flow | AUROC |",
        "|---|---|---|---|---|",
    ]
    for label, st in found.items():
        lines.append(
            f"| {label} | {st['psnr_nat']:.2f} | {st['acc_nat_masked']:.4f} | {st['acc_flow_masked']:.4f} | "
            f"{st['auroc_score']:.4f} |"
        )
    return [*lines, ""]


def sweep(out: Path, folder: str, column: str = "T") -> list[str]:
    rec = json.loads((out / folder / "results.json").read_text())
    lines = [
        f"| {column} | PSNR | SSIM | PSNR GT-mean | SSIM GT-mean | NIQE | latency (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    niqe = {r["setting"]: r["niqe"] for r in rec["results"] if r["kind"] == "unpaired"}
    for r in (r for r in rec["results"] if r["kind"] == "paired"):
        key, value = r["setting"].split("=", 1)
        t = value if column == "T" else f"`{key.split('.')[-1]}={value}`"
        lines.append(
            f"| {t} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['psnr_gtmean']:.2f} | {r['ssim_gtmean']:.4f} | "
            f"{float(niqe.get(r['setting'], 'nan')):.2f} | {r['latency_ms']:.0f} |"
        )
    return lines


def checks(stats: dict, data: dict, seeds: tuple[int, ...]) -> tuple[list[str], dict]:
    """The three criteria of a NAT that can help and does not hurt, computed per seed / over seeds."""
    gap = [stats[s]["psnr_oracle_all_gt"] - stats[s]["psnr_oracle_flow_codes"] for s in seeds]
    acc = [(stats[s]["acc_nat_masked"], stats[s]["acc_flow_masked"]) for s in seeds]
    nat_latent = data["stage3_nat_latent"]
    diff = nat_latent["mean"]["psnr"] - data["stage3"]["values"]["psnr"]
    sd = nat_latent["sd"]["psnr"]
    rec = {
        "all_teacher_gain_db": gap,
        "prior_informative": min(gap) >= 1.0,
        "nat_acc_vs_flow": acc,
        "nat_acc_at_least_flow": all(a >= f for a, f in acc),
        "latent_nat_minus_glare_db": diff,
        "latent_nat_seed_sd_db": sd,
        "latent_nat_not_below": diff >= -sd,
    }

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = [
        f"- All teacher codes vs the flow's codes: {', '.join(f'{g:+.2f}' for g in gap)} dB (per seed's test run; "
        f"the prior is informative when >= +1 dB): {mark(rec['prior_informative'])}.",
        "- Masked-token accuracy NAT vs flow: "
        + ", ".join(f"{a:.3f} vs {f:.3f}" for a, f in acc)
        + f": {mark(rec['nat_acc_at_least_flow'])} (NAT at least the flow's on every seed).",
        f"- GLARE + latent NAT minus GLARE: {diff:+.2f} dB, seed s.d. {sd:.2f} dB: "
        f"{mark(rec['latent_nat_not_below'])} (not below GLARE by more than one seed s.d.).",
    ]
    return lines, rec


def write_report(out: Path, seeds: tuple[int, ...]) -> Path:
    """Write ``report.md``, ``study.json``, ``grid.png`` and ``curves.png`` into ``out``; return the report path."""
    jobs = json.loads((out / "jobs.json").read_text()) if (out / "jobs.json").is_file() else {}
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    t1, data = table_i(out, seeds)
    ceil_lines, stats = ceilings(out, seeds)
    check_lines, check_rec = checks(stats, data, seeds)
    prior_lines, prior_rec = prior_quality()
    v_lat, r_lat = _verdict("GLARE + latent NAT vs GLARE", data["stage3_nat_latent"], data["stage3"])
    v_both, r_both = _verdict("GLARE + both NATs vs GLARE", data["stage3_nat"], data["stage3"])
    v_s2, r_s2 = _verdict("stage II + latent NAT vs stage II", data["stage2_nat"], data["stage2"])
    # experiment names: train_stage2_nat_s10 -> study_stage2_nat_s10 (the option files' names)
    trainings = [(n.replace("train_", "study_", 1), "") for n in jobs if n.startswith("train_")]
    n_train, n_test = (len(list((DATA / split / "high").glob("*.png"))) for split in ("our485", "eval15"))
    lines = [
        "# glare-nat proxy study",
        "",
        f"Measured by `make study` (`python scripts/run_study.py`): {R.machine()}. Wall time "
        f"{run.get('wall_s', float('nan')):.0f} s with {run.get('jobs', '?')} jobs at a time"
        + (f"; trained and evaluated at commit `{run['commit']}`" if "commit" in run else "")
        + ". Other CPUs give other digits.",
        "",
    ]
    if run.get("smoke"):
        lines += ["**Smoke run (`--smoke`): a few iterations per training; these numbers mean nothing.**", ""]
    lines += [
        "## Data",
        "",
        f"`{DATA.relative_to(ROOT)}` (`scripts/make_study_data.py`): {n_train}"
        " training crops of 12 scikit-image photos (24 of them held out of every training for validation and NAT "
        f"calibration) and {n_test} other photos held out whole as "
        "the test split, darkened by the demo's camera model. All numbers below are on the test photos; no "
        "checkpoint or threshold was chosen on them.",
        "",
        "## Table I: every stage, both metric protocols",
        "",
        *t1,
        "",
        "NAT rows: mean ± sample standard deviation over the seeds (NAT-II and NAT-III trainings; stages I-III are "
        "shared). NIQE (lower = more natural) on the low-light test inputs without their references.",
        "",
        f"- {v_s2}",
        f"- {v_lat}",
        f"- {v_both}",
        f"- The source documents report +{SOURCE_GAINS['latent']:.2f} dB (latent NAT) and "
        f"+{SOURCE_GAINS['both']:.2f} dB (both) on LOL-v1 at full scale.",
        "",
        f"## Table II: decoding rounds T (NAT-II seed {seeds[0]}, one checkpoint)",
        "",
        "Stage II + latent NAT:",
        "",
        *sweep(out, "sweep_stage2_nat"),
        "",
        "GLARE + latent NAT:",
        "",
        *sweep(out, "sweep_stage3_nat_latent"),
        "",
        "## What the latent NAT could gain: ceilings and token statistics",
        "",
        *ceil_lines,
        "",
        "Teacher codes: the VQGAN's codes of the ground truth. Masked positions: the flow codes whose entropy exceeds "
        "tau (calibrated on the validation crops). AUROC 0.5 = the score ranks wrong codes no better than chance.",
        "",
        *check_lines,
        "",
        "## The stage-I prior",
        "",
        *prior_lines,
        "",
        *stage1_validation(),
        "",
        "## NAT mechanisms",
        "",
        *mechanisms(out, stats, seeds),
        "",
    ]
    columns = [
        ("input", "input"),
        ("RRDBNet", "baseline"),
        ("stage II", "stage2"),
        ("II + NAT", f"stage2_nat_s{seeds[0]}"),
        ("stage III", "stage3"),
        ("III + NAT-II", f"stage3_nat_latent_s{seeds[0]}"),
        ("III + both NATs", f"stage3_nat_s{seeds[0]}"),
    ]
    lines += R.figures(out, DATA, columns, trainings, parse_losses, f" (NAT columns: seed {seeds[0]})")
    lines += [
        "## Wall time of each job",
        "",
        "| job | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in jobs.items()],
        "",
    ]
    record = {
        "machine": R.machine(),
        "run": run,
        "jobs_s": jobs,
        "table_i": data,
        "nat2_test_stats": {str(s): v for s, v in stats.items()},
        "checks": {**check_rec, "stage2_nat": r_s2, "latent": r_lat, "both": r_both},
        "prior": prior_rec,
        "source_gains_db": SOURCE_GAINS,
    }
    (out / "study.json").write_text(json.dumps(record, indent=1, default=str))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
