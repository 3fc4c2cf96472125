"""``glare-nat-enhance``: enhance your own photos (no ground truth) with the model of a test option file.

Usage::

    python scripts/enhance.py -opt options/test_glare_lol.yml -i photo.jpg -o out/
    python scripts/enhance.py -opt options/test_glare_lol.yml -i photos/ -o out/ --tile auto --bf16

Input is one image file or a folder (non-image files are skipped, sub-folders are not searched). Each image
is written as ``<output>/<stem><suffix>.png`` (PNG, lossless). Any size works: the image is reflect-padded once
and cropped back (glare-nat models pad in their ``test()`` to what their network needs, other BasicSR models to a
multiple of ``--pad-multiple``, 4); ``--tile`` processes large images in overlapping tiles
blended with a cosine cross-fade (see :mod:`glare_nat_models.inference`).

Channel layout and bit depth follow the input:

* RGB in -> RGB out. Gray in -> the network sees the gray value repeated to 3 channels, and the output is
  converted back to **one channel** (BT.601 luma of the enhanced RGB), so a gray photo stays gray.
* An alpha channel is kept unchanged and re-attached (RGBA in -> RGBA out). Gray+alpha is written as RGBA
  with equal R, G, B (OpenCV cannot write 2-channel PNGs).
* 16-bit in -> 16-bit out (``rint(65535 y)``); float images (e.g. 32-bit TIFF) -> 16-bit PNG; else 8-bit.

A file that cannot be read (or fails later) is reported with its name; the others are still processed, and
the exit status is 1 if any file failed (2 for a bad command line / option file).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

import glare_nat_arch  # noqa: F401  (BasicSR import aliases before basicsr)
from glare_nat_data.image_io import is_image_file, read_image, write_image
from glare_nat_models.inference import (
    estimate_bytes_per_pixel,
    load_model_from_options,
    model_forward_fn,
    resolve_precision,
    run_enhancer,
    select_device,
    set_malloc_mmap_threshold,
)
from glare_nat_models.launcher import normalise_argv
from glare_nat_models.progress import LayerProgress, model_networks

__all__ = [
    "SourceImage",
    "load_source",
    "restore_layout",
    "output_paths",
    "enhance_array",
    "parse_tile",
    "parse_overrides",
    "main",
]


@dataclass
class SourceImage:
    """An input photo: ``rgb`` is what the network sees, the rest restores the file's layout on output."""

    rgb: np.ndarray  # (H, W, 3) float32 RGB in [0, 1]
    gray: bool  # the file had one colour channel
    alpha: np.ndarray | None  # (H, W) alpha in the file's dtype, or None
    out_dtype: type  # np.uint8 or np.uint16


