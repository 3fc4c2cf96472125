"""``glare-nat-benchmark``: evaluate one model on paired test sets (both protocols) and unpaired photo folders
(no-reference metrics), optionally over a sweep of one option, with runtime columns and a provenance record.

Usage::

    python scripts/benchmark_lol.py -opt options/test_glare_lol.yml --lolv1 datasets/LOL \\
        --lolv2-real datasets/LOLv2 --lolv2-synthetic datasets/LOLv2 --out results/benchmark/glare \\
        [--folders NAME=ROOT] [--unpaired DICM=datasets/DICM] [--brightness 0.3,0.7,1.0] \\
        [--set KEY=VALUE] [--sweep network_g.nat2.decode.iters=2,4,6] \\
        [--lpips-weights alexnet.pth] [--fid-inception pt_inception.pth]

The model is the one the option file names (``path.pretrain_network_*``): the benchmark never selects
checkpoints. Paired sets (``--lolv1``, ``--lolv2-real``, ``--lolv2-synthetic``, ``--folders`` for any
``<root>/{low,high}`` tree) give one row per brightness factor (input ``clip(factor * low, 0, 1)``; 1.0 is the
standard benchmark), with PSNR / SSIM (/ LPIPS / FID) in the plain and the GT-mean protocol. Unpaired sets
(``--unpaired``, a folder of photos without ground truth) give one row each, at factor 1, with NIQE, mean
brightness and colourfulness; unreadable files are named and skipped. ``--sweep KEY=V1,V2`` evaluates one model
per value (one labelled row per value and set); ``--set KEY=VALUE`` overrides an option for every row. Every row
has the median latency and the peak memory of the model call (:mod:`glare_nat_models.benchmark_runtime`).
``--identity`` (output = input) and ``--gt-as-output`` (output = ground truth) need no model.

Written to ``--out``: ``per_image.csv``, ``summary.md``, ``results.json`` (numbers plus the definition of every
metric, git commit, option-file and checkpoint SHA-256, overrides, seed, package versions, device, determinism
flags), ``grids/`` (input | output | GT, or input | output, for the first ``--grid-count`` images) and optionally
every output image (``--save-images``). Re-running with the same arguments on CPU gives identical CSV / JSON
numbers; only ``created``, ``timing`` and the runtime columns differ.

Modules: :mod:`~glare_nat_models.benchmark_metrics` (metrics and their definitions),
:mod:`~glare_nat_models.benchmark_sets` (test sets), :mod:`~glare_nat_models.benchmark_run` (the loop),
:mod:`~glare_nat_models.benchmark_io` (provenance and files), :mod:`~glare_nat_models.benchmark_runtime`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

import glare_nat_arch  # noqa: F401  (BasicSR import aliases before basicsr)
from glare_nat_models.benchmark_io import checkpoint_hashes, device_info, provenance, sha256_file
from glare_nat_models.benchmark_metrics import (
    PROTOCOLS,
    FidScorer,
    frechet_distance,
    image_metrics,
    no_reference_metrics,
    summarise,
)
from glare_nat_models.benchmark_run import EvalConfig, OutputFn, evaluate, run_settings
from glare_nat_models.benchmark_runtime import RUNTIME_DEFINITION
from glare_nat_models.benchmark_sets import load_test_set, parse_named_path, scan_unpaired
from glare_nat_models.enhance_cli import parse_overrides, parse_tile
from glare_nat_models.inference import (
    estimate_bytes_per_pixel,
    load_model_from_options,
    load_options,
    model_forward_fn,
    pretrain_paths,
    resolve_precision,
    run_enhancer,
    select_device,
)
from glare_nat_models.launcher import normalise_argv

__all__ = [
    "PROTOCOLS",
    "TEST_SETS",
    "image_metrics",
    "no_reference_metrics",
    "summarise",
    "load_test_set",
    "scan_unpaired",
    "evaluate",
    "run_settings",
    "parse_sweep",
    "sha256_file",
    "provenance",
    "FidScorer",
    "frechet_distance",
    "main",
]

#: CLI flag -> LOLPairedDataset layout (``--folders`` sets use the ``folders`` layout).
TEST_SETS = {"lolv1": "lolv1", "lolv2_real": "lolv2_real", "lolv2_synthetic": "lolv2_synthetic"}


def parse_sweep(items: list[str] | None) -> tuple[str, list[tuple[str, Any]]] | None:
    """``['KEY=V1,V2,...']`` -> ``(KEY, [(text, yaml-parsed value), ...])``; None without ``--sweep``.

    Raises ValueError for several ``--sweep`` flags, a missing ``=``, an empty or repeated value.
    """
    import yaml

    if not items:
        return None
    if len(items) > 1:
        raise ValueError(f"give one --sweep KEY=V1,V2,... (several keys are not combined), got {items}")
    key, sep, values = items[0].partition("=")
    texts = [v.strip() for v in values.split(",")]
    if not sep or not key.strip() or not all(texts):
        raise ValueError(f"--sweep expects KEY=V1,V2,... (e.g. network_g.nat2.decode.iters=2,4,6), got '{items[0]}'")
    if len(set(texts)) != len(texts):
        raise ValueError(f"--sweep '{items[0]}' repeats a value")
    return key.strip(), [(t, yaml.safe_load(t)) for t in texts]


def _key(k: str) -> str:
    return k.replace(":", ".")


def _option_problems(opt_path: str, overrides: dict, where: str) -> list[str]:
    """What :func:`load_model_from_options` would reject, found before anything runs (all of it)."""
    try:
        opt = load_options(opt_path, overrides)
    except (OSError, ValueError) as exc:
        return [str(exc)]
    where = f"option file '{opt_path}'{where}"
    problems = [f"{where} has no '{k}' entry" for k in ("model_type", "network_g") if k not in opt]
    ckpts = pretrain_paths(opt)
    if not ckpts:
        problems.append(f"{where} names no checkpoint (path.pretrain_network_g etc.)")
    problems += [f"{where}: path.{k} = '{p}' does not exist" for k, p in ckpts.items() if not Path(p).is_file()]
    return problems


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--brightness expects comma-separated numbers, got '{text}'") from exc
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--brightness factors must be positive, got '{text}'")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glare-nat-benchmark",
        description="Evaluate a model on paired test sets (PSNR/SSIM/LPIPS, plain and GT-mean protocol) and on "
        "unpaired photo folders (NIQE, brightness, colourfulness), with latency and peak memory.",
    )
    p.add_argument("-opt", "--opt", help="test option YAML naming the checkpoint(s) (not needed for debug modes)")
    p.add_argument("--lolv1", metavar="ROOT", help="LOL-v1 root (eval15/{low,high})")
    p.add_argument("--lolv2-real", metavar="ROOT", help="LOL-v2 root or its Real_captured folder")
    p.add_argument("--lolv2-synthetic", metavar="ROOT", help="LOL-v2 root or its Synthetic folder")
    p.add_argument(
        "--folders",
        action="append",
        metavar="[NAME=]ROOT",
        help="paired set in the 'folders' layout: ROOT/{low,high} (also input/target, Low/Normal, lq/gt); "
        "named by the folder or NAME; repeatable",
    )
    p.add_argument(
        "--unpaired",
        action="append",
        metavar="[NAME=]DIR",
        help="folder of photos without ground truth (NIQE, mean brightness, colourfulness); named by the folder "
        "or NAME; repeatable",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option, e.g. network_g:x=1")
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2,...",
        help="evaluate the model once per value of one option, one row per value "
        "(e.g. network_g.nat2.decode.iters=2,4,6)",
    )
    p.add_argument("--out", help="output folder (default results/benchmark/<name>)")
    p.add_argument("--brightness", type=_floats, default=[0.3, 0.7, 1.0], help="input scale factors (0.3,0.7,1.0)")
    p.add_argument("--gtmean-mode", choices=("bt601", "official"), default="bt601", help="GT-mean gray weights")
    p.add_argument(
        "--lpips-weights",
        help="local torchvision AlexNet file ('random' = plumbing only); default: "
        "$GLARE_NAT_ALEXNET or the torch hub cache, else LPIPS is skipped",
    )
    p.add_argument("--fid-inception", metavar="PATH", help="local pt_inception-2015-12-05 weights; else no FID")
    p.add_argument("--seed", type=int, help="random seed (default: the option file's manual_seed, else 0)")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA only)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument(
        "--tile",
        type=parse_tile,
        default=None,
        help="tile side in pixels; 0 (default) = whole images; auto = fit free GPU memory (no tiling on CPU)",
    )
    p.add_argument("--tile-overlap", type=int, default=32, help="minimum tile overlap in pixels")
    p.add_argument("--tile-batch", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument("--pad-multiple", type=int, default=4, help="pad H, W to a multiple of this (default 4)")
    p.add_argument("--grid-count", type=int, default=3, help="images per input|output|GT grid (0 = no grids)")
    p.add_argument("--save-images", action="store_true", help="also write every output image")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images of each set (debugging)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    debug = p.add_mutually_exclusive_group()
    debug.add_argument("--identity", action="store_true", help="debug: output = (brightness-scaled) input")
    debug.add_argument("--gt-as-output", action="store_true", help="debug: output = ground truth")
    return p


def _resolve_lpips(option: str | None) -> tuple[str | None, str | None]:
    """``(weights to pass to the metric or None, note)``; never downloads."""
    from glare_nat_models.pretrained import ALEXNET_FILE, RANDOM, resolve_weights

    if option is not None and option.lower() == RANDOM:
        return RANDOM, "LPIPS uses RANDOM AlexNet weights (plumbing only; not the LPIPS metric)"
    try:
        path = resolve_weights(option, "GLARE_NAT_ALEXNET", ALEXNET_FILE, "LPIPS (AlexNet)")
    except FileNotFoundError as exc:
        if option is not None:
            raise
        return None, f"LPIPS skipped: {exc}"
    return str(path), None


class _SetupError(Exception):
    """Every problem of the command line found before anything runs."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(dict.fromkeys(problems))  # in order, without repeats


