"""Latency and peak memory of GLARE's inference paths with and without the NAT refiners (docs/nat.md "Measured cost").

Paths, batch 1, one run of this script (ratios are taken within the run):

* ``stage II``: ``E_c`` -> reverse flow -> VQGAN decoder RGB (GLARE Stage II);
* ``stage II + NAT-II``: the same with the latent NAT between flow and decoder (:meth:`GLARENATFlowNet.enhance`);
* ``stage III``: full GLARE (:class:`GLARENet`);
* ``stage III + NAT-II`` and ``stage III + NAT-II + NAT-III``: :class:`GLARENATNet`;
* ``NAT-II only`` / ``NAT-III only``: the refiners alone on precomputed inputs.

Networks have the official GLARE sizes and the docs/nat.md "Options" NAT defaults, with random weights (no checkpoint is
needed: latency and memory do not depend on the weights, except through the masked fraction, which is fixed by
calibrating ``tau`` / ``tau3`` on the input to the default ``rho_target`` = 25%). ``--tiny`` uses tiny networks (CI
smoke test).

Latency: mean (and sd) of ``--runs`` timed runs after ``--warmup`` runs (CUDA events on a GPU). Peak memory: bytes of
the path's weights plus the peak of the tensors its forward allocates (CUDA: ``max_memory_allocated`` minus the
memory allocated before the call; CPU: live tensor storages tracked op by op, kernel scratch space excluded).
Overheads are ``nat / base - 1`` against the targets of the seeds (10% latency, 12% memory). The multiply-accumulates
of each path (one more, untimed call under ``FlopCounterMode``) and their overhead are printed too: exact, so they
tell a real overhead from timing noise on a busy machine.

Usage::

    python scripts/bench_nat.py                          # CUDA if available (600x400 and 1920x1080), else CPU
    python scripts/bench_nat.py --device cpu --sizes 600x400 --warmup 1 --runs 2
    python scripts/bench_nat.py --tiny --device cpu      # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # perf_tools

import torch  # noqa: E402
from perf_tools import LiveTensorBytes, mac_counter  # noqa: E402
from perf_tools import measure as perf_measure  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import glare_nat_arch  # noqa: E402,F401  (BasicSR import aliases, registration)
from glare_nat_arch.glare_nat_arch import GLARENATFlowNet, GLARENATNet, vqgan_codebook  # noqa: E402
from glare_nat_arch.vqgan_arch import GLAREVQGAN  # noqa: E402

TARGETS = {"latency": 0.10, "memory": 0.12}

OFFICIAL = {
    "vq": {},  # GLAREVQGAN defaults = official (ch 128, ch_mult [1,2,4], K 8192, d 3)
    "glare": {},  # GLARENet defaults = official
    "nat2": {},  # docs/nat.md 'Options' defaults
    "nat3": {"enable": True},
}
TINY = {  # the networks' own test sizes (TINY), with a 64-code VQGAN and 32-wide NATs
    "vq": {**GLAREVQGAN.TINY, "n_embed": 64},
    "glare": {k: v for k, v in GLARENATFlowNet.TINY.items() if k not in ("codebook_size", "nat2")},
    "nat2": {"model": {"dim": 32, "depth": 1, "heads": 2}, "uncertainty": {"knn": 16}},
    "nat3": {"enable": True, "model": {"dim": 32, "depth": 1, "heads": 2}},
}


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules`` (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` updated by ``extra``, nested dicts merged key by key (neither input is changed)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build(
    tiny: bool, device: torch.device, nat2: dict | None = None
) -> tuple[GLAREVQGAN, GLARENATNet, GLARENATFlowNet]:
    """VQGAN, Stage-III + NATs and Stage-II + NAT-II networks (shared GLARE / NAT-II weights), eval mode.

    ``nat2``: option overrides merged into the ``nat2`` block (e.g. ``{"decode": {"iters": 2}}``)."""
    cfg = TINY if tiny else OFFICIAL
    if nat2:
        cfg = {**cfg, "nat2": deep_merge(cfg["nat2"], nat2)}
    with device:  # initialise on the target device (fast on a GPU)
        return _build(cfg, device)


def _build(cfg: dict, device: torch.device) -> tuple[GLAREVQGAN, GLARENATNet, GLARENATFlowNet]:
    vq = GLAREVQGAN(**cfg["vq"])
    k = vq.quantize.n_e
    net = GLARENATNet(**cfg["glare"], codebook_size=k, nat2=cfg["nat2"], nat3=cfg["nat3"])
    flow = GLARENATFlowNet(**cfg["glare"], codebook_size=k, nat2=cfg["nat2"])
    shared = {n: v for n, v in net.state_dict().items() if n.startswith(("RRDB.", "flowUpsamplerNet.", "nat2."))}
    flow.load_state_dict(shared, strict=True)
    # inference only; frozen weights also keep FlopCounterMode's module tracker off views of parameters
    return tuple(m.to(device).eval().requires_grad_(False) for m in (vq, net, flow))


@torch.no_grad()
def calibrate(vq: GLAREVQGAN, net: GLARENATNet, flow: GLARENATFlowNet, x: Tensor) -> dict[str, float]:
    """Codebook spread like the flow output, then ``dist_temp`` / ``tau`` / ``tau3`` on ``x`` (25% masked)."""
    rev = net.reverse(x)
    z = rev["z_hat"].float()
    gen = torch.Generator(device="cpu").manual_seed(0)
    book = torch.randn(vq.quantize.embedding.weight.shape, generator=gen) * z.std().item() + z.mean().item()
    vq.quantize.embedding.weight.copy_(book.to(z.device))
    cb = vqgan_codebook(vq)
    rho = net.nat2.rho_target
    score = net.nat2_score(rev, cb)  # flow_mc only
    values = net.nat2.calibrate(z, cb, rho, scores=None if score is None else [score])
    values["tau3"] = net.nat3.calibrate(net.refine_latent(rev, cb)["uncertainty"], rho)
    flow.nat2.load_state_dict(net.nat2.state_dict())
    return values


@contextlib.contextmanager
def without(net: GLARENATNet, *names: str):
    """``net`` with the refiners ``names`` (``nat2``, ``nat3``) switched off: its hooks then run GLARE's path."""
    saved = {name: getattr(net, name) for name in names}
    try:
        for name in names:
            setattr(net, name, None)
        yield
    finally:
        for name, module in saved.items():
            setattr(net, name, module)


