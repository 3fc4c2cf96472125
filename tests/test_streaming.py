"""Row-streamed inference (glare_nat_arch/streaming.py): each streamed piece against the whole-map modules, the
lean schedule of GLARENet against the plain path (golden tensors included), when streaming applies, and memory."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from glare_nat_arch.aft import WarpBlock
from glare_nat_arch.blocks import Decoder, Encoder, ResnetBlock, Upsample, swish
from glare_nat_arch.deform import modulated_deform_conv2d
from glare_nat_arch.glare_arch import GLARENet
from glare_nat_arch.streaming import (
    RowStreaming,
    TensorRows,
    UpsampleRows,
    group_norm_affine,
    row_strips,
    set_row_streaming,
    stream_conv,
    stream_level,
    stream_norm_act_conv,
    stream_resblock,
)
from glare_nat_models import perf
from tests.test_glare_arch import net_kwargs, vqgan_kwargs  # noqa: F401 (golden configs)
from tests.tolerance import assert_same_codes, code_distance_tolerance

TOL = dict(rtol=1e-5, atol=1e-5)
ALWAYS = RowStreaming(min_mb=0.0, rows=3)


class Replay:
    """Records the discrete choices of one run (the VQGAN quantiser's codes, NAT-II's ``refine`` results) and,
    with ``force`` (an earlier run's record), makes this run take those instead of its own.

    Streamed and whole-map runs round differently, so a near-tie of the nearest-code search may go either way
    (the tiny networks' dense codebooks have gaps down to 1e-6); compared on the same codes, their outputs agree
    within ``TOL``, and :func:`check_same_codes` checks that their own codes agree wherever the latents decide.
    """

    def __init__(self, vq: nn.Module, nat2: nn.Module | None = None, force: Replay | None = None) -> None:
        self.vq, self.nat2, self.force = vq, nat2, force
        self.latents: list[torch.Tensor] = []  # quantised latents and NAT-II inputs x_hat, in call order
        self.codes: list[torch.Tensor] = []  # their nearest codes (the quantiser's, NAT-II's v0)
        self.quantised, self.refines = 0, []

    def __enter__(self) -> Replay:
        real_nearest = self.vq.quantize.nearest_indices

        def nearest(z: torch.Tensor) -> torch.Tensor:
            codes = real_nearest(z)
            self.latents.append(z.detach().clone())
            self.codes.append(codes)
            self.quantised += 1
            return codes if self.force is None else self.force.codes[len(self.codes) - 1].clone()

        self.vq.quantize.nearest_indices = nearest
        if self.nat2 is not None:
            real_refine = self.nat2.refine

            def refine(x_hat: torch.Tensor, *args, **kwargs) -> dict:
                out = real_refine(x_hat, *args, **kwargs)
                self.latents.append(x_hat.detach().clone())
                self.codes.append(out["codes_init"])
                self.refines.append(out)
                return out if self.force is None else self.force.refines[len(self.refines) - 1]

            self.nat2.refine = refine
        return self

    def __exit__(self, *exc) -> None:
        del self.vq.quantize.nearest_indices
        if self.nat2 is not None:
            del self.nat2.refine


def check_same_codes(run: Replay, ref: Replay) -> None:
    """``run`` and ``ref`` searched the codebook as often, on latents within ``TOL``, and found the same nearest
    codes wherever those latents decide them (see :func:`tests.tolerance.assert_same_codes`)."""
    assert run.quantised == ref.quantised and len(run.refines) == len(ref.refines) and run.codes
    book = run.vq.quantize.embedding.weight.detach()
    for z, codes, z_ref, codes_ref in zip(run.latents, run.codes, ref.latents, ref.codes):
        torch.testing.assert_close(z, z_ref, **TOL)
        rows = z_ref.permute(0, 2, 3, 1).reshape(-1, z_ref.shape[1])
        delta = TOL["atol"] + TOL["rtol"] * float(z_ref.abs().max())
        tol = code_distance_tolerance(rows, book, rows_tol=delta).reshape(codes_ref.shape)
        dist = torch.cdist(rows.double(), book.double()).square().reshape(*codes_ref.shape, -1)
        assert_same_codes(codes, codes_ref, dist, tol)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial GroupNorm affine parameters and biases (defaults are 1 / 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0))
    return module.eval()


def test_row_strips_cover_the_rows_once():
    assert row_strips(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert row_strips(3, 5) == [(0, 3)]
    for h, r in ((17, 1), (17, 3), (16, 16)):
        rows = [i for a, b in row_strips(h, r) for i in range(a, b)]
        assert rows == list(range(h))


@pytest.mark.parametrize("a,b", [(0, 3), (3, 7), (5, 14), (0, 14), (13, 14)])
def test_upsample_rows_equal_the_upsample(a, b):
    up = _randomize(Upsample(6))
    x = torch.randn(2, 6, 7, 5)
    whole = up(x)
    torch.testing.assert_close(UpsampleRows(up, x).rows(a, b), whole[:, :, a:b], **TOL)


@pytest.mark.parametrize("source", ["tensor", "non_contiguous", "upsample"])
def test_group_norm_affine_equals_group_norm(source):
    norm = _randomize(nn.GroupNorm(4, 8, eps=1e-6))
    x = torch.randn(2, 8, 11, 6) * 3 + 1
    if source == "tensor":
        src, whole = TensorRows(x), x
    elif source == "non_contiguous":
        xt = x.transpose(2, 3).contiguous().transpose(2, 3)
        src, whole = TensorRows(xt), xt
        assert not src.whole
    else:
        up = _randomize(Upsample(8), seed=3)
        src, whole = UpsampleRows(up, x), up(x)
    scale, shift = group_norm_affine(norm, src, row_strips(src.shape[2], 4))
    torch.testing.assert_close(whole * scale + shift, norm(whole), **TOL)


@pytest.mark.parametrize("c_in,c_out,rows", [(32, 32, 1), (32, 32, 4), (64, 32, 3), (64, 32, 64)])
def test_stream_resblock_equals_the_block(c_in, c_out, rows):
    block = _randomize(ResnetBlock(c_in, c_out))
    x = torch.randn(2, c_in, 13, 9)
    keep = x.clone()
    with torch.no_grad():
        expected = block(x)
        out, work = stream_resblock(block, TensorRows(x), row_strips(13, rows))
    torch.testing.assert_close(out, expected, **TOL)
    assert torch.equal(x, keep)  # not owned: the caller's input is left alone
    assert work.shape == (2, c_out, 13, 9)


def test_owned_input_becomes_the_output():
    """An owned source (the caller hands it over) is the identity block's accumulator: no copy of the map."""
    block = _randomize(ResnetBlock(32, 32))
    x = torch.randn(1, 32, 10, 7)
    with torch.no_grad():
        expected = block(x.clone())
        ptr = x.data_ptr()
        out, _ = stream_resblock(block, TensorRows(x, owned=True), row_strips(10, 4))
    assert out.data_ptr() == ptr
    torch.testing.assert_close(out, expected, **TOL)


def test_stream_level_from_an_upsample_equals_upsample_then_blocks():
    up = _randomize(Upsample(64), seed=1)
    blocks = [_randomize(ResnetBlock(64, 32), seed=2), _randomize(ResnetBlock(32, 32), seed=3)]
    x = torch.randn(1, 64, 6, 5)
    with torch.no_grad():
        h = up(x)
        for b in blocks:
            h = b(h)
        out = stream_level(blocks, UpsampleRows(up, x), rows=5)
    torch.testing.assert_close(out, h, **TOL)


def test_identity_block_on_an_upsample_source():
    """A same-width block fed by a computed source materialises it as the accumulator (UpsampleRows.take)."""
    up, block = _randomize(Upsample(32), seed=7), _randomize(ResnetBlock(32, 32), seed=8)
    x = torch.randn(1, 32, 5, 4)
    with torch.no_grad():
        out, _ = stream_resblock(block, UpsampleRows(up, x), row_strips(10, 3))
        torch.testing.assert_close(out, block(up(x)), **TOL)


def test_streamed_head_and_conv_in():
    norm, conv = _randomize(nn.GroupNorm(4, 8, eps=1e-6)), _randomize(nn.Conv2d(8, 3, 3, 1, 1), seed=1)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(stream_norm_act_conv(norm, conv, x, rows=2), conv(swish(norm(x))), **TOL)
        conv_in = _randomize(nn.Conv2d(3, 8, 3, 1, 1), seed=2)
        img = torch.randn(1, 3, 9, 7)
        torch.testing.assert_close(stream_conv(conv_in, img, rows=4), conv_in(img), **TOL)


def test_deform_rows_concatenate_to_the_whole_result():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 9, 7, dtype=torch.float64, generator=gen)
    offset = torch.randn(1, 2 * 2 * 9, 9, 7, dtype=torch.float64, generator=gen) * 3
    mask = torch.rand(1, 2 * 9, 9, 7, dtype=torch.float64, generator=gen)
    weight = torch.randn(5, 8, 3, 3, dtype=torch.float64, generator=gen)
    whole = modulated_deform_conv2d(x, offset, mask, weight, None, 1, 1, 1)
    parts = [
        modulated_deform_conv2d(x, offset[:, :, a:b], mask[:, :, a:b], weight, None, 1, 1, 1, row_start=a)
        for a, b in row_strips(9, 4)
    ]
    assert (torch.cat(parts, dim=2) - whole).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="rows from 7 of 9"):
        modulated_deform_conv2d(x, offset[:, :, :4], mask[:, :, :4], weight, None, 1, 1, 1, row_start=7)
    with pytest.raises(ValueError, match="must be"):  # without row_start the offsets must cover every row
        modulated_deform_conv2d(x, offset[:, :, :4], mask[:, :, :4], weight, None, 1, 1, 1)