def _setup(args: argparse.Namespace, mode: str) -> dict:
    """Check the whole command line and load the sets; raise :class:`_SetupError` listing all problems."""
    problems: list[str] = []

    def attempt(fn, *a):
        try:
            return fn(*a)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            problems.append(str(exc))
            return None

    specs = [(n, getattr(args, n), layout) for n, layout in TEST_SETS.items() if getattr(args, n)]
    specs += [(*nd, "folders") for nd in (attempt(parse_named_path, t, "--folders") for t in args.folders or []) if nd]
    unpaired_specs = [nd for nd in (attempt(parse_named_path, t, "--unpaired") for t in args.unpaired or []) if nd]
    if not (specs or args.folders or args.unpaired):
        problems.append("give at least one test set: --lolv1, --lolv2-real, --lolv2-synthetic, --folders or --unpaired")
    names = [s[0] for s in specs] + [u[0] for u in unpaired_specs]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"test set names must be unique, repeated: {repeated} (name a folder with NAME=DIR)")
    if mode == "model" and not args.opt:
        problems.append("-opt is required (or use --identity / --gt-as-output)")
    if mode != "model" and (args.set or args.sweep):
        problems.append("--set / --sweep change model options: they need -opt, not --identity / --gt-as-output")
    if mode == "gt-as-output" and unpaired_specs:
        problems.append("--gt-as-output needs ground truth; --unpaired sets have none")
    overrides = attempt(parse_overrides, args.set) or {}
    sweep = attempt(parse_sweep, args.sweep)
    if sweep and _key(sweep[0]) in {_key(k) for k in overrides}:
        problems.append(f"--sweep key '{sweep[0]}' is also given with --set")
    settings = [(None, overrides)]
    if sweep:
        settings = [(f"{sweep[0]}={text}", {**overrides, sweep[0]: value}) for text, value in sweep[1]]
    if mode == "model" and args.opt:
        for label, ov in settings:
            problems += _option_problems(args.opt, ov, f" (setting {label})" if label else "")
    paired = {n: ds for n, root, layout in specs if (ds := attempt(load_test_set, n, root, layout, args.max_images))}
    unpaired = [u for u in (attempt(scan_unpaired, n, p, args.max_images) for n, p in unpaired_specs) if u]
    device = attempt(select_device, args.device)
    lpips = attempt(_resolve_lpips, args.lpips_weights)
    fid = attempt(FidScorer, args.fid_inception, device) if args.fid_inception and device is not None else None
    if problems:
        raise _SetupError(problems)
    opt = load_options(args.opt, overrides) if args.opt else {}
    seed = args.seed if args.seed is not None else int(opt.get("manual_seed") or 0)
    dtype = resolve_precision(device, args.fp16, args.bf16)
    return dict(paired=paired, unpaired=unpaired, settings=settings, sweep=sweep, overrides=overrides, opt=opt,
                seed=seed, device=device, dtype=dtype, lpips=lpips, fid=fid)  # fmt: skip


