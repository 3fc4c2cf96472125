"""Building blocks of the VQGAN encoder/decoder: math, shapes, official key layout, attention memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import glare_nat_arch  # noqa: F401  (compat shims first)
from glare_nat_arch.blocks import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample, VQGANSize, swish
from tests.rss_probe import PEAK_RSS_HELPERS

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=32, ch_mult=(1, 2, 1), num_res_blocks=2, attn_resolutions=(64,), resolution=256, z_channels=3)


def explicit_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """Reference: the official bmm/softmax formulation with its explicit N x N map (tiny inputs only)."""
    b, c, h, w = x.shape
    hn = block.norm(x)
    q = block.q(hn).reshape(b, c, h * w).permute(0, 2, 1)
    k = block.k(hn).reshape(b, c, h * w)
    v = block.v(hn).reshape(b, c, h * w)
    attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(out)


def test_attn_block_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    block = AttnBlock(32).double()
    for conv in (block.q, block.k, block.v, block.proj_out):
        torch.nn.init.normal_(conv.weight, std=0.3)
    x = torch.randn(2, 32, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(block(x), explicit_attention(block, x), rtol=1e-12, atol=1e-12)


def test_resnet_block_math_and_shortcut():
    torch.manual_seed(0)
    same, wider = ResnetBlock(32).double(), ResnetBlock(32, 64).double()
    assert not hasattr(same, "nin_shortcut")
    assert wider.nin_shortcut.weight.shape == (64, 32, 1, 1)
    x = torch.randn(2, 32, 6, 4, dtype=torch.float64)
    h = wider.conv2(swish(wider.norm2(wider.conv1(swish(wider.norm1(x))))))
    torch.testing.assert_close(wider(x), wider.nin_shortcut(x) + h)
    assert same(x).shape == x.shape
    assert same.norm1.num_groups == 32 and same.norm1.eps == 1e-6


def test_downsample_pads_right_bottom_then_strided_conv():
    torch.manual_seed(0)
    down = Downsample(8).double()
    for h, w in ((8, 12), (7, 9)):
        x = torch.randn(1, 8, h, w, dtype=torch.float64)
        ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        torch.testing.assert_close(down(x), ref)
    assert down(torch.zeros(1, 8, 8, 12, dtype=torch.float64)).shape == (1, 8, 4, 6)


def test_upsample_nearest_then_conv():
    torch.manual_seed(0)
    up = Upsample(4).double()
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    rep = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), up.conv(rep))


def test_encoder_decoder_shapes_skips_and_features():
    torch.manual_seed(0)
    enc, dec = Encoder(VQGANSize(**TINY)), Decoder(VQGANSize(**TINY))
    x = torch.randn(2, 3, 32, 48)
    z, skips = enc(x, return_skips=True)
    assert z.shape == (2, 3, 8, 12)
    assert [tuple(s.shape) for s in skips] == [(2, 32, 32, 48), (2, 64, 16, 24)]
    torch.testing.assert_close(enc(x), z)
    rgb, feats = dec(z)
    assert rgb.shape == (2, 3, 32, 48)
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 32, 32, 48)]
    no_rgb, feats2 = dec(z, return_rgb=False)
    assert no_rgb is None
    torch.testing.assert_close(feats2[1], feats[1])
    # attention only at the 1/4 level (nominal resolution 64), as the official layout
    assert len(enc.down[2].attn) == 2 and len(enc.down[0].attn) == 0 and len(dec.up[2].attn) == 3


def test_official_sizes_key_layout_and_parameter_counts():
    with torch.device("meta"):
        enc, dec = Encoder(), Decoder()
    # docs/glare.md "Parameters and MACs" (computed from the official architecture)
    assert sum(p.numel() for p in enc.parameters()) == 24_440_707
    assert sum(p.numel() for p in dec.parameters()) == 36_115_715
    keys_e, keys_d = set(enc.state_dict()), set(dec.state_dict())
    for k in (
        "conv_in.weight",
        "down.0.block.1.conv2.weight",
        "down.1.block.0.nin_shortcut.weight",
        "down.2.block.0.nin_shortcut.weight",
        "down.2.attn.1.proj_out.weight",
        "down.1.downsample.conv.weight",
        "mid.attn_1.q.weight",
        "norm_out.weight",
    ):
        assert k in keys_e, k
    assert "down.2.downsample.conv.weight" not in keys_e
    assert enc.state_dict()["conv_out.weight"].shape == (3, 512, 3, 3)
    for k in (
        "up.2.attn.2.v.bias",
        "up.1.block.0.nin_shortcut.weight",
        "up.0.block.2.conv1.weight",
        "up.1.upsample.conv.bias",
    ):
        assert k in keys_d, k
    assert "up.0.upsample.conv.weight" not in keys_d
    assert dec.state_dict()["up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)


_MEMORY_PROBE = PEAK_RSS_HELPERS + textwrap.dedent(
    """
    import importlib.util, json, sys, torch
    # load blocks.py alone (it only needs torch): skips importing basicsr through the package
    spec = importlib.util.spec_from_file_location("blocks_probe", sys.argv[1])
    blocks = importlib.util.module_from_spec(spec)
    sys.modules["blocks_probe"] = blocks  # dataclasses look their module up
    spec.loader.exec_module(blocks)
    AttnBlock = blocks.AttnBlock
    torch.set_num_threads(2)

    torch.manual_seed(0)
    block = AttnBlock(512).eval()
    x = torch.randn(1, 512, 100, 150)  # 15,000 positions
    sdpa = peak_extra_mb(lambda: block(x))
    q = torch.randn(1, 7500, 512)  # control: an explicit 7500 x 7500 float32 map is 225 MB
    explicit = peak_extra_mb(lambda: torch.softmax(q @ q.transpose(1, 2) * 512**-0.5, dim=-1) @ q)
    print(json.dumps({"sdpa_mb": sdpa, "explicit_control_mb": explicit}))
    """
)


def test_attn_block_memory_stays_far_below_the_explicit_attention_map():
    """AttnBlock(512) on 512 x 100 x 150: peak extra RSS <= 1/4 of the 0.9 GB an explicit N x N fp32 map needs.

    Peak RSS is measured by the kernel (VmHWM after resetting it via /proc/self/clear_refs) in a fresh process.
    The control runs explicit attention on half the positions (a 225 MB map) and must register at least 225 MB,
    which shows the probe sees such allocations.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(REPO_ROOT / "glare_nat_arch" / "blocks.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    n = 100 * 150
    full_map_mb = n * n * 4 / 2**20  # 858 MiB = 0.9 GB
    assert res["explicit_control_mb"] >= full_map_mb / 4, res
    assert res["sdpa_mb"] <= full_map_mb / 4, res


def test_vqgan_size_is_defined_once_and_shared():
    """Flat option keys (YAML lists) become one frozen VQGANSize; E_c and D_MF of a GLARENet use the same one."""
    import dataclasses

    from glare_nat_arch.glare_arch import GLARENet

    size = VQGANSize(**{**TINY, "ch_mult": [1, 2, 1], "attn_resolutions": [64]})
    assert size == VQGANSize(**TINY) and size.ch_mult == (1, 2, 1) and size.downscale == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        size.ch = 64
    with torch.device("meta"):
        net = GLARENet(**{**TINY, "ch_mult": [1, 2, 1]})
    assert net.RRDB.encoder.size is net.size is net.deformable_decoder.size and net.size == size
