#!/usr/bin/env python
"""Parameters and MACs of GLARE per stage (E_c, flow, D_NL, D_MF, total) at given input sizes.

    python scripts/count_params_macs.py                            # official sizes, 256x256 and 600x400 (W x H)
    python scripts/count_params_macs.py --tiny --sizes 48x32 --backend mmengine   # cross-check on the tiny config

MACs (one multiply-accumulate = 1) count convolutions and matrix products only (conv, linear, matmul/bmm,
attention, DCN): GroupNorm, upsampling and element-wise ops are excluded, as in docs/glare.md "Parameters and MACs"

Backends:
- ``torch`` (default): ``torch.utils.flop_counter.FlopCounterMode`` on ``meta`` tensors (shapes only, no memory,
  no compute), so the official ~100M-parameter model is counted at 600x400 in seconds on a CPU. Attention is
  counted as q.k^T + attn.v (torch's own formulas; the CPU flash kernel gets a handle here, as torch has none);
  ``torchvision::deform_conv2d`` has no formula in torch either, so a handle here counts it like the dense conv
  of the same shape (bilinear sampling not counted).
- ``mmengine``: ``mmengine.analysis.FlopAnalyzer`` (imported lazily). It counts
  ``aten::scaled_dot_product_attention`` and ``torchvision::deform_conv2d`` as 0, so handles are added for both
  (same formulas). It traces with ``torch.jit``, which cannot trace convolutions on ``meta`` tensors in current
  torch, so it runs the network for real on the CPU: fine for the tiny config, many minutes at official size.

The flow (small) always runs on real tensors: its invertible convs check det W, which needs data. BasicSR's
``DCNv2Pack.forward`` compares the offset magnitude with 50 to log a warning, which needs data too; on ``meta``
tensors it is replaced, while counting, by the identical computation without that check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # perf_tools

import perf_tools as perf  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import glare_nat_arch  # noqa: E402,F401  (compat shims before basicsr)
from glare_nat_arch import quantize  # noqa: E402
from glare_nat_arch.glare_arch import GLARENet  # noqa: E402
from glare_nat_arch.vqgan_arch import GLAREVQGAN  # noqa: E402

TINY = {
    "vqgan": dict(ch=32, ch_mult=(1, 2, 1), n_embed=64),
    "net": dict(ch=32, ch_mult=(1, 2, 1), flow_hidden_channels=16, flow_K=2, flow_n_extra_steps=1),
}
OFFICIAL: dict[str, dict] = {"vqgan": {}, "net": {}}
_MM_NOT_COUNTED = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
)
STAGES = ("E_c", "flow", "D_NL", "D_MF")


# ----------------------------------------------------------------------------------------------- backends
# the formulas and the FlopCounterMode counter live in perf_tools (shared with scripts/bench_nat.py)
count_torch = perf.count_macs  # MACs of fn(*inputs) with FlopCounterMode (works on meta tensors)


def _zero(inputs: list, outputs: list) -> int:
    return 0


class _Call(nn.Module):
    """Wrap ``fn(*inputs)`` as a module for jit tracing; nested outputs are flattened to a tuple of tensors."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *inputs):
        flat: list[torch.Tensor] = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                flat.append(x)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)

        walk(self.fn(*inputs))
        return tuple(flat)


def _plain_code_distances(rows: torch.Tensor, codes: torch.Tensor, chunk: int):
    """:func:`~glare_nat_arch.quantize.chunked_code_distances` with plain ops instead of ``out=`` variants, which
    mmengine's JIT trace does not count (same values)."""
    code_sq = (codes**2).sum(dim=1)
    size = max(1, min(int(chunk), rows.shape[0]))
    for start in range(0, rows.shape[0], size):
        yield start, quantize.squared_code_distances(rows[start : start + size], codes, code_sq)


def count_mmengine(fn: Callable, inputs: tuple) -> int:
    """MACs of ``fn(*inputs)`` with mmengine's FlopAnalyzer (real tensors), plus SDPA / deform_conv2d handles."""
    with contextlib.ExitStack() as stack:
        original = quantize.chunked_code_distances
        quantize.chunked_code_distances = _plain_code_distances
        stack.callback(setattr, quantize, "chunked_code_distances", original)
        return _count_mmengine(fn, inputs)


def _count_mmengine(fn: Callable, inputs: tuple) -> int:
    from mmengine.analysis import FlopAnalyzer
    from mmengine.analysis.jit_handles import get_shape

    def sdpa(inp: list, out: list) -> int:
        return perf.sdpa_macs_from_shapes(*(get_shape(x) for x in inp[:3]))

    def deform(inp: list, out: list) -> int:
        return perf.deform_macs_from_shapes(get_shape(inp[1]), get_shape(out[0]))

    analyzer = FlopAnalyzer(_Call(fn), inputs)
    # Keep only convs and matrix products: the other default handles (norms, upsampling, pooling) count zero.
    analyzer.set_op_handle(**{name: _zero for name in _MM_NOT_COUNTED})
    analyzer.set_op_handle(**{"aten::scaled_dot_product_attention": sdpa, "torchvision::deform_conv2d": deform})
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return int(analyzer.total())


@contextlib.contextmanager
def dcn_without_data_check():
    """Temporarily run BasicSR's DCNv2Pack without its data-dependent warning check (meta tensors have no data)."""
    import torchvision
    from basicsr.archs.arch_util import DCNv2Pack

    original = DCNv2Pack.forward

    def forward(self, x, feat):
        o1, o2, mask = torch.chunk(self.conv_offset(feat), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return torchvision.ops.deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, torch.sigmoid(mask)
        )

    DCNv2Pack.forward = forward
    try:
        yield
    finally:
        DCNv2Pack.forward = original


