#!/usr/bin/env python
"""Inference latency / peak memory of GLARE: ours (SDPA attention) vs the official explicit-attention computation.

Builds the full inference network (GLARENet + GLAREVQGAN, official sizes unless ``--tiny``, random weights fixed by
``--seed``) and a deep copy whose 11 attention blocks compute softmax(QK^T c^-0.5) V with the explicit N x N map
as the official code does (:class:`perf_tools.ExplicitAttnBlock`). For every precision and size it
reports, from one run: median latency over ``--repeats`` after ``--warmup`` calls, peak memory, the output
difference and the code-index agreement of the two, and the ratios ours/reference. With ``--train`` it also
prints the training throughput (iterations/s, forward + backward + optimizer step) of Stages I, II and III.

    python scripts/bench_inference.py --device cpu --sizes 600x400 --repeats 2        # CPU, official sizes
    python scripts/bench_inference.py --device cuda --train                           # GPU: fp16, bf16, fp32
    python scripts/bench_inference.py --tiny --train                                  # CI smoke (seconds)

Sizes are WIDTHxHEIGHT (LOL images are 600x400; 1080p is 1920x1080); the input is padded to a multiple of 4 as in
GLARENet, without the official extra 20 px reflect border. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
of the variant alone on the GPU (its weights included); on CPU the peak RSS of a separate subprocess per variant
(whole process: Python, torch, weights, activations) and its increase over the RSS just before the first call.
``--amp`` (CUDA only; CPU runs float32): fp16 = the official inference autocast. The reference always runs eagerly
in contiguous memory format (as official); ``--channels-last`` and ``--compile`` apply to ours.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import tempfile

if importlib.util.find_spec("glare_nat_models") is None:  # not pip-installed: use this checkout
    sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))  # perf_tools

import perf_tools as perf  # noqa: E402
import torch  # noqa: E402

import glare_nat_arch  # noqa: E402,F401  (compat shims before basicsr)
from glare_nat_arch.blocks import AttnBlock  # noqa: E402
from glare_nat_models.inference import autocast_context, select_device, set_malloc_mmap_threshold  # noqa: E402

GIB = 1024**3
WORKER_TAG = "BENCH_WORKER_RESULT "
#: a 24 GB card (24 GiB): peak tensor memory that leaves room for the CUDA context and allocator fragmentation
FITS_24GB_BYTES = 22 * GIB


# --------------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``'600x400,1920x1080'`` -> ``[(600, 400), (1920, 1080)]`` (width, height)."""
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--sizes: '{part}' is not WIDTHxHEIGHT (e.g. 600x400)") from None
        if w < 4 or h < 4:
            raise argparse.ArgumentTypeError(f"--sizes: '{part}' is too small (at least 4x4)")
        sizes.append((w, h))
    return sizes