def _model_factory(args: argparse.Namespace, overrides: dict, plan: dict):
    """``() -> output_fn`` building the model of one setting (padding / tiling as the enhance CLI)."""
    device, tiling = plan["device"], dict(tile=args.tile, overlap=args.tile_overlap, multiple=args.pad_multiple)
    tiling["tile_batch"] = args.tile_batch

    def build() -> OutputFn:
        model = load_model_from_options(args.opt, {**overrides, "manual_seed": plan["seed"]}, device)
        fn = model_forward_fn(model, plan["dtype"])
        kw = dict(tiling)
        if args.tile == "auto" and device.type == "cuda":  # measure the model's memory once, not per image
            kw["bytes_per_pixel"] = estimate_bytes_per_pixel(fn, 3, device)

        def output_fn(lq: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor:
            return run_enhancer(fn, lq, device, **kw)

        return output_fn

    return build


def _identity(lq: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor:
    return lq


def _gt(lq: torch.Tensor, gt: torch.Tensor | None) -> torch.Tensor:
    return gt


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 setup error)."""
    args = build_parser().parse_args(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    mode = "identity" if args.identity else "gt-as-output" if args.gt_as_output else "model"
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        plan = _setup(args, mode)
        settings = [(label, _model_factory(args, ov, plan)) for label, ov in plan["settings"]]
        if mode == "model":  # the first model now, so that a broken option stops the run before any output
            first = [settings[0][1]()]
            settings[0] = (settings[0][0], first.pop)
        else:
            settings = [(None, lambda: _identity if mode == "identity" else _gt)]
    except _SetupError as exc:
        for problem in exc.problems:
            print(f"glare-nat-benchmark: error: {problem}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"glare-nat-benchmark: error: {exc}", file=sys.stderr)
        return 2
    lpips_weights, lpips_note = plan["lpips"]
    notes = [lpips_note] if lpips_note else []
    if plan["fid"] is None and plan["paired"]:
        notes.append("FID skipped: no --fid-inception weights given (nothing is downloaded)")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for u in plan["unpaired"]:
        for f, e in u.skipped:
            print(f"--unpaired {u.name}: skipping unreadable '{f}': {e}", file=sys.stderr)
    opt, device, dtype, sweep = plan["opt"], plan["device"], plan["dtype"], plan["sweep"]
    name = (opt.get("name") or Path(args.opt).stem) if mode == "model" else mode
    out_dir = Path(args.out or Path("results") / "benchmark" / name)
    record = provenance(args.opt, mode, plan["seed"], plan["overrides"])
    wanted = (["plain", "gtmean", "fid"] if plan["paired"] else []) + ["brightness"]
    wanted += ["niqe", "mean_brightness", "colourfulness"] if plan["unpaired"] else []
    record.update(
        command=[Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        device=device_info(device, dtype),
        inference={k: getattr(args, k) for k in ("tile", "tile_overlap", "tile_batch", "pad_multiple")},
        gtmean_mode=args.gtmean_mode,
        brightness=args.brightness,
        protocols={k: PROTOCOLS[k].format(mode=args.gtmean_mode) for k in wanted} | {"runtime": RUNTIME_DEFINITION},
        notes=notes,
    )
    if sweep:
        cache: dict[str, str] = {}
        record["sweep"] = {"key": sweep[0], "values": [t for t, _ in sweep[1]]}
        record["settings"] = [
            {"setting": label, "overrides": ov, "checkpoints": checkpoint_hashes(load_options(args.opt, ov), cache)}
            for label, ov in plan["settings"]
        ]
    cfg = EvalConfig(
        out_dir=out_dir,
        brightness=args.brightness,
        seed=plan["seed"],
        device=device,
        gtmean_mode=args.gtmean_mode,
        lpips_weights=lpips_weights,
        lpips_device=str(device),
        fid=plan["fid"],
        grid_count=args.grid_count,
        save_images=args.save_images,
        progress=not args.quiet,
    )
    try:
        run_settings(settings, plan["paired"], plan["unpaired"], cfg, record)
    except (OSError, ValueError, KeyError) as exc:  # e.g. a later sweep value the network rejects
        print(f"glare-nat-benchmark: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir}/summary.md, per_image.csv, results.json", file=sys.stderr)
    print((out_dir / "summary.md").read_text(encoding="utf-8").split("\n## Runtime")[0])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
