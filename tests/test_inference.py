"""Padding, overlapped tiling with blending, device/precision policy, and models from test option files."""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import pytest
import torch

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)
from glare_nat_models import inference as inf

# A stock BasicSR net at scale 1: SRVGGNetCompact with num_conv=2 is 4 3x3 convs (first, 2 body, last): radius 4 px.
TINY_NET = {"type": "SRVGGNetCompact", "num_in_ch": 3, "num_out_ch": 3, "num_feat": 4, "num_conv": 2, "upscale": 1}
RECEPTIVE_RADIUS = 4


def tiny_model_options(folder: Path, act_type: str = "prelu") -> Path:
    """Write a checkpoint of a seeded tiny SRVGGNetCompact and a test option file naming it; return the YAML path.

    Shared by test_enhance.py and test_benchmark.py (imported from this module).
    """
    from basicsr.archs.srvgg_arch import SRVGGNetCompact

    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY_NET.items() if k != "type"}
    net = SRVGGNetCompact(**kwargs, act_type=act_type)
    ckpt = folder / "tiny_net.pth"
    torch.save({"params": net.state_dict()}, ckpt)
    yml = folder / "test_tiny.yml"
    net_lines = "\n".join(f"  {k}: {v}" for k, v in dict(TINY_NET, act_type=act_type).items())
    yml.write_text(
        f"name: tiny_sr\nmodel_type: SRModel\nnum_gpu: auto\nmanual_seed: 7\n"
        f"network_g:\n{net_lines}\npath:\n  pretrain_network_g: {ckpt}\n  strict_load_g: true\n",
        encoding="utf-8",
    )
    return yml


# ----------------------------------------------------------------------------------------------- padding
def test_pad_to_multiple_reflects_and_crops_back():
    x = torch.arange(37 * 53, dtype=torch.float32).reshape(1, 1, 37, 53)
    xp, size = inf.pad_to_multiple(x, 4)
    assert xp.shape[-2:] == (40, 56) and size == (37, 53)
    torch.testing.assert_close(xp[..., 37, :53], x[..., 35, :])  # reflect: row 37 mirrors row 35
    torch.testing.assert_close(xp[..., :37, 53], x[..., :, 51])
    assert torch.equal(inf.crop_to(xp, size), x)
    same, size2 = inf.pad_to_multiple(xp, 4)
    assert same is xp and size2 == (40, 56)


def test_pad_tiny_image_falls_back_to_replicate():
    x = torch.rand(1, 3, 2, 3)  # reflect needs pad < size: 2 rows cannot be reflect-padded by 2
    xp, size = inf.pad_to_multiple(x, 4)
    assert xp.shape[-2:] == (4, 4)
    assert torch.equal(xp[..., 3, :3], x[..., 1, :])  # replicated last row
    with pytest.raises(ValueError, match="B, C, H, W"):
        inf.pad_to_multiple(torch.rand(3, 5, 5), 4)