def load_source(path: str | Path) -> SourceImage:
    """Read ``path`` with :func:`glare_nat_data.image_io.read_image` and record its channels, alpha and depth.

    Raises:
        FileNotFoundError / ValueError naming the file (from ``read_image``).
    """
    path = Path(path)
    rgb = read_image(path)  # all decoding errors are raised here, naming the file
    raw = cv2.imdecode(np.frombuffer(path.read_bytes(), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    alpha = raw[:, :, -1].copy() if channels in (2, 4) else None
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        alpha = None  # orientation-corrected JPEG cannot have alpha; keep shapes consistent
    out_dtype = np.uint8 if raw.dtype == np.uint8 else np.uint16
    return SourceImage(rgb=rgb, gray=channels <= 2, alpha=alpha, out_dtype=out_dtype)


def _quantise(img: np.ndarray, dtype: type) -> np.ndarray:
    peak = 65535.0 if dtype == np.uint16 else 255.0
    return np.rint(np.clip(img, 0.0, 1.0) * peak).astype(dtype)


def restore_layout(out_rgb: np.ndarray, src: SourceImage) -> np.ndarray:
    """Enhanced ``(H, W, 3)`` float RGB -> array in the source's layout and depth.

    Returns ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, as ``src.out_dtype``.
    """
    img = out_rgb.astype(np.float32)
    if src.gray:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)  # BT.601 luma
    out = _quantise(img, src.out_dtype)
    if src.alpha is None:
        return out
    alpha = src.alpha
    if alpha.dtype != out.dtype:  # only float images (e.g. 32-bit TIFF): float alpha in [0, 1] -> 16-bit
        alpha = _quantise(alpha.astype(np.float32), out.dtype)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.concatenate([out, alpha[:, :, None]], axis=2)


def _write(path: Path, img: np.ndarray) -> None:
    """Write gray / RGB via ``image_io.write_image``; RGBA here (OpenCV wants BGRA)."""
    if img.ndim == 3 and img.shape[2] == 4:
        ok, enc = cv2.imencode(".png", np.ascontiguousarray(img[:, :, [2, 1, 0, 3]]))
        if not ok:
            raise ValueError(f"cannot encode '{path}' as PNG")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(enc.tobytes())
    else:
        write_image(path, img)


def collect_inputs(path: str | Path) -> tuple[list[Path], int]:
    """Files to process and the number of skipped non-image entries of a folder.

    A single file is always attempted (a bad file is then reported by name). A folder contributes its
    image files (by suffix, non-recursive).
    """
    path = Path(path)
    if path.is_file():
        return [path], 0
    if not path.is_dir():
        raise FileNotFoundError(f"input '{path}' does not exist")
    entries = sorted(path.iterdir())
    files = [p for p in entries if is_image_file(p)]
    return files, len(entries) - len(files)


def output_paths(inputs: list[Path], out_dir: Path, suffix: str) -> list[Path]:
    """``out_dir/<stem><suffix>.png`` per input; stems shared by several inputs get the extension added.

    Raises:
        ValueError: an output would overwrite its own input file.
    """
    stems: dict[str, int] = {}
    for p in inputs:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    outs = []
    for p in inputs:
        stem = p.stem if stems[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.').lower()}"
        out = out_dir / f"{stem}{suffix}.png"
        if out.resolve() == p.resolve():
            raise ValueError(f"output '{out}' would overwrite its input; use another --output folder or a --suffix")
        outs.append(out)
    return outs


def enhance_array(fn, rgb: np.ndarray, device: torch.device, **tiling) -> np.ndarray:
    """``(H, W, 3)`` float RGB [0, 1] -> enhanced ``(H, W, 3)`` float32 RGB [0, 1] (any H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None]
    y = run_enhancer(fn, x, device, **tiling)
    return y[0].permute(1, 2, 0).cpu().numpy()


def parse_tile(value: str) -> int | str | None:
    """``--tile`` value: ``'auto'``, ``0`` (-> None: whole image) or a positive tile side (argparse type)."""
    if value.lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--tile expects an integer, 0 or 'auto', got '{value}'") from exc
    if n < 0:
        raise argparse.ArgumentTypeError("--tile must be >= 0")
    return n or None


def parse_overrides(items: list[str] | None) -> dict:
    """``['path:pretrain_network_g=x.pth', 'val:x=1']`` -> ``{key: yaml-parsed value}``."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. path:pretrain_network_g=net.pth), got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glare-nat-enhance",
        description="Enhance low-light photos with the model of a test option file (no ground truth needed).",
    )
    p.add_argument("-opt", "--opt", required=True, help="test option YAML naming the checkpoint(s)")
    p.add_argument("-i", "--input", required=True, help="image file or folder of images")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument(
        "--tile",
        type=parse_tile,
        default="auto",
        help="tile side in pixels; 0 = whole image; auto (default) = fit free GPU memory (no tiling on CPU)",
    )
    p.add_argument("--tile-overlap", type=int, default=32, help="minimum tile overlap in pixels (default 32)")
    p.add_argument("--tile-batch", type=int, default=1, help="tiles per forward pass (default 1)")
    p.add_argument(
        "--pad-multiple",
        type=int,
        default=4,
        help="pad H, W to a multiple of this for models that do not pad themselves (default 4)",
    )
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA only)")
    prec.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--suffix", default="", help="appended to each output file stem (default: none)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option, e.g. network_g:x=1")
    p.add_argument(
        "--mmap-threshold-mb",
        type=float,
        default=0.0,
        help="CPU low-memory mode: allocations of at least this many MiB are handed back to the OS when freed "
        "(glibc; e.g. 4; slower; default 0 = the allocator's default)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 some files failed, 2 setup error)."""
    args = build_parser().parse_args(normalise_argv(list(sys.argv[1:] if argv is None else argv)))
    from tqdm import tqdm

    try:
        inputs, skipped = collect_inputs(args.input)
        if not inputs:
            raise ValueError(f"input folder '{args.input}' contains no image files")
        outs = output_paths(inputs, Path(args.output), args.suffix)
        device = select_device(args.device)
        dtype = resolve_precision(device, args.fp16, args.bf16)
        if args.mmap_threshold_mb > 0 and not set_malloc_mmap_threshold(args.mmap_threshold_mb):
            print("glare-nat-enhance: --mmap-threshold-mb needs glibc; ignored", file=sys.stderr)
        model = load_model_from_options(args.opt, parse_overrides(args.set), device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"glare-nat-enhance: error: {exc}", file=sys.stderr)
        return 2
    if skipped:
        print(f"skipping {skipped} non-image entr{'y' if skipped == 1 else 'ies'} in '{args.input}'", file=sys.stderr)
    fn = model_forward_fn(model, dtype)
    tiling = dict(
        tile=args.tile,
        overlap=args.tile_overlap,
        multiple=args.pad_multiple,
        tile_batch=args.tile_batch,
        progress=not args.quiet,
    )
    if args.tile == "auto" and device.type == "cuda":  # measure the model's memory once, not per image
        tiling["bytes_per_pixel"] = estimate_bytes_per_pixel(fn, 3, device)
    failures: list[tuple[Path, str]] = []
    layers = LayerProgress(model_networks(model), desc="network", enabled=not args.quiet)  # inside one long call
    for src_path, out_path in tqdm(list(zip(inputs, outs)), desc="enhance", unit="img", disable=args.quiet):
        try:
            src = load_source(src_path)
            with layers.track(src_path.name):
                out = enhance_array(fn, src.rgb, device, **tiling)
            _write(out_path, restore_layout(out, src))
        except Exception as exc:  # one bad file must not stop the batch; reported below
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, torch.OutOfMemoryError):
                msg += " (try --tile 512 or smaller, or --fp16/--bf16)"
            failures.append((src_path, msg))
            tqdm.write(f"failed: {src_path}: {msg}", file=sys.stderr)
    done = len(inputs) - len(failures)
    print(f"enhanced {done}/{len(inputs)} image(s) into '{args.output}'", file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) failed:", file=sys.stderr)
        for p, msg in failures:
            print(f"  {p}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
