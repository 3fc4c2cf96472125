"""Performance tooling: the explicit-attention reference, the measuring helpers and the benchmark CLI (tiny)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glare_nat_arch  # noqa: F401  (compat shims first)
from glare_nat_arch.blocks import AttnBlock
from glare_nat_arch.deform import LeanDCNv2Pack

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # the benchmark helpers live next to the scripts that use them
import perf_tools as perf  # noqa: E402

SCRIPT = REPO_ROOT / "scripts" / "bench_inference.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explicit_reference_equals_attn_block_float64():
    torch.manual_seed(0)
    block = AttnBlock(32).double()
    for conv in (block.q, block.k, block.v, block.proj_out):
        torch.nn.init.normal_(conv.weight, std=0.3)  # non-trivial attention (default init is near-uniform)
    ref = perf.with_explicit_attention(block)
    assert type(ref) is perf.ExplicitAttnBlock and type(block) is AttnBlock  # the original is untouched
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    out_ref, out = ref(x), block(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    assert (out - x).abs().max() > 1e-2  # the attention branch really contributes


def test_explicit_reference_builds_the_n_by_n_map():
    """The reference must materialise the (B, N, N) scores, which is what makes it the memory baseline."""
    block = perf.with_explicit_attention(AttnBlock(32))
    shapes = []
    orig_bmm = torch.bmm

    def spy(a, b):
        out = orig_bmm(a, b)
        shapes.append(tuple(out.shape))
        return out

    torch.bmm = spy
    try:
        block(torch.randn(1, 32, 4, 6))
    finally:
        torch.bmm = orig_bmm
    assert (1, 24, 24) in shapes


def test_swap_covers_every_attention_block_and_keeps_weights():
    net, vq = perf.build_inference_networks(tiny=True, seed=0)
    n_net, n_vq = perf.count_modules(net, AttnBlock), perf.count_modules(vq, AttnBlock)
    assert n_net == 2 + 3 and n_vq == 2 + 3  # tiny: E_c / E_NL 1 + mid 1; D_MF / D_NL 2 + mid 1
    ref_net = perf.with_explicit_attention(net)
    assert perf.count_modules(ref_net, AttnBlock) == 0
    assert perf.count_modules(ref_net, perf.ExplicitAttnBlock) == n_net
    sd, ref_sd = net.state_dict(), ref_net.state_dict()
    assert sd.keys() == ref_sd.keys()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    dcn = [m for m in ref_net.modules() if isinstance(m, LeanDCNv2Pack)]
    assert len(dcn) == 2 and all(m.impl == "im2col" for m in dcn)  # the reference runs the official DCN kernel
    assert all(m.impl == "auto" for m in net.modules() if isinstance(m, LeanDCNv2Pack))  # ours is untouched


def test_full_tiny_network_reference_equals_ours_float64():
    net, vq = perf.build_inference_networks(tiny=True, seed=0)
    net, vq = net.double(), vq.double()
    ref_net, ref_vq = perf.with_explicit_attention(net), perf.with_explicit_attention(vq)
    x = perf.make_low_light_image(32, 48, seed=2).double()
    cpu = torch.device("cpu")
    out = perf.make_enhancer(net, vq, cpu)(x)
    out_ref = perf.make_enhancer(ref_net, ref_vq, cpu)(x)
    assert out.shape == (1, 3, 32, 48)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)


def test_measure_runs_warmup_then_timed_repeats():
    calls = []
    m = perf.measure(lambda: calls.append(1) or torch.ones(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(m.times) == 3 and len(m.cpu_times) == 3
    assert m.median == sorted(m.times)[1] and m.peak_bytes is None
    with pytest.raises(ValueError, match="repeats"):
        perf.measure(lambda: None, torch.device("cpu"), repeats=0)


def test_output_difference_and_bad_stage():
    a = torch.tensor([1.0, 2.0, 3.0])
    d = perf.output_difference(a + torch.tensor([0.0, 0.5, 0.0]), a)
    assert d["max_abs"] == pytest.approx(0.5) and d["mean_abs"] == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="unknown stage"):
        perf.make_train_step("IV", torch.device("cpu"), None)


def test_code_agreement_counts_single_flips():
    """One flipped code in 30,000 must show as a count, not vanish in a rounded fraction."""
    a = torch.zeros(1, 150, 200, dtype=torch.long)
    b = a.clone()
    b[0, 70, 99] = 5
    agree = perf.code_agreement(a, b)
    assert agree["codes_differ"] == 1 and agree["codes_total"] == 30000
    assert f"{agree['codes_equal']:.4f}" == "1.0000"  # why the count is reported
    assert perf.code_agreement(a, a)["codes_differ"] == 0
    with pytest.raises(ValueError, match="shape"):
        perf.code_agreement(a, a[:, :10])


def test_stage3_train_step_trains_only_the_aft_decoder():
    built = perf.make_train_step("III", torch.device("cpu"), None, variant="reference", tiny=True)
    assert (built.patch, built.batch) == perf.STAGE_SHAPES["tiny"]["III"]
    net = built.modules["net"]
    assert perf.count_modules(net, perf.ExplicitAttnBlock) > 0 and perf.count_modules(net, AttnBlock) == 0
    before = {k: v.clone() for k, v in net.state_dict().items()}
    built.step()  # Adam's first step moves every weight that received a gradient
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("deformable_decoder.") for k in changed)
    assert any(k.startswith("deformable_decoder.up.") for k in changed)  # the backbone, not only the head


def test_parse_sizes_is_width_by_height_and_rejects_garbage():
    bench = _load_script()
    assert bench.parse_sizes("600x400,1920x1080") == [(600, 400), (1920, 1080)]
    with pytest.raises(Exception, match="WIDTHxHEIGHT"):
        bench.parse_sizes("600-400")


def test_bench_script_tiny_end_to_end():
    """One CLI run (CPU: one subprocess worker per variant, then training stage II) prints ratio and train lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--sizes", "32x32", "--repeats", "1"]
    cmd += ["--warmup", "0", "--train", "--stages", "II", "--train-iters", "1", "--trace-memory"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RUN reference size=32x32" in out and "RUN ours      size=32x32" in out
    ratio = re.search(
        r"RATIO ours/reference size=32x32 amp=none: latency=(\S+) peak_memory=(\S+).*max\|diff\|=(\S+)", out
    )
    assert ratio, out
    latency, peak, max_diff = (float(v) for v in ratio.groups())
    assert latency > 0 and peak > 0
    assert max_diff < 1e-4  # same weights, float32: only rounding differs
    assert re.search(r"RATIO ours/reference size=32x32 .* codes_differ=0/\d+", out), out
    assert re.search(r"TRAIN stage II patch 32 batch 2 amp=none: reference \S+ it/s .* ours \S+ it/s", out), out
    traces = re.findall(r"MEMTRACE (reference|ours) size=32x32: live tensors peak (\d+) MiB in (\S+)", out)
    assert [t[0] for t in traces] == ["reference", "ours"], out


def test_live_tensor_probe_counts_new_storages_only():
    weights = torch.zeros(1000)
    with perf.LiveTensorBytes() as probe:
        weights.t()  # a view: no allocation
        a = weights + 1  # 4000 B
        a.mul_(2)  # in place
        b = a.view(10, 100) * 2  # 4000 B more
        del a, b
        c = weights * 3  # 4000 B after the others were freed
    assert probe.peak == 8000 and probe.current == 4000 and c.numel() == 1000


def test_live_tensor_probe_names_the_modules_alive_at_the_peak():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), perf.LiveTensorBytes(attribute=net) as probe:
        net(x)
    assert probe.peak == (8 + 2) * 16 * 16 * 4  # the first conv's output is alive while the second one runs
    assert probe.peak_module == "1" and [s[2] for s in probe.snapshot] == ["0", "1"]
    assert not net._forward_hooks and not net[0]._forward_pre_hooks  # hooks removed on exit


def test_target_lines_judge_only_what_was_measured():
    """The CPU targets are for 600x400: a run at another size reports them as n/a, not as FAIL."""
    bench = _load_script()
    cpu = torch.device("cpu")
    other = [{"size": "800x600", "amp": "none", "latency_ratio": 0.55, "peak_ratio": 0.27, "max_abs": 2e-2}]
    assert all(line.endswith("n/a") for line in bench.target_checks(other, [], [], cpu))
    measured = [{"size": "600x400", "amp": "none", "latency_ratio": 0.73, "peak_ratio": 0.2, "max_abs": 1.4e-5}]
    measured[0].update(codes_differ=0, codes_total=15000, peak_increase_ratio=0.5)
    lines = bench.target_checks(measured, [], [], cpu)
    # memory is judged on the call's RSS increase (0.5 here), not on the whole process (peak_ratio)
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["FAIL", "PASS", "PASS"]
    assert "(RSS increase ratio 0.500)" in lines[0]
    assert "(codes differing 0/15000)" in lines[2]
    measured[0].update(peak_increase_ratio=0.21, peak_ratio=0.6)
    assert bench.target_checks(measured, [], [], cpu)[0].endswith("PASS")