def parse_amps(text: str) -> list[str]:
    amps = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in amps if a not in perf.AMP_DTYPES]
    if bad or not amps:
        raise argparse.ArgumentTypeError(f"--amp: {bad or text!r} not in {sorted(perf.AMP_DTYPES)}")
    return amps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="WxH list; default 600x400,1920x1080 on CUDA, 600x400 on CPU, 64x48,96x64 with --tiny",
    )
    p.add_argument(
        "--amp",
        type=parse_amps,
        default=None,
        help="comma list of fp16, bf16, none (CUDA default fp16,bf16,none; CPU: none only)",
    )
    p.add_argument("--channels-last", action="store_true", help="ours in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile ours")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 CUDA, 1 CPU)")
    p.add_argument("--tiny", action="store_true", help="small architecture and sizes (CI smoke test)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (both variants share the weights)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-inference", action="store_true", help="skip the inference comparison")
    p.add_argument("--attn", action=argparse.BooleanOptionalAction, default=None, help="also time one AttnBlock alone")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler op table of both variants")
    p.add_argument(
        "--trace-memory",
        action="store_true",
        help="print the largest live tensors at each variant's memory peak and the modules that allocated them",
    )
    p.add_argument("--train", action="store_true", help="also measure training throughput of stages I-III")
    p.add_argument("--stages", default="I,II,III", help="stages for --train (default I,II,III)")
    p.add_argument("--train-iters", type=int, default=None, help="timed training steps (default 10 CUDA, 2 CPU)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument(
        "--mmap-threshold-mb",
        type=float,
        default=0.0,
        help="CPU: glibc mmap threshold for both variants' processes (e.g. 4; default 0 = glibc's dynamic one)",
    )
    # internal: one CPU variant in a subprocess (fresh RSS high-water mark)
    p.add_argument("--worker", choices=("reference", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--worker-size", type=parse_sizes, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    if args.sizes is None:
        args.sizes = parse_sizes("64x48,96x64" if args.tiny else ("600x400,1920x1080" if cuda else "600x400"))
    if args.amp is None:
        args.amp = ["fp16", "bf16", "none"] if cuda else ["none"]
    if not cuda and args.amp != ["none"]:
        print(f"note: --amp {','.join(args.amp)} ignored on CPU (autocast is CUDA-only here); running float32")
        args.amp = ["none"]
    args.repeats = args.repeats or (10 if cuda else 3)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.train_iters = args.train_iters or (10 if cuda else 2)
    args.attn = cuda if args.attn is None else args.attn


# --------------------------------------------------------------------------------------------------------------
# one variant
# --------------------------------------------------------------------------------------------------------------
def variant_networks(variant: str, tiny: bool, seed: int):
    net, vq = perf.build_inference_networks(tiny=tiny, seed=seed)
    if variant == "reference":
        net, vq = perf.with_explicit_attention(net), perf.with_explicit_attention(vq)
    return net, vq


def weight_checksum(*modules: torch.nn.Module) -> float:
    return float(sum(p.double().abs().sum() for m in modules for p in m.state_dict().values()))


def run_variant(net, vq, variant, size, amp, device, args) -> dict:
    """Time one variant at one size; returns a result dict (``status`` 'ok' or 'OOM') plus output / indices."""
    w, h = size
    ours = variant == "ours"
    x = perf.make_low_light_image(h, w, seed=2).to(device)
    net.to(device)
    vq.to(device)
    codes: list[torch.Tensor] = []
    handle = perf.capture_code_indices(vq, codes)
    fn = perf.make_enhancer(
        net,
        vq,
        device,
        perf.AMP_DTYPES[amp],
        channels_last=ours and args.channels_last,
        compile_net=ours and args.compile,
    )
    res = {"variant": variant, "size": f"{w}x{h}", "amp": amp}
    try:
        m = perf.measure(lambda: fn(x), device, warmup=args.warmup, repeats=args.repeats)
        res.update(status="ok", median_s=m.median, times_s=m.times, cpu_median_s=m.cpu_median)
        res.update(peak_bytes=m.peak_bytes, base_bytes=m.base_bytes)
        res.update(reserved_bytes=m.reserved_bytes, output=m.output.float().cpu(), indices=codes[-1])
    except torch.OutOfMemoryError:
        res.update(status="OOM")
    except RuntimeError as exc:  # CPU allocator failure
        if "alloc" not in str(exc).lower():
            raise
        res.update(status="OOM", error=str(exc).splitlines()[0])
    finally:
        handle.remove()
        m = fn = x = None
        gc.collect()
        if device.type == "cuda":
            net.to("cpu")
            vq.to("cpu")
            torch.cuda.empty_cache()
    return res


def worker_main(args: argparse.Namespace) -> int:
    """CPU subprocess: build one variant, time it, print its result as JSON, save output + indices."""
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mmap_threshold_mb > 0 and not set_malloc_mmap_threshold(args.mmap_threshold_mb):
        print("note: --mmap-threshold-mb needs glibc; ignored", file=sys.stderr)
    net, vq = variant_networks(args.worker, args.tiny, args.seed)
    checksum = weight_checksum(net, vq)
    gc.collect()
    rss_before = perf.rss_bytes()
    res = run_variant(net, vq, args.worker, args.worker_size[0], "none", device, args)
    res.update(rss_before=rss_before, peak_rss=perf.peak_rss_bytes(), checksum=checksum)
    if res["status"] == "ok":
        torch.save({"output": res.pop("output"), "indices": res.pop("indices")}, args.worker_out)
    print(WORKER_TAG + json.dumps(res), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------------------
# inference comparison
# --------------------------------------------------------------------------------------------------------------
def reference_fits_cpu(size: tuple[int, int]) -> tuple[bool, str]:
    """Whether two float32 N x N maps (the reference's peak) fit in 90 % of MemAvailable (avoid the OOM killer)."""
    w, h = size
    n = ((h + 3) // 4) * ((w + 3) // 4)
    need = 2 * 4 * n * n
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return (
        need < 0.9 * avail,
        f"needs >= {need / GIB:.1f} GiB for two {n}x{n} float32 maps, {avail / GIB:.1f} available",
    )


def run_cpu_worker(variant: str, size: tuple[int, int], args: argparse.Namespace, out_path: str) -> dict:
    cmd = [sys.executable, osp.abspath(__file__), "--worker", variant, "--worker-size", "{}x{}".format(*size)]
    cmd += ["--worker-out", out_path, "--seed", str(args.seed), "--repeats", str(args.repeats)]
    cmd += ["--warmup", str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += [flag for flag, on in (("--tiny", args.tiny), ("--channels-last", args.channels_last)) if on]
    cmd += ["--compile"] if args.compile else []
    cmd += ["--mmap-threshold-mb", str(args.mmap_threshold_mb)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            res = json.loads(line[len(WORKER_TAG) :])
            if res["status"] == "ok":
                saved = torch.load(out_path, weights_only=True)
                res.update(output=saved["output"], indices=saved["indices"])
            return res
    if proc.returncode in (-9, 137):
        return {"variant": variant, "size": "{}x{}".format(*size), "amp": "none", "status": "OOM", "error": "killed"}
    raise RuntimeError(f"benchmark worker {variant} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def compare(ref: dict, ours: dict) -> dict:
    """Ratios ours/reference and output / code-index agreement (where both ran)."""
    cmp = {"size": ours["size"], "amp": ours["amp"], "reference": ref["status"], "ours": ours["status"]}
    if ref["status"] != "ok" or ours["status"] != "ok":
        return cmp
    cmp["latency_ratio"] = ours["median_s"] / ref["median_s"]
    cmp["cpu_time_ratio"] = ours["cpu_median_s"] / ref["cpu_median_s"]
    key = "peak_bytes" if ours.get("peak_bytes") is not None else "peak_rss"
    cmp["peak_ratio"] = ours[key] / ref[key]
    if key == "peak_rss":
        cmp["peak_increase_ratio"] = (ours["peak_rss"] - ours["rss_before"]) / (ref["peak_rss"] - ref["rss_before"])
    cmp.update(perf.output_difference(ours["output"], ref["output"]))
    cmp.update(perf.code_agreement(ours["indices"], ref["indices"]))
    return cmp


def inference_comparison(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], list[dict]]:
    runs, comps = [], []
    if device.type == "cuda":
        net, vq = perf.build_inference_networks(tiny=args.tiny, seed=args.seed)
        ref_net, ref_vq = perf.with_explicit_attention(net), perf.with_explicit_attention(vq)
        for amp in args.amp:
            for size in args.sizes:
                ref = run_variant(ref_net, ref_vq, "reference", size, amp, device, args)
                ours = run_variant(net, vq, "ours", size, amp, device, args)
                runs += [ref, ours]
                comps.append(compare(ref, ours))
                print_run(ref, device), print_run(ours, device), print_ratio(comps[-1]), sys.stdout.flush()
        return runs, comps
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            fits, why = reference_fits_cpu(size)
            if fits:
                ref = run_cpu_worker("reference", size, args, osp.join(tmp, "ref.pt"))
            else:
                ref = {"variant": "reference", "size": "{}x{}".format(*size), "amp": "none", "status": "OOM"}
                ref["error"] = f"not run: {why}"
            ours = run_cpu_worker("ours", size, args, osp.join(tmp, "ours.pt"))
            if ref["status"] == "ok" and ref["checksum"] != ours["checksum"]:
                raise RuntimeError("the two CPU workers built different weights (checksums differ)")
            runs += [ref, ours]
            comps.append(compare(ref, ours))
            print_run(ref, device), print_run(ours, device), print_ratio(comps[-1]), sys.stdout.flush()
    return runs, comps


def precision_comparison(runs: list[dict]) -> list[dict]:
    """Ours under fp16 / bf16 autocast against ours in float32, per size."""
    ours = {(r["size"], r["amp"]): r for r in runs if r["variant"] == "ours" and r["status"] == "ok"}
    rows = []
    for (size, amp), r in ours.items():
        base = ours.get((size, "none"))
        if amp == "none" or base is None:
            continue
        row = {"size": size, "amp": amp, **perf.output_difference(r["output"], base["output"])}
        row.update(perf.code_agreement(r["indices"], base["indices"]))
        rows.append(row)
        print(
            f"PRECISION ours {amp} vs fp32 size={size}: max|diff|={row['max_abs']:.3e} "
            f"mean|diff|={row['mean_abs']:.3e} rel_l2={row['rel_l2']:.3e} "
            f"codes_differ={row['codes_differ']}/{row['codes_total']}"
        )
    return rows


# --------------------------------------------------------------------------------------------------------------
# attention block alone, training
# --------------------------------------------------------------------------------------------------------------
def measure_or_oom(fn, device: torch.device, warmup: int, repeats: int) -> perf.Measurement | None:
    """:func:`perf.measure`, or None when the device runs out of memory."""
    try:
        return perf.measure(fn, device, warmup=warmup, repeats=repeats)
    except torch.OutOfMemoryError:
        return None


def release_memory(device: torch.device) -> None:
    """Collect garbage and hand cached CUDA blocks back, so the next variant starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attention_only(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One AttnBlock (official width 512, tiny 128) at each size's latent resolution (H/4 x W/4), ref vs ours."""
    c = 128 if args.tiny else 512
    torch.manual_seed(0)
    ours = AttnBlock(c).eval().to(device)
    ref = perf.with_explicit_attention(ours)
    rows = []
    for amp in args.amp:
        for w, h in args.sizes:
            x = torch.randn(1, c, (h + 3) // 4, (w + 3) // 4, device=device)
            row = {"size": f"{w}x{h}", "amp": amp, "tokens": x.shape[2] * x.shape[3]}
            for name, block in (("reference", ref), ("ours", ours)):

                def call(block=block, x=x, dtype=perf.AMP_DTYPES[amp]):
                    with torch.inference_mode(), autocast_context(device, dtype):
                        return block(x)

                m = measure_or_oom(call, device, warmup=2, repeats=5)
                row[name] = "OOM" if m is None else {"median_s": m.median, "peak_bytes": m.peak_bytes}
                release_memory(device)
            rows.append(row)
            print("ATTN " + fmt_attn(row))
            sys.stdout.flush()
    return rows


def profile_variants(args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler tables (top ops by self device time on CUDA, CPU time otherwise), first size and precision."""
    from torch.profiler import ProfilerActivity, profile

    w, h = args.sizes[0]
    amp = perf.AMP_DTYPES[args.amp[0]]
    x = perf.make_low_light_image(h, w, seed=2).to(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for variant in ("reference", "ours"):
        net, vq = variant_networks(variant, args.tiny, args.seed)
        ours = variant == "ours"
        fn = perf.make_enhancer(
            net.to(device), vq.to(device), device, amp, ours and args.channels_last, ours and args.compile
        )
        for _ in range(2):
            fn(x)
        with profile(activities=activities) as prof:
            fn(x)
            if cuda:
                torch.cuda.synchronize(device)
        print(f"PROFILE {variant} size={w}x{h} amp={args.amp[0]}")
        print(
            prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=18)
        )
        sys.stdout.flush()
        del net, vq, fn, prof
        gc.collect()
        torch.cuda.empty_cache() if cuda else None


def trace_memory(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Per variant and size (first precision): the peak of live tensor storages in one call and the largest tensors
    alive at that moment, each with the module that allocated it (:class:`~perf_tools.LiveTensorBytes`;
    kernel scratch such as im2col buffers or oneDNN reorders is not visible here, peak RSS / CUDA peaks include it).
    """
    rows = []
    amp = perf.AMP_DTYPES[args.amp[0]]
    for w, h in args.sizes:
        x = perf.make_low_light_image(h, w, seed=2).to(device)
        for variant in ("reference", "ours"):
            if variant == "reference" and device.type == "cpu" and not reference_fits_cpu((w, h))[0]:
                continue
            net, vq = variant_networks(variant, args.tiny, args.seed)
            ours = variant == "ours"
            fn = perf.make_enhancer(net.to(device), vq.to(device), device, amp, ours and args.channels_last, False)
            with perf.LiveTensorBytes(attribute=[net, vq], top=8) as probe:
                fn(x)
            row = {"variant": variant, "size": f"{w}x{h}", "amp": args.amp[0], "peak_bytes": probe.peak}
            row.update(peak_module=probe.peak_module, snapshot=probe.snapshot)
            rows.append(row)
            peak_mib = probe.peak / 2**20
            print(f"MEMTRACE {variant} size={w}x{h}: live tensors peak {peak_mib:.0f} MiB in {probe.peak_module}")
            for shape, mib, where in probe.snapshot:
                print(f"  {mib:8.1f} MiB {str(list(shape)):24s} from {where}")
            sys.stdout.flush()
            del net, vq, fn
            gc.collect()
    return rows


def training_throughput(args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for amp in args.amp[:1]:  # the first precision (fp16 on CUDA by default, as official Stage II/III)
        for stage in stages:
            row = {"stage": stage, "amp": amp}
            for variant in ("reference", "ours"):
                built = perf.make_train_step(stage, device, perf.AMP_DTYPES[amp], variant, args.tiny)
                row.update(batch=built.batch, patch=built.patch)
                m = measure_or_oom(built.step, device, warmup=min(args.warmup, 3) or 1, repeats=args.train_iters)
                row[variant] = (
                    "OOM"
                    if m is None
                    else {"it_per_s": 1.0 / m.median, "median_s": m.median, "peak_bytes": m.peak_bytes}
                )
                built = None
                release_memory(device)
            rows.append(row)
            print("TRAIN " + fmt_train(row))
            sys.stdout.flush()
    return rows


# --------------------------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------------------------
def gib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def print_run(r: dict, device: torch.device) -> None:
    head = f"RUN {r['variant']:9s} size={r['size']} amp={r['amp']}:"
    if r["status"] != "ok":
        print(f"{head} {r['status']} {r.get('error', '')}".rstrip())
        return
    times = ", ".join(f"{t:.4g}" for t in r["times_s"])
    if device.type == "cuda":
        mem = f"peak {gib(r['peak_bytes'])} (weights+input {gib(r['base_bytes'])}, reserved {gib(r['reserved_bytes'])})"
    else:
        mem = f"peak RSS {gib(r['peak_rss'])} (+{gib(r['peak_rss'] - r['rss_before'])} over {gib(r['rss_before'])})"
    cpu = "" if device.type == "cuda" else f" (CPU time {r['cpu_median_s']:.4g} s)"
    print(f"{head} median {r['median_s']:.4g} s [{times}]{cpu}, {mem}")


def print_ratio(c: dict) -> None:
    head = f"RATIO ours/reference size={c['size']} amp={c['amp']}:"
    if "latency_ratio" not in c:
        print(f"{head} reference {c['reference']}, ours {c['ours']}")
        return
    extra = f" peak_increase={c['peak_increase_ratio']:.3f}" if "peak_increase_ratio" in c else ""
    extra += f" cpu_time={c['cpu_time_ratio']:.3f}" if c["amp"] == "none" and "peak_increase_ratio" in c else ""
    print(
        f"{head} latency={c['latency_ratio']:.3f} peak_memory={c['peak_ratio']:.3f}{extra} "
        f"max|diff|={c['max_abs']:.3e} rel_l2={c['rel_l2']:.3e} codes_differ={c['codes_differ']}/{c['codes_total']}"
    )


def fmt_attn(row: dict) -> str:
    parts = [f"AttnBlock size={row['size']} (N={row['tokens']}) amp={row['amp']}:"]
    for name in ("reference", "ours"):
        v = row[name]
        parts.append(f"{name} OOM" if v == "OOM" else f"{name} {v['median_s'] * 1e3:.2f} ms ({gib(v['peak_bytes'])})")
    return " ".join(parts)


def fmt_train(row: dict) -> str:
    parts = [f"stage {row['stage']} patch {row['patch']} batch {row['batch']} amp={row['amp']}:"]
    for name in ("reference", "ours"):
        v = row[name]
        parts.append(f"{name} OOM" if v == "OOM" else f"{name} {v['it_per_s']:.3f} it/s ({gib(v['peak_bytes'])})")
    if isinstance(row["reference"], dict) and isinstance(row["ours"], dict):
        parts.append(f"speed-up x{row['ours']['it_per_s'] / row['reference']['it_per_s']:.2f}")
    return " ".join(parts)


def target_checks(comps: list[dict], prec: list[dict], runs: list[dict], device: torch.device) -> list[str]:
    """The performance targets of docs/performance.md, evaluated on the measured numbers (PASS / FAIL / n/a)."""

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    by = {(c["size"], c["amp"]): c for c in comps}
    lines = []
    if device.type == "cpu":
        c = by.get(("600x400", "none"), {})
        ok = True if "latency_ratio" in c else None  # n/a when 600x400 was not compared in this run
        # the memory of the call: RSS increase over the process before it (weights and libraries, the same for both
        # variants, excluded); the whole-process ratio is printed on the RATIO line as peak_memory
        inc = f" (RSS increase ratio {c['peak_increase_ratio']:.3f})" if ok else ""
        fits = ok and c["peak_increase_ratio"] <= 0.25
        lines.append(f"TARGET cpu 600x400 peak memory of the call <= 1/4 of reference{inc}: {verdict(fits)}")
        lines.append(f"TARGET cpu 600x400 latency no worse than reference: {verdict(ok and c['latency_ratio'] <= 1.0)}")
        flips = f" (codes differing {c['codes_differ']}/{c['codes_total']})" if "codes_differ" in c else ""
        lines.append(f"TARGET cpu 600x400 outputs equal within 1e-4{flips}: {verdict(ok and c['max_abs'] <= 1e-4)}")
        return lines
    c = by.get(("600x400", "fp16"), {})
    ok = True if "latency_ratio" in c else None
    lines.append(f"TARGET gpu fp16 600x400 latency <= 1/2 of reference: {verdict(ok and c['latency_ratio'] <= 0.5)}")
    lines.append(f"TARGET gpu fp16 600x400 peak memory <= 1/4 of reference: {verdict(ok and c['peak_ratio'] <= 0.25)}")
    for row in prec:
        if row["amp"] == "bf16":
            lines.append(
                f"TARGET gpu bf16 vs fp32 {row['size']} rel_l2 <= 1e-2: {verdict(row['rel_l2'] <= 1e-2)} "
                f"(rel_l2 {row['rel_l2']:.2e}, max|diff| {row['max_abs']:.2e})"
            )
    for r in runs:
        if r["variant"] == "ours" and r["size"] == "1920x1080" and r["status"] == "ok":
            fits = r["peak_bytes"] <= FITS_24GB_BYTES
            lines.append(
                f"TARGET gpu {r['amp']} 1920x1080 fits in 24 GB untiled (peak allocated <= 22 GiB): {verdict(fits)} "
                f"(peak allocated {gib(r['peak_bytes'])}; the caching allocator reserved {gib(r['reserved_bytes'])} "
                "on this larger GPU, cached blocks it frees and retries with before failing)"
            )
    return lines


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        total = torch.cuda.get_device_properties(device).total_memory
        return f"cuda {name} ({total / GIB:.0f} GiB)"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu {cpu}, {torch.get_num_threads()} threads"


def jsonable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)} for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fill_defaults(args, device)
    print(
        f"device: {describe_device(device)} | torch {torch.__version__} | python {platform.python_version()} | "
        f"config {'tiny' if args.tiny else 'official'} | sizes {','.join(f'{w}x{h}' for w, h in args.sizes)} | "
        f"amp {','.join(args.amp)} | warmup {args.warmup} repeats {args.repeats} | channels_last "
        f"{args.channels_last} | compile {args.compile}"
    )
    sys.stdout.flush()
    runs, comps, prec, attn, train, memtrace = [], [], [], [], [], []
    if not args.no_inference:
        runs, comps = inference_comparison(args, device)
        prec = precision_comparison(runs)
    if args.attn:
        attn = attention_only(args, device)
    if args.profile:
        profile_variants(args, device)
    if args.trace_memory:
        memtrace = trace_memory(args, device)
    if args.train:
        train = training_throughput(args, device)
    checks = target_checks(comps, prec, runs, device) if not args.no_inference and not args.tiny else []
    for line in checks:
        print(line)
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": describe_device(device),
                    "torch": torch.__version__,
                    "args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                    "runs": jsonable(runs),
                    "ratios": jsonable(comps),
                    "precision": prec,
                    "attention_only": attn,
                    "training": train,
                    "memory_trace": memtrace,
                    "targets": checks,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