def make_paths(vq: GLAREVQGAN, net: GLARENATNet, flow: GLARENATFlowNet, x: Tensor) -> dict[str, tuple]:
    """``{name: (fn(x), modules whose weights it uses, base path name or None)}``."""
    cb = vqgan_codebook(vq)
    with torch.no_grad():
        rev = net.reverse(x)
        lat = net.refine_latent(rev, cb)
        mid_channels = net.deformable_decoder.conv_in.out_channels
        h_mid = torch.randn(x.shape[0], mid_channels, *rev["z_hat"].shape[-2:], device=x.device)

    def stage3(x: Tensor) -> Tensor:
        with without(net, "nat2", "nat3"):
            return net(x, vq)

    def stage3_latent(x: Tensor) -> Tensor:
        with without(net, "nat3"):
            return net(x, vq)

    def nat2_only(_: Tensor) -> Tensor:
        return net.refine_latent(rev, cb)["z_nl"]

    def nat3_only(_: Tensor) -> Tensor:
        return net.nat3(h_mid, rev["cond"], lat["uncertainty"])[0]

    glare3 = [net.RRDB, net.flowUpsamplerNet, net.deformable_decoder, vq]
    glare2 = [flow.RRDB, flow.flowUpsamplerNet, vq]
    return {
        "stage II": (lambda x: vq.decode(flow.reverse(x)["z_hat"])[0], glare2, None),
        "stage II + NAT-II": (lambda x: flow.enhance(x, vq), glare2 + [flow.nat2], "stage II"),
        "stage III": (stage3, glare3, None),
        "stage III + NAT-II": (stage3_latent, glare3 + [net.nat2], "stage III"),
        "stage III + NAT-II + NAT-III": (lambda x: net(x, vq), glare3 + [net.nat2, net.nat3], "stage III"),
        "NAT-II only": (nat2_only, [net.nat2], None),
        "NAT-III only": (nat3_only, [net.nat3], None),
    }


def autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[amp])