@pytest.mark.parametrize("impl", ["tapwise", "im2col"])
def test_streamed_warp_equals_the_warp(impl):
    warp = WarpBlock(8, deformable_groups=2, dcn_impl=impl)
    _randomize(warp, seed=4)
    with torch.no_grad():
        warp.dcn.conv_offset.weight.mul_(3.0)  # offsets of a few pixels, reaching outside the image at the border
    n, h = torch.randn(2, 8, 10, 9), torch.randn(2, 8, 10, 9)
    with torch.no_grad():
        expected = warp(n, h)
        for rows in (1, 3, 10):
            torch.testing.assert_close(warp.forward_streamed(n, h, rows), expected, **TOL)


def test_streamed_warp_warns_on_the_whole_map_offset_mean(monkeypatch):
    warp = _randomize(WarpBlock(8, deformable_groups=2), seed=5)
    seen = []
    monkeypatch.setattr(type(warp.dcn), "warn_offsets", staticmethod(lambda m: seen.append(float(m))))
    n, h = torch.randn(1, 8, 7, 6), torch.randn(1, 8, 7, 6)
    with torch.no_grad():
        warp.forward_streamed(n, h, rows=2)
        off = warp.dcn.conv_offset(warp.offset_feature(n, h))[:, : 2 * 2 * 9]
    assert seen == pytest.approx([off.abs().mean().item()], rel=1e-5)


