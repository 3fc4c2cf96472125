"""The enhance CLI on users' photos: odd sizes, gray, RGBA, 16-bit, tiling, bad files, the script wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_inference import tiny_model_options

import glare_nat_arch  # noqa: F401  (compat shims before basicsr)
from glare_nat_models import enhance_cli
from glare_nat_models.inference import load_model_from_options

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Option file of a tiny seeded net and a reference: the network on the reflect-padded image, cropped back."""
    folder = tmp_path_factory.mktemp("model")
    yml = tiny_model_options(folder)
    net = load_model_from_options(yml, device="cpu").net_g.eval()

    def reference(rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) float RGB -> expected (H, W, 3) float RGB output."""
        h, w = rgb.shape[:2]
        x = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float()[None]
        x = F.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="reflect")
        with torch.no_grad():
            y = net(x)[..., :h, :w].clamp(0, 1)
        return y[0].permute(1, 2, 0).numpy()

    return yml, reference


def _run(yml: Path, inp: Path, out: Path, *extra: str) -> int:
    return enhance_cli.main(["-opt", str(yml), "-i", str(inp), "-o", str(out), "--quiet", "--device", "cpu", *extra])


def _rng_image(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    peak = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, peak + 1, size=shape, dtype=np.int64).astype(dtype)


def test_odd_size_rgb_equals_padded_network_output(setup, tmp_path):
    yml, reference = setup
    bgr = _rng_image((37, 53, 3))
    cv2.imwrite(str(tmp_path / "odd.png"), bgr)
    assert _run(yml, tmp_path / "odd.png", tmp_path / "out", "--suffix", "_x") == 0
    got = cv2.imread(str(tmp_path / "out" / "odd_x.png"), cv2.IMREAD_UNCHANGED)
    assert got.shape == (37, 53, 3) and got.dtype == np.uint8
    expected = np.rint(reference(bgr[:, :, ::-1] / 255.0) * 255)[:, :, ::-1]
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_gray_stays_gray(setup, tmp_path):
    yml, reference = setup
    gray = _rng_image((30, 41), seed=1)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert _run(yml, tmp_path / "g.png", tmp_path / "out") == 0
    got = cv2.imread(str(tmp_path / "out" / "g.png"), cv2.IMREAD_UNCHANGED)
    assert got.shape == (30, 41) and got.dtype == np.uint8
    rgb_out = reference(np.repeat(gray[:, :, None] / 255.0, 3, axis=2).astype(np.float32))
    expected = np.rint(cv2.cvtColor(rgb_out, cv2.COLOR_RGB2GRAY) * 255)
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_rgba_alpha_preserved(setup, tmp_path):
    yml, reference = setup
    bgra = _rng_image((24, 36, 4), seed=2)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    assert _run(yml, tmp_path / "a.png", tmp_path / "out") == 0
    got = cv2.imread(str(tmp_path / "out" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert got.shape == (24, 36, 4)
    np.testing.assert_array_equal(got[:, :, 3], bgra[:, :, 3])
    expected = np.rint(reference(bgra[:, :, 2::-1] / 255.0) * 255)[:, :, ::-1]
    assert np.abs(got[:, :, :3].astype(int) - expected).max() <= 1


def test_16bit_in_16bit_out(setup, tmp_path):
    yml, reference = setup
    bgr16 = _rng_image((21, 27, 3), np.uint16, seed=3)
    cv2.imwrite(str(tmp_path / "deep.png"), bgr16)
    assert _run(yml, tmp_path / "deep.png", tmp_path / "out") == 0
    got = cv2.imread(str(tmp_path / "out" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert got.dtype == np.uint16 and got.shape == (21, 27, 3)
    expected = np.rint(reference(bgr16[:, :, ::-1] / 65535.0) * 65535)[:, :, ::-1]
    assert np.abs(got.astype(np.int64) - expected).max() <= 2  # float32 network, 16-bit steps
    assert len(np.unique(got)) > 256  # really 16-bit content, not 8-bit scaled up


def test_tiled_cli_matches_untiled(setup, tmp_path):
    yml, _ = setup
    cv2.imwrite(str(tmp_path / "big.png"), _rng_image((69, 69, 3), seed=4))
    assert _run(yml, tmp_path / "big.png", tmp_path / "whole", "--tile", "0") == 0
    assert _run(yml, tmp_path / "big.png", tmp_path / "tiled", "--tile", "32", "--tile-overlap", "16") == 0
    a = cv2.imread(str(tmp_path / "whole" / "big.png")).astype(int)
    b = cv2.imread(str(tmp_path / "tiled" / "big.png")).astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.001  # float rounding at most flips one level


def test_folder_with_bad_and_non_image_files(setup, tmp_path, capsys):
    yml, _ = setup
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "good.png"), _rng_image((16, 16, 3)))
    (src / "broken.png").write_bytes(b"this is not a png")
    (src / "notes.txt").write_text("not an image")
    assert _run(yml, src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "could not be decoded" in err
    assert "skipping 1 non-image" in err and "enhanced 1/2" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png"]


def test_setup_errors_exit_2(setup, tmp_path, capsys):
    yml, _ = setup
    cv2.imwrite(str(tmp_path / "x.png"), _rng_image((8, 8, 3)))
    assert enhance_cli.main(["-opt", str(tmp_path / "none.yml"), "-i", str(tmp_path / "x.png"), "-o", "o"]) == 2
    assert "none.yml" in capsys.readouterr().err
    assert _run(yml, tmp_path / "missing", tmp_path / "out") == 2
    assert "missing" in capsys.readouterr().err


def test_output_paths_disambiguate_and_never_overwrite_inputs(tmp_path):
    ins = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b.png"]
    outs = enhance_cli.output_paths(ins, tmp_path / "o", "_e")
    assert [p.name for p in outs] == ["a_png_e.png", "a_jpg_e.png", "b_e.png"]
    with pytest.raises(ValueError, match="overwrite its input"):
        enhance_cli.output_paths([tmp_path / "b.png"], tmp_path, "")


def test_script_wrapper_reports_failures(setup, tmp_path):
    """``python scripts/enhance.py`` end to end in a fresh interpreter: bad file named, exit status 1."""
    yml, _ = setup
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "ok.png"), _rng_image((12, 20, 3)))
    (src / "zero.png").write_bytes(b"")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "scripts" / "enhance.py"), "-opt", str(yml), "-i", str(src), "-o"]
    res = subprocess.run(
        [*cmd, str(tmp_path / "out"), "--quiet", "--device", "cpu"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 1, res.stderr
    assert "zero.png" in res.stderr and "empty" in res.stderr
    assert (tmp_path / "out" / "ok.png").is_file()


def test_mmap_threshold_option_sets_the_allocator_policy(setup, tmp_path, monkeypatch):
    """``--mmap-threshold-mb`` reaches the allocator (mocked here: it is process-wide; its effect is tested in a
    subprocess in test_inference.py); without it the policy is left alone."""
    yml, _ = setup
    cv2.imwrite(str(tmp_path / "a.png"), _rng_image((12, 16, 3)))
    calls = []
    monkeypatch.setattr(enhance_cli, "set_malloc_mmap_threshold", lambda mb: calls.append(mb) or True)
    assert _run(yml, tmp_path / "a.png", tmp_path / "o1") == 0
    assert calls == []
    assert _run(yml, tmp_path / "a.png", tmp_path / "o2", "--mmap-threshold-mb", "4") == 0
    assert calls == [4.0]


def _tiny_glare_options(folder: Path) -> Path:
    """Option file of a tiny seeded GLARE (Stage III) model with its two checkpoints."""
    from glare_nat_arch.glare_arch import GLARENet
    from glare_nat_arch.vqgan_arch import GLAREVQGAN

    size = dict(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[])
    flow = dict(cond_channels=8, flow_hidden_channels=8, flow_L=1, flow_K=2, flow_n_extra_steps=1)
    flow.update(flow_unused_f_in=4, flow_unused_f_out=4)
    torch.manual_seed(0)
    for name, net in (("vq", GLAREVQGAN(**size, n_embed=16)), ("g", GLARENet(**size, **flow))):
        torch.save({"params": net.state_dict()}, folder / f"{name}.pth")

    def block(d: dict) -> str:
        return "".join(f"  {k}: {v}\n" for k, v in d.items())

    yml = folder / "tiny_glare.yml"
    yml.write_text(
        "name: tiny_glare\nmodel_type: GLAREAFTModel\nnum_gpu: 0\n"
        f"network_vq:\n  type: GLAREVQGAN\n  n_embed: 16\n{block(size)}"
        f"network_g:\n  type: GLARENet\n{block(size)}{block(flow)}"
        f"path:\n  pretrain_network_vq: {folder / 'vq.pth'}\n  pretrain_network_g: {folder / 'g.pth'}\n"
        "val:\n  extra_pad: [0, 0]\n",
        encoding="utf-8",
    )
    return yml


def test_an_enhance_call_pads_the_image_once(tmp_path, monkeypatch):
    """CLI -> tiler -> model.test() -> GLARENet: exactly one reflect/replicate pad of the 37x53 photo (the
    network's own zero pads, e.g. before its stride-2 convs, are not image padding)."""
    yml = _tiny_glare_options(tmp_path)
    cv2.imwrite(str(tmp_path / "odd.png"), _rng_image((37, 53, 3)))
    pads: list[tuple[tuple[int, ...], str]] = []
    original = F.pad

    def counting_pad(x, pad, mode="constant", value=None):
        if mode != "constant":
            pads.append((tuple(x.shape), mode))
        return original(x, pad, mode=mode, value=value)

    monkeypatch.setattr(F, "pad", counting_pad)
    assert _run(yml, tmp_path / "odd.png", tmp_path / "out", "--tile", "0") == 0
    assert pads == [((1, 3, 37, 53), "reflect")]
    assert cv2.imread(str(tmp_path / "out" / "odd.png")).shape == (37, 53, 3)