@torch.no_grad()
def measure(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, runs: int, amp: str | None) -> dict[str, float]:
    """Latency (ms: wall mean, sd, median; process CPU-time median), peak activation bytes and MACs of ``fn(x)``.

    Timing and the CUDA peak come from :func:`perf_tools.measure`; one more, untimed call counts the
    multiply-accumulates (:func:`perf_tools.mac_counter`: noise-free, what CPU time follows) and, on the
    CPU, the peak of live tensor storages (:class:`LiveTensorBytes`). ``runs = 0``: that call only (no latency keys;
    on CUDA its own peak).
    """
    dev = x.device
    cuda = dev.type == "cuda"
    with autocast(dev, amp):
        m = perf_measure(lambda: fn(x), dev, warmup=warmup, repeats=runs) if runs > 0 else None
        if cuda and m is None:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        with LiveTensorBytes() if not cuda else contextlib.nullcontext() as probe, mac_counter() as macs:
            fn(x)
        if not cuda:
            act = probe.peak
        else:
            act = m.peak_bytes - m.base_bytes if m is not None else torch.cuda.max_memory_allocated(dev) - base
    out = {"act_bytes": act, "macs": macs.get_total_flops() // 2}
    if m is None:
        return out
    del m.output
    ms = [t * 1e3 for t in m.times]
    out.update(
        ms=statistics.fmean(ms),
        ms_sd=statistics.stdev(ms) if len(ms) > 1 else 0.0,
        ms_median=statistics.median(ms),
        cpu_ms_median=m.cpu_median * 1e3,
    )
    return out


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 600x400 (width x height), got {text!r}") from None
    if w < 4 or h < 4:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small")
    return w, h


MIB = 1024.0**2


def header_lines(results: dict) -> list[str]:
    cpu = results["device_type"] != "cuda"
    return [
        f"device: {results['device']} | torch {results['torch']} | amp: {results['amp'] or 'off (float32)'} | "
        f"batch 1 | {'TINY networks' if results['tiny'] else 'official GLARE sizes'}, "
        "NAT defaults (docs/nat.md 'Options')"
        + (f" with nat2 overrides {json.dumps(results['nat2_overrides'])}" if results.get("nat2_overrides") else "")
        + ", random weights",
        (
            f"warmup {results['warmup']}, runs {results['runs']}"
            if results["runs"]
            else "MACs and memory only (not timed)"
        )
        + "; memory = weights + peak of the forward's tensors "
        f"({'live CPU tensor storages' if cpu else 'max_memory_allocated'})",
        f"targets: latency overhead <= {TARGETS['latency']:.0%}, memory overhead <= {TARGETS['memory']:.0%} "
        "(overhead = path with NAT / same path without NAT - 1"
        + ("; CPU: latency = wall ms (process CPU ms), overhead from CPU time)" if cpu else "; mean ± sd ms)"),
        "GMAC: multiply-accumulates of one call (convolutions, matrix products, attention; norms and element-wise "
        "ops not counted), exact and free of timing noise; CPU time follows it",
    ]


def size_lines(info: dict) -> list[str]:
    return [
        "",
        f"== {info['size']} (latent {info['latent'][0]}x{info['latent'][1]}; NAT-II masks "
        f"{info['nat2_masked_frac']:.1%} of the positions in {info['nat2_rounds']} rounds, NAT-III "
        f"{info['nat3_masked_frac']:.1%} of the patches)",
        f"{'path':<30}{'latency ms':>18}{'GMAC':>9}{'weights MiB':>13}{'activ. MiB':>12}{'peak MiB':>11}"
        f"{'latency +':>14}{'memory +':>14}{'MACs +':>9}",
    ]


def path_line(name: str, r: dict, cpu: bool) -> str:
    over = ""
    if r["base"] is not None:
        for key, target in TARGETS.items():
            value = r.get(f"{key}_overhead")
            cell = "n/a" if value is None else f"{value:+.1%} {'ok' if value <= target else 'OVER'}"
            over += f"{cell:>14}"
    if "ms" not in r:
        lat = "not timed"
    elif cpu:
        lat = f"{r['ms_median']:.0f} ({r['cpu_ms_median']:.0f} cpu)"
    else:
        lat = f"{r['ms']:.2f} ± {r['ms_sd']:.2f}"
    if r["base"] is not None:
        over += f"{r['mac_overhead']:>+9.1%}"
    return (
        f"{name:<30}{lat:>18}{r['macs'] / 1e9:>9.1f}{r['weight_bytes'] / MIB:>13.1f}{r['act_bytes'] / MIB:>12.1f}"
        f"{r['peak_bytes'] / MIB:>11.1f}{over}"
    )


def bench_size(vq, net, flow, size, args, device, emit: Callable[[str], None]) -> dict:
    """Measure every path at ``size`` (W, H); each table line is passed to ``emit`` as soon as it is known."""
    w, h = size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with autocast(device, args.amp):
        cal = calibrate(vq, net, flow, x)
        with torch.no_grad():
            ref = net(x, vq, return_intermediates=True)
    info = {
        "size": f"{w}x{h}",
        "latent": list(ref["z_hat"].shape[-2:]),
        "nat2_masked_frac": float(ref["refine"]["mask_init"].float().mean()),
        "nat2_rounds": int(ref["refine"]["rounds"]),
        "nat3_masked_frac": float(ref["nat3_mask"].float().mean()),
        "calibration": cal,
        "paths": {},
    }
    del ref
    for line in size_lines(info):
        emit(line)
    for name, (fn, modules, base) in make_paths(vq, net, flow, x).items():
        if args.paths and name not in args.paths:
            continue
        res = measure(fn, x, args.warmup, args.runs, args.amp)
        res["weight_bytes"] = module_bytes(*modules)
        res["peak_bytes"] = res["weight_bytes"] + res["act_bytes"]
        res["base"] = base
        if base is not None:
            b = info["paths"][base]
            key = "ms" if device.type == "cuda" else "cpu_ms_median"  # CPU: process time, robust to other load
            if key in res:
                res["latency_overhead"] = res[key] / b[key] - 1.0
            res["memory_overhead"] = res["peak_bytes"] / b["peak_bytes"] - 1.0
            res["mac_overhead"] = res["macs"] / b["macs"] - 1.0
        info["paths"][name] = res
        emit(path_line(name, res, device.type != "cuda"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--tiny", action="store_true", help="tiny networks and a 64x48 input (smoke test)")
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(v) for v in s.split(",")],
        default=None,
        help="comma-separated WxH (default: 600x400,1920x1080 on CUDA, 600x400 on CPU, 64x48 tiny)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed runs (default 20 CUDA, 1 CPU)")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default 100 CUDA, 3 CPU)")
    p.add_argument(
        "--amp",
        choices=["fp16", "bf16", "none"],
        default=None,
        help="autocast dtype (default fp16 on CUDA as the official test, none on CPU)",
    )
    p.add_argument(
        "--macs-only",
        action="store_true",
        help="no timing: one call per path for MACs and memory (exact; minutes instead of tens of minutes on a CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--nat2",
        type=json.loads,
        default=None,
        help='JSON overrides of the nat2 options, e.g. \'{"decode": {"iters": 2}}\' (default: docs/nat.md "Options")',
    )
    p.add_argument(
        "--paths",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help="comma-separated subset of the paths (their base paths are added), e.g. 'stage II + NAT-II'",
    )
    args = p.parse_args(argv)
    if args.paths:
        bases = {"stage II + NAT-II": "stage II", "stage III + NAT-II": "stage III"}
        bases["stage III + NAT-II + NAT-III"] = "stage III"
        args.paths = set(args.paths) | {bases[n] for n in args.paths if n in bases}

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = device.type == "cuda"
    args.amp = ("fp16" if cuda else None) if args.amp is None else (None if args.amp == "none" else args.amp)
    args.warmup = (20 if cuda else 1) if args.warmup is None else args.warmup
    args.runs = (100 if cuda else 3) if args.runs is None else args.runs
    if args.macs_only:
        args.warmup = args.runs = 0
    elif args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    if args.sizes is None:
        args.sizes = [(64, 48)] if args.tiny else ([(600, 400), (1920, 1080)] if cuda else [(600, 400)])

    torch.manual_seed(args.seed)
    print(f"building the networks on {device} ...", flush=True)
    vq, net, flow = build(args.tiny, device, args.nat2)
    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    results = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "amp": args.amp,
        "tiny": args.tiny,
        "warmup": args.warmup,
        "runs": args.runs,
        "nat2_overrides": args.nat2,
        "sizes": [],
    }

    def emit(line: str) -> None:
        print(line, flush=True)

    def save() -> None:
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")

    for line in header_lines(results):
        emit(line)
    for size in args.sizes:
        try:
            results["sizes"].append(bench_size(vq, net, flow, size, args, device, emit))
        except torch.cuda.OutOfMemoryError as e:
            results["sizes"].append({"size": f"{size[0]}x{size[1]}", "error": f"out of GPU memory ({e})"[:200]})
            emit(f"== {size[0]}x{size[1]}: out of GPU memory")
            torch.cuda.empty_cache()
        save()
    return results


if __name__ == "__main__":
    main()