def test_applies_only_at_cpu_inference_above_the_size():
    x = torch.zeros(1)
    cfg = RowStreaming(min_mb=1.0, rows=8)
    big, small = (1, 64, 64, 128), (1, 64, 32, 32)  # 2 MiB and 0.25 MiB of float32
    with torch.no_grad():
        assert cfg.applies(big, x, training=False)
        assert not cfg.applies(small, x, training=False)
        assert not cfg.applies(big, x, training=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cfg.applies(big, x, training=False)
    assert not cfg.applies(big, x, training=False)  # autograd on
    with pytest.raises(ValueError, match="rows must be >= 1"):
        RowStreaming(rows=0)


def _tiny_nets(streaming: RowStreaming | None):
    net, vq = perf.build_inference_networks(tiny=True)
    set_row_streaming(net, streaming)
    set_row_streaming(vq, streaming)
    return net, vq


def test_glarenet_lean_schedule_equals_the_plain_path(monkeypatch):
    """Streaming every level (3-row strips) with the deferred s0 / n0 gives the plain output on the same codes
    (and the same codes wherever the latents decide them); s0 is recomputed once, n0 computed once, and under
    autograd nothing streams (the same modules run as without streaming)."""
    net, vq = _tiny_nets(None)
    x = perf.make_low_light_image(40, 52, seed=3)
    calls = {"first_level": 0, "level_forward0": 0, "stream_level": 0}
    first_level, level_forward = Encoder.first_level, Decoder._level_forward

    def spy_first(self, *a):
        calls["first_level"] += 1
        return first_level(self, *a)

    def spy_level(self, box, i):
        calls["level_forward0"] += i == 0
        return level_forward(self, box, i)

    import glare_nat_arch.blocks as blocks

    stream = blocks.stream_level

    def spy_stream(*a, **k):
        calls["stream_level"] += 1
        return stream(*a, **k)

    monkeypatch.setattr(Encoder, "first_level", spy_first)
    monkeypatch.setattr(Decoder, "_level_forward", spy_level)
    monkeypatch.setattr(blocks, "stream_level", spy_stream)
    set_row_streaming(net, ALWAYS)
    set_row_streaming(vq, ALWAYS)
    with torch.inference_mode(), Replay(vq) as lean_run:
        lean = net(x, vq)
    # s0 recomputed once; n0 (D_NL) and D_MF's finest level once each; encoder, D_NL and D_MF: 2 levels each + s0
    assert calls["first_level"] == 1 and calls["level_forward0"] == 2 and calls["stream_level"] == 7
    calls.update(first_level=0, level_forward0=0, stream_level=0)
    with torch.enable_grad(), Replay(vq, force=lean_run):
        trained = net(x, vq)
    assert calls == {"first_level": 0, "level_forward0": 2, "stream_level": 0}
    set_row_streaming(net, None)
    set_row_streaming(vq, None)
    with torch.inference_mode(), Replay(vq, force=lean_run) as plain_run:
        plain = net(x, vq)
    check_same_codes(plain_run, lean_run)
    torch.testing.assert_close(lean, plain, **TOL)
    torch.testing.assert_close(trained.detach(), plain, **TOL)


def test_glarenet_streamed_intermediates_keep_results():
    """With ``return_intermediates`` the levels still stream (no deferral); the dict matches the plain one (on the
    same codes, which agree wherever the latents decide them)."""
    net, vq = _tiny_nets(None)
    x = perf.make_low_light_image(36, 44, seed=4)
    with torch.inference_mode():
        set_row_streaming(net, ALWAYS)
        set_row_streaming(vq, ALWAYS)
        with Replay(vq) as streamed_run:
            streamed = net(x, vq, return_intermediates=True)
        set_row_streaming(net, None)
        set_row_streaming(vq, None)
        with Replay(vq, force=streamed_run) as plain_run:
            plain = net(x, vq, return_intermediates=True)
    check_same_codes(plain_run, streamed_run)
    for key in ("output", "z_hat", "s0", "s1", "n0", "n1", "dnl_rgb", "level1_h_post", "level0_h_post"):
        # relative to the map's scale; the random-weight rescale mean(h_mix) / mean(u) reaches -940 at level 1, so
        # float rounding in u is amplified there (u itself agrees to 1e-6)
        rel = 1e-4 if key.endswith("h_post") else 1e-5
        scale = plain[key].abs().max().item()
        assert (streamed[key] - plain[key]).abs().max().item() <= rel * max(scale, 1.0), key


def test_golden_stage3_streamed(golden, stage3_golden):
    """The official golden output, float64, with every level streamed in 5-row strips and the lean schedule."""
    net, vq = stage3_golden
    net, vq = copy.deepcopy(net).double(), copy.deepcopy(vq).double()
    cfg = RowStreaming(min_mb=0.0, rows=5)
    set_row_streaming(net, cfg)
    set_row_streaming(vq, cfg)
    with torch.inference_mode():
        out = net(golden["input"], vq)
    torch.testing.assert_close(out.double(), golden["outputs"]["stage3"]["output"].double(), rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def stage3_golden(golden):
    from glare_nat_arch.vqgan_arch import GLAREVQGAN
    from glare_nat_models.checkpoint import from_official, load_official

    net = GLARENet(**net_kwargs(golden), per_sample_rescale=False)
    load_official(net, {k: v.clone() for k, v in golden["full_state_dict"].items()})
    vq = from_official(GLAREVQGAN, golden["vqgan_state_dict"], **vqgan_kwargs(golden))
    return net.eval(), vq.eval()


def test_reference_of_the_benchmark_does_not_stream():
    net, vq = perf.build_inference_networks(tiny=True)
    ref = perf.with_explicit_attention(net)
    assert net.RRDB.encoder.row_streaming is not None
    assert all(m.row_streaming is None for m in ref.modules() if isinstance(m, Encoder | Decoder))
    big = torch.zeros(1, 3, 800, 1200)  # maps above 64 MiB: our network defers s0 / n0, the reference must not
    with torch.no_grad():
        assert net.defers_finest(big) and not ref.defers_finest(big)


def test_defer_arguments_are_checked():
    dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=3).eval()
    z = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="return_rgb=False"):
        dec(z, return_rgb=True, defer_finest=True)
    with pytest.raises(ValueError, match="no level_hook"):
        dec.run_backbone(z, level_hook=lambda i, h: h, defer_finest=True)
    with torch.no_grad():
        _, feats = dec(z, return_rgb=False)
        h, deferred = dec(z, return_rgb=False, defer_finest=True)
    assert h is None and callable(deferred[-1])
    torch.testing.assert_close(deferred[-1](), feats[-1], **TOL)


