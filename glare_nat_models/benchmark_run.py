"""The evaluation loop of ``glare-nat-benchmark``: every setting x test set x brightness factor -> one result row.

A *setting* is one model configuration: the option file with ``--set`` overrides, plus one value of ``--sweep``
(labelled ``KEY=VALUE``; ``None`` without a sweep). :func:`run_settings` builds the model of each setting in turn
(through a factory, so only one model is in memory), evaluates it on every set with :func:`evaluate` and writes
``per_image.csv``, ``summary.md``, ``results.json`` and the grids (:mod:`glare_nat_models.benchmark_io`).

Per result row: one untimed warm-up call on the row's first image, then ``basicsr.utils.set_random_seed(seed)``
and every image in order. So a row does not depend on the rows before it, and a sweep row equals a separate run
with ``--set`` of that value.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glare_nat_models.benchmark_io import to_u8_rgb, write_csv, write_grid, write_json, write_summary_md
from glare_nat_models.benchmark_metrics import FidScorer, image_metrics, no_reference_metrics, summarise
from glare_nat_models.benchmark_runtime import RuntimeMeter
from glare_nat_models.benchmark_sets import UnpairedSet, safe_name

__all__ = ["OutputFn", "EvalConfig", "evaluate", "run_settings"]

#: ``(lq (1, 3, H, W), gt (1, 3, H, W) or None for unpaired sets) -> (1, 3, H, W)`` output in [0, 1].
OutputFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class EvalConfig:
    """Everything :func:`evaluate` needs besides the model and the sets."""

    out_dir: Path
    brightness: list[float]
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gtmean_mode: str = "bt601"
    lpips_weights: str | None = None
    lpips_device: str = "cpu"
    fid: FidScorer | None = None
    grid_count: int = 3
    save_images: bool = False
    progress: bool = True


def _folder(cfg: EvalConfig, kind: str, setting: str | None, name: str, factor: float) -> Path:
    """``<out>/<kind>[/<setting>]/<set>_x<factor>`` (kind: ``images``; grids add ``.png``)."""
    base = cfg.out_dir / kind / (safe_name(setting) if setting else "")
    return base / f"{safe_name(name)}_x{factor:g}"


def _grid_path(cfg: EvalConfig, setting: str | None, name: str, factor: float) -> Path:
    folder = _folder(cfg, "grids", setting, name, factor)
    return folder.parent / f"{folder.name}.png"


def _row_summary(rows: list[dict], kind: str, setting: str | None, meter: RuntimeMeter) -> dict:
    runtime = meter.summary()
    runtime.pop("n_timed")
    return {"kind": kind, "setting": setting, **summarise(rows)[0], **runtime}


def _paired(name: str, ds, factor: float, output_fn: OutputFn, cfg: EvalConfig, setting: str | None):
    """Rows of one paired set at one brightness factor: ``(per-image rows, summary row, timed seconds)``."""
    from basicsr.utils import set_random_seed
    from tqdm import tqdm

    from glare_nat_data.image_io import write_image

    def pair(i: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
        item = ds[i]
        return item, (item["lq"][None] * factor).clamp(0, 1), item["gt"][None]

    meter = RuntimeMeter(cfg.device)
    meter.warmup(output_fn, *pair(0)[1:])
    set_random_seed(cfg.seed)
    rows, grid, outs, gts = [], [], [], []
    label = f"{setting + ' ' if setting else ''}{name} x{factor:g}"
    for i in tqdm(range(len(ds)), desc=label, unit="img", disable=not cfg.progress):
        item, lq, gt = pair(i)
        out = meter.call(output_fn, lq, gt).float().cpu().clamp(0, 1)
        image = Path(item["lq_path"]).stem
        metrics = image_metrics(out, gt, cfg.gtmean_mode, cfg.lpips_weights, cfg.lpips_device)
        rows.append({"setting": setting, "dataset": name, "brightness": factor, "image": image, **metrics})
        if i < cfg.grid_count:
            grid.append((lq[0], out[0], gt[0]))
        if cfg.save_images:
            write_image(_folder(cfg, "images", setting, name, factor) / f"{image}.png", to_u8_rgb(out[0]))
        if cfg.fid is not None:
            outs.append(out[0])
            gts.append(gt[0])
    if grid:
        write_grid(_grid_path(cfg, setting, name, factor), grid)
    summary = _row_summary(rows, "paired", setting, meter)
    if cfg.fid is not None:
        summary["fid"] = cfg.fid.score(outs, gts)
    return rows, summary, sum(meter.seconds)


def _unpaired(uset: UnpairedSet, output_fn: OutputFn, cfg: EvalConfig, setting: str | None):
    """Rows of one unpaired set (factor 1): ``(per-image rows, summary row, timed seconds)``.

    A file that became unreadable since :func:`~glare_nat_models.benchmark_sets.scan_unpaired` is added to
    ``uset.skipped``; the rest continue.
    """
    from basicsr.utils import set_random_seed
    from tqdm import tqdm

    from glare_nat_data.image_io import write_image
    from glare_nat_models.enhance_cli import output_paths

    folder = _folder(cfg, "images", setting, uset.name, 1.0)
    meter = RuntimeMeter(cfg.device)
    meter.warmup(output_fn, uset.load(uset.files[0]), None)
    set_random_seed(cfg.seed)
    rows, grid = [], []
    label = f"{setting + ' ' if setting else ''}{uset.name}"
    todo = list(zip(uset.files, output_paths(uset.files, folder, "")))
    for path, out_path in tqdm(todo, desc=label, unit="img", disable=not cfg.progress):
        try:
            lq = uset.load(path)
        except (OSError, ValueError) as exc:
            if path.name not in {f for f, _ in uset.skipped}:
                uset.skipped.append((path.name, str(exc)))
            continue
        out = meter.call(output_fn, lq, None).float().cpu().clamp(0, 1)
        rows.append(
            {"setting": setting, "dataset": uset.name, "brightness": 1.0, "image": path.name}
            | no_reference_metrics(out)
        )
        if len(grid) < cfg.grid_count:
            grid.append((lq[0], out[0]))
        if cfg.save_images:
            write_image(out_path, to_u8_rgb(out[0]))
    if not rows:
        raise ValueError(f"--unpaired {uset.name}: no image of '{uset.root}' could be read")
    if grid:
        write_grid(_grid_path(cfg, setting, uset.name, 1.0), grid)
    return rows, _row_summary(rows, "unpaired", setting, meter), sum(meter.seconds)


def evaluate(
    output_fn: OutputFn, paired: dict, unpaired: list[UnpairedSet], cfg: EvalConfig, setting: str | None = None
) -> tuple[list[dict], list[dict], float]:
    """One setting on every set: paired sets at every ``cfg.brightness`` factor, unpaired sets at factor 1.

    Args:
        output_fn: see :data:`OutputFn`.
        paired: ``{name: dataset}`` (:func:`~glare_nat_models.benchmark_sets.load_test_set`); items hold ``lq``,
            ``gt`` ``(3, H, W)`` and ``lq_path``.
        unpaired: :class:`~glare_nat_models.benchmark_sets.UnpairedSet` list.
        setting: the row label (``KEY=VALUE`` of a sweep) or None.

    Returns:
        ``(per-image rows, summary rows, seconds spent in timed calls)``.
    """
    rows, summary, seconds = [], [], 0.0
    for name, ds in paired.items():
        for factor in cfg.brightness:
            r, s, t = _paired(name, ds, factor, output_fn, cfg, setting)
            rows, seconds = rows + r, seconds + t
            summary.append(s)
    for uset in unpaired:
        r, s, t = _unpaired(uset, output_fn, cfg, setting)
        rows, seconds = rows + r, seconds + t
        summary.append(s)
    return rows, summary, seconds


def _niqe_notes(rows: list[dict]) -> list[str]:
    bad: dict[tuple, list[str]] = {}
    for r in rows:
        if "niqe" in r and r["niqe"] != r["niqe"]:  # NaN
            bad.setdefault((r["setting"], r["dataset"]), []).append(r["image"])
    return [
        f"NIQE undefined (fewer than two 96x96 blocks, or no texture) for {len(v)} image(s) of "
        f"{k[1]}{' (' + k[0] + ')' if k[0] else ''}: {', '.join(v)}"
        for k, v in bad.items()
    ]


def run_settings(
    settings: list[tuple[str | None, Callable[[], OutputFn]]],
    paired: dict,
    unpaired: list[UnpairedSet],
    cfg: EvalConfig,
    record: dict,
) -> dict:
    """Evaluate every setting (``(label, factory)``; the factory builds the output function, e.g. loads the
    model) and write ``per_image.csv``, ``summary.md``, ``results.json`` into ``cfg.out_dir``.

    ``record`` (provenance, see :func:`glare_nat_models.benchmark_io.provenance`) is completed with
    ``datasets``, ``results`` (summary rows, runtime columns included), ``fid``, ``timing`` and notes.

    Returns:
        The record as written to ``results.json``.
    """
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    record["datasets"] = {}
    for name, ds in paired.items():
        info = {k: ds.opt.get(k) for k in ("dataroot", "layout", "split")}
        record["datasets"][name] = dict(kind="paired", **info, lq_dir=str(ds.lq_dir), gt_dir=str(ds.gt_dir))
        record["datasets"][name]["n_images"] = len(ds)
    rows, summary, seconds = [], [], 0.0
    for label, factory in settings:
        output_fn = factory()
        r, s, t = evaluate(output_fn, paired, unpaired, cfg, label)
        rows, summary, seconds = rows + r, summary + s, seconds + t
        del output_fn  # the model goes with it, before the next setting is built
        gc.collect()
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    for uset in unpaired:
        failed_later = {f for f, _ in uset.skipped} & {p.name for p in uset.files}  # readable at scan time only
        record["datasets"][uset.name] = {
            "kind": "unpaired",
            "root": str(uset.root),
            "n_images": len(uset.files) - len(failed_later),
            "skipped": [{"file": f, "error": e} for f, e in uset.skipped],
        }
    record["fid"] = {
        (f"{s['setting']} " if s["setting"] else "") + f"{s['dataset']}@{s['brightness']:g}": s["fid"]
        for s in summary
        if "fid" in s
    }
    record["results"] = summary
    record["timing"] = {"output_seconds_total": seconds, "output_seconds_per_image": seconds / max(len(rows), 1)}
    record["notes"] = record.get("notes", []) + _niqe_notes(rows)
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_csv(cfg.out_dir / "per_image.csv", rows)
    write_summary_md(cfg.out_dir / "summary.md", summary, record)
    write_json(cfg.out_dir / "results.json", record)
    return record