# ----------------------------------------------------------------------------------------------- networks
def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(tiny: bool, device: str) -> tuple[GLARENet, GLAREVQGAN]:
    """GLARENet and GLAREVQGAN at tiny or official sizes, on ``meta`` (no memory) or ``cpu``."""
    cfg = TINY if tiny else OFFICIAL
    with torch.device(device):
        # the official im2col DCN at every size (same MACs as the tap-wise one, and countable on ``meta``)
        net = GLARENet(**cfg["net"], dcn_impl="im2col").eval()
        vqgan = GLAREVQGAN(**cfg["vqgan"]).eval()
    return net, vqgan


def real_flow(flow: nn.Module) -> nn.Module:
    """A CPU copy of the flow with zero weights and identity invertible convs (valid for the det check)."""
    if next(flow.parameters()).device.type != "meta":
        return flow
    cpu = copy.deepcopy(flow).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in cpu.named_parameters():
            p.zero_()
            if name.endswith("invconv.weight"):
                p.copy_(torch.eye(p.shape[0]))
    return cpu


def param_table(net: GLARENet, vqgan: GLAREVQGAN) -> dict[str, int]:
    """Parameter counts per stage; unused official parameters are listed separately."""
    dmf = net.deformable_decoder
    unused_dmf = sum(n_params(m) for m in (dmf.conv_out, dmf.scale, dmf.bias, dmf.enc))
    unused_flow = n_params(net.flowUpsamplerNet.f)
    rows = {
        "E_c": n_params(net.RRDB),
        "flow (used)": n_params(net.flowUpsamplerNet) - unused_flow,
        "D_NL (+ codebook, post_quant_conv)": n_params(vqgan.decoder)
        + n_params(vqgan.post_quant_conv)
        + n_params(vqgan.quantize),
        "D_MF (used)": n_params(dmf) - unused_dmf,
    }
    rows["total used at inference"] = sum(rows.values())
    rows["unused official params (flow f.0 + D_MF conv_out/scale/bias/enc)"] = unused_flow + unused_dmf
    rows["net_G.pth (E_c + flow + D_MF, incl. unused)"] = n_params(net)
    rows["VQGAN (vqgan.pkl core: E_NL, Q, D_NL, 1x1 convs)"] = n_params(vqgan)
    return rows


@torch.no_grad()
def mac_table(net: GLARENet, vqgan: GLAREVQGAN, height: int, width: int, backend: str = "torch") -> dict[str, int]:
    """MACs per stage for one (1, 3, height, width) image (multiples of 4), on the networks' device."""
    count = count_torch if backend == "torch" else count_mmengine
    net.requires_grad_(False)  # closures over frozen weights can be traced as constants
    vqgan.requires_grad_(False)
    device = next(net.parameters()).device
    x = torch.zeros(1, 3, height, width, device=device).uniform_(0, 1)
    c = net.RRDB(x)
    z, cond, skips = c["color_map"], c["cond"], c["skips"]
    _, _, feats = vqgan.decode(z, return_rgb=False)
    flow = real_flow(net.flowUpsamplerNet).requires_grad_(False)
    zc = torch.zeros(z.shape)
    condc = torch.full(cond.shape, 0.5)
    dmf = net.deformable_decoder
    guard = dcn_without_data_check() if device.type == "meta" else contextlib.nullcontext()
    rows = {}
    with guard:
        rows["E_c"] = count(net.RRDB, (x,))
        rows["flow"] = count(lambda a, b: flow(a, b, reverse=True), (zc, condc))
        rows["D_NL"] = count(lambda a: vqgan.decode(a), (z,))
        rows["D_MF"] = count(lambda a, n1, n0, s0, s1: dmf(a, [n1, n0], [s0, s1]), (z, *feats, *skips))
    rows["total"] = sum(rows.values())
    return rows


def parse_size(text: str) -> tuple[int, int]:
    """'600x400' (W x H) -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"size must look like 600x400 (W x H), got {text!r}") from err
    if h % 4 or w % 4:
        raise argparse.ArgumentTypeError(f"size {text} must be a multiple of 4 in both sides")
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Parameters and MACs of GLARE per stage.")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[(256, 256), (400, 600)], help="W x H")
    parser.add_argument("--tiny", action="store_true", help="golden tiny config instead of the official sizes")
    parser.add_argument("--backend", choices=("torch", "mmengine"), default="torch")
    args = parser.parse_args(argv)

    net, vqgan = build(args.tiny, "meta" if args.backend == "torch" else "cpu")
    print(f"GLARE, {'tiny golden' if args.tiny else 'official'} sizes, MAC backend: {args.backend}\n\nParameters:")
    for k, v in param_table(net, vqgan).items():
        print(f"  {k:<68s} {v:>13,d}  ({v / 1e6:7.2f} M)")
    for height, width in args.sizes:
        print(f"\nMACs at {width}x{height} (W x H), batch 1:")
        for k, v in mac_table(net, vqgan, height, width, args.backend).items():
            print(f"  {k:<8s} {v:>20,d}  ({v / 1e9:8.2f} G)")
    print(
        "\nMACs: convs + matmuls + attention (SDPA) + deform_conv2d (counted as its dense conv; sampling excluded);\n"
        "GroupNorm, upsampling and element-wise ops excluded. D_NL includes the codebook distances and its RGB head,\n"
        "which the official inference computes and discards. Neither counter sees SDPA / deform_conv2d on its own:\n"
        "both are added by the handles in this script."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