def test_streaming_lowers_the_peak_of_live_tensors():
    """Full-size levels of the tiny network at 256x384: live-tensor peak with streaming (and the lean schedule)
    against the plain inference path, measured by allocation tracking."""
    x = perf.make_low_light_image(256, 384, seed=5)
    peaks = {}
    for name, cfg in (("plain", None), ("streamed", RowStreaming(min_mb=1.0, rows=16))):
        net, vq = _tiny_nets(cfg)
        with torch.inference_mode(), perf.LiveTensorBytes() as probe:
            net(x, vq)
        peaks[name] = probe.peak
    assert peaks["streamed"] < 0.6 * peaks["plain"], peaks


def test_glare_nat_net_streamed_equals_plain():
    """GLARENATNet (NAT-II and NAT-III on, NAT-III at the bottleneck hook) with every level streamed, the lean
    schedule included, gives the plain output on the same NAT-II decisions and codes (NAT-II's inputs agree within
    the tolerance and its initial codes wherever they are decided)."""
    import bench_nat  # scripts/ (on sys.path through tests.test_glare_arch)

    vq, net, flow = bench_nat.build(tiny=True, device=torch.device("cpu"))
    x = perf.make_low_light_image(32, 40, seed=6)
    bench_nat.calibrate(vq, net, flow, x)
    with torch.inference_mode():
        set_row_streaming(net, ALWAYS)
        set_row_streaming(vq, ALWAYS)
        assert net.defers_finest(x)
        with Replay(vq, net.nat2) as streamed_run:
            streamed = net(x, vq)
        set_row_streaming(net, None)
        set_row_streaming(vq, None)
        with Replay(vq, net.nat2, force=streamed_run) as plain_run:
            plain = net(x, vq)
    assert streamed_run.refines and streamed_run.refines[0]["mask_union"].any()  # NAT-II really refined
    check_same_codes(plain_run, streamed_run)
    torch.testing.assert_close(streamed, plain, **TOL)


def test_level_inputs_are_freed_inside_the_level_without_streaming():
    """The level helpers take their input over (one-element list): without streaming, the encoder's level input is
    gone once the level's first block has run, and a decoder level's coarse input once it is upsampled."""
    import weakref

    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(), z_channels=3).eval()
    dec = Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(), z_channels=3).eval()
    seen: dict[str, weakref.ref] = {}
    alive: dict[str, bool] = {}
    enc.down[1].block[0].register_forward_pre_hook(lambda m, a: seen.update(enc=weakref.ref(a[0])))
    enc.down[1].block[1].register_forward_pre_hook(lambda m, a: alive.update(enc=seen["enc"]() is not None))
    dec.up[1].block[-1].register_forward_hook(lambda m, a, out: seen.update(dec=weakref.ref(out)))
    dec.up[0].block[0].register_forward_pre_hook(lambda m, a: alive.update(dec=seen["dec"]() is not None))
    with torch.no_grad():
        enc(torch.randn(1, 3, 16, 16))
        dec.run_backbone(torch.randn(1, 3, 8, 8), collect=False)
    assert alive == {"enc": False, "dec": False}