# ----------------------------------------------------------------------------------------------- tiling
@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 64, 16), (112, 64, 30), (400, 96, 32), (44, 20, 12)])
def test_tile_starts_cover_with_min_overlap(length, tile, overlap):
    length, tile = length // 4 * 4, tile // 4 * 4
    starts = inf.tile_starts(length, tile, overlap, multiple=4)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(s % 4 == 0 for s in starts)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap >= requested
    assert all(b > a for a, b in zip(starts, starts[1:]))
    # fewest tiles: one tile less could not keep the overlap
    assert len(starts) - 1 == math.ceil((length - tile) / ((tile - overlap) // 4 * 4))


def test_tile_starts_errors_and_single_tile():
    assert inf.tile_starts(40, 64, 16, 4) == [0]
    with pytest.raises(ValueError, match="overlap"):
        inf.tile_starts(100, 32, 30, 4)


def test_tile_weights_are_a_partition_of_unity_with_zero_margins():
    length, tile, overlap = 200, 64, 16
    starts = inf.tile_starts(length, tile, overlap, 4)
    prof = inf.tile_weights_1d(starts, tile, length)
    total = torch.zeros(length, dtype=torch.float64)
    for s, p in zip(starts, prof):
        total[s : s + tile] += p
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)
    for i in range(len(starts) - 1):  # outer overlap//4 pixels of every interior edge are discarded
        o = starts[i] + tile - starts[i + 1]
        assert torch.all(prof[i, tile - o // 4 :] == 0) and torch.all(prof[i + 1, : o // 4] == 0)
    assert prof[0, 0] == 1 and prof[-1, -1] == 1  # image borders keep full weight


def test_tiled_identity_reproduces_input_odd_size_batched():
    x = torch.rand(2, 3, 37, 53)
    y = inf.tiled_forward(lambda t: t * 1.0, x, tile=16, overlap=8, tile_batch=3, progress=False)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_tiled_forward_rejects_size_changing_fn():
    with pytest.raises(ValueError, match="size-preserving"):
        inf.tiled_forward(lambda t: t[..., ::2, ::2], torch.rand(1, 3, 40, 40), tile=16, overlap=8, progress=False)


# ----------------------------------------------------------------------------------------------- models
def test_load_model_from_options_has_no_side_effects(tmp_path, monkeypatch):
    yml = tiny_model_options(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    model = inf.load_model_from_options(yml, device="cpu")
    assert list(work.iterdir()) == []  # no results/ or experiments/ folder
    assert type(model).__name__ == "SRModel" and model.device.type == "cpu" and not model.is_train
    saved = torch.load(tmp_path / "tiny_net.pth", weights_only=True)["params"]
    for k, v in model.net_g.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_load_model_from_options_errors_name_the_problem(tmp_path):
    yml = tiny_model_options(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.yml"):
        inf.load_model_from_options(tmp_path / "nope.yml", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"pretrain_network_g = '.*missing\.pth'"):
        inf.load_model_from_options(yml, {"path:pretrain_network_g": str(tmp_path / "missing.pth")}, device="cpu")
    with pytest.raises(ValueError, match="names no checkpoint"):
        inf.load_model_from_options(yml, {"path:pretrain_network_g": None}, device="cpu")
    bad = tmp_path / "bad.yml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.yml"):
        inf.load_options(bad)


def test_load_options_overrides():
    opt = {"a": {"b": 1}}
    inf._set_by_path(opt, "a:c", 2)
    inf._set_by_path(opt, "x.y", 3)
    assert opt == {"a": {"b": 1, "c": 2}, "x": {"y": 3}}


def test_tiled_model_matches_untiled(tmp_path):
    """A purely local net (receptive radius 4): with overlap//4 >= 4 tiles are exact, below that they are not."""
    model = inf.load_model_from_options(tiny_model_options(tmp_path), device="cpu")
    fn = inf.model_forward_fn(model)
    x = torch.rand(1, 3, 69, 69, generator=torch.Generator().manual_seed(1))  # padded 72: 3 tiles of 32
    full = inf.run_enhancer(fn, x, torch.device("cpu"), tile=None)
    exact = inf.run_enhancer(fn, x, torch.device("cpu"), tile=32, overlap=4 * RECEPTIVE_RADIUS, tile_batch=2)
    assert full.shape == exact.shape == x.shape
    assert (full - exact).abs().max().item() < 1e-5  # documented tolerance: float rounding only
    rough = inf.run_enhancer(fn, x, torch.device("cpu"), tile=32, overlap=4 * (RECEPTIVE_RADIUS - 1))
    assert (full - rough).abs().max().item() > 1e-4  # the margin rule is what makes tiling exact


def test_model_forward_fn_equals_network(tmp_path):
    model = inf.load_model_from_options(tiny_model_options(tmp_path), device="cpu")
    x = torch.rand(2, 3, 16, 20)
    with torch.no_grad():
        expected = model.net_g(x)
    torch.testing.assert_close(inf.model_forward_fn(model)(x), expected)


# ----------------------------------------------------------------------------------------------- device policy
def test_device_and_precision_policy():
    assert inf.select_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert inf.select_device(None).type == "cuda"
    else:
        assert inf.select_device(None) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="--device cpu"):
            inf.select_device("cuda")
    with pytest.warns(UserWarning, match="CUDA only"):
        assert inf.resolve_precision(torch.device("cpu"), bf16=True) is None
    with pytest.raises(ValueError, match="at most one"):
        inf.resolve_precision(torch.device("cpu"), fp16=True, bf16=True)
    assert inf.resolve_precision(torch.device("cpu")) is None
    assert isinstance(inf.autocast_context(torch.device("cpu"), torch.bfloat16), contextlib.nullcontext)
    with warnings.catch_warnings():  # constructing a CUDA autocast on a CPU-only machine warns
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(inf.autocast_context(torch.device("cuda"), torch.bfloat16), torch.autocast)


def test_auto_tile_size(monkeypatch):
    assert inf.auto_tile_size(torch.device("cpu"), (4000, 6000), bytes_per_pixel=1000.0) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    cuda = torch.device("cuda")
    # 10 GiB free, 60 % usable, 1 kB per pixel -> ~6.4 Mpx: a 2000 x 3000 image fits, 4000 x 6000 does not
    assert inf.auto_tile_size(cuda, (2000, 3000), bytes_per_pixel=1000.0) is None
    side = inf.auto_tile_size(cuda, (4000, 6000), bytes_per_pixel=1000.0)
    assert side % 4 == 0 and side * side <= 10 * 2**30 * 0.6 / 1000 < (side + 4) ** 2
    assert inf.auto_tile_size(cuda, (4000, 6000), bytes_per_pixel=1e9) == 64  # min_tile floor


_RETAINED_SNIPPET = """
import sys, torch
from glare_nat_models.inference import set_malloc_mmap_threshold
if sys.argv[1] != "default":
    assert set_malloc_mmap_threshold(float(sys.argv[1]))
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
base = rss()
for _ in range(2):  # glibc raises its dynamic threshold after the first (mmapped) block is freed
    t = torch.empty(20 * 2**20 // 4).fill_(1.0)
    del t
print(rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc (glibc allocator test)")
def test_malloc_mmap_threshold_hands_freed_blocks_back():
    """glibc's default policy keeps a freed 20 MiB block resident (dynamic threshold); a fixed 1 MiB threshold
    returns it to the OS. Each case in its own process (the setting is process-wide)."""
    import subprocess
    import sys

    def retained(arg: str) -> float:
        proc = subprocess.run([sys.executable, "-c", _RETAINED_SNIPPET, arg], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.split()[-1])

    assert retained("default") >= 15.0
    assert retained("1") <= 5.0
    with pytest.raises(ValueError, match="must be positive"):
        inf.set_malloc_mmap_threshold(0)
