"""Build a tiny LOL-style paired dataset from the photos shipped inside scikit-image (no network).

Output (LOL-v1 layout, read by ``LOLPairedDataset`` with ``layout: lolv1`` or ``auto``)::

    <out>/our485/{low,high}/demoNNNN.png   --n-train pairs
    <out>/eval15/{low,high}/demoNNNN.png   --n-test pairs

Ground truth: random crops (area 35-100 % of the largest crop with the output aspect ratio, random
position, random horizontal flip) of ``astronaut``, ``coffee``, ``chelsea`` and ``rocket`` (the colour
photos bundled in the scikit-image wheel; nothing is downloaded), resized with area interpolation to
``--size`` and stored as 8-bit sRGB. Pair ``i`` uses photo ``i mod 4``; test pairs use different random
crops of the same photos, so the data is for smoke tests and demos only, never for reported numbers.

Low-light synthesis, per pair, on ``x`` = ground truth in [0, 1] (a simple camera model):

1. Linearise: ``L = x ** 2.2``.
2. Exposure: ``L *= k`` with ``k ~ U(0.02, 0.10)`` (about 3.3 to 5.6 stops darker).
3. Colour shift: per-channel gains ``g_c ~ U(0.85, 1.15)``, normalised to mean 1 (a white-balance cast).
4. Sensor noise, Poisson-Gaussian (signal dependent): ``L = Poisson(L * Q) / Q + N(0, s^2)`` with
   full-well ``Q ~ U(300, 1500)`` photo-electrons at saturation and read noise ``s ~ U(0.001, 0.004)``.
5. Gamma back to sRGB: ``y = clip(L, 0, 1) ** (1 / 2.2)``, quantised to 8 bits.

Unpaired set (``--unpaired DIR``, off by default; ``make demo`` uses ``datasets/demo_lol/unpaired``): the first
``--n-unpaired`` of the four photos, whole (not cropped), resized with area interpolation so that the longer side is
``--unpaired-size`` (320: at least two 96x96 blocks, as NIQE needs), darkened by the same steps 1-5, written as
``DIR/<photo>.png`` without ground truth (sizes differ from photo to photo).

Deterministic: the same arguments give byte-identical files (``numpy.random.default_rng(seed)``, PNG
written by OpenCV). Idempotent: re-running overwrites the files and removes stale ``demo*.png`` files
left in the four folders by a larger earlier run; other files there are left alone.

Usage: ``python scripts/make_demo_lol.py --out datasets/demo_lol --size 96x128 --n-train 24 --n-test 6
[--unpaired datasets/demo_lol/unpaired --n-unpaired 4 --unpaired-size 320]``
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
_DEMO_NAME = re.compile(r"^demo\d+\.png$")


def load_photos() -> list[np.ndarray]:
    """The bundled RGB uint8 photos ``(H, W, 3)``; fails clearly if one is missing from the install."""
    out = []
    for name in PHOTOS:
        try:
            out.append(np.ascontiguousarray(getattr(skdata, name)()[:, :, :3]))
        except Exception as exc:  # pooch download attempt / missing file
            raise RuntimeError(f"scikit-image sample photo '{name}' is not available offline: {exc}") from exc
    return out


def random_crop(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of ``photo`` with the aspect ratio of ``size`` = (H, W), resized to ``size``; uint8."""
    ph, pw = photo.shape[:2]
    h, w = size
    scale = min(ph / h, pw / w) * np.sqrt(rng.uniform(0.35, 1.0))  # crop area 35-100 % of the largest
    ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
    top, left = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[top : top + ch, left : left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ch >= h else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=interp)


def synthesize_low_light(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low-light version of an RGB uint8 image ``(H, W, 3)`` (steps 1-5 of the module docstring); uint8."""
    lin = (gt.astype(np.float64) / 255.0) ** 2.2
    lin = lin * rng.uniform(0.02, 0.10)
    gains = rng.uniform(0.85, 1.15, size=3)
    lin = lin * (gains / gains.mean())
    full_well = rng.uniform(300.0, 1500.0)
    lin = rng.poisson(np.clip(lin, 0.0, None) * full_well) / full_well
    lin = lin + rng.normal(0.0, rng.uniform(0.001, 0.004), size=lin.shape)
    srgb = np.clip(lin, 0.0, 1.0) ** (1.0 / 2.2)
    return np.round(srgb * 255.0).astype(np.uint8)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise OSError(f"could not encode '{path}'")
    path.write_bytes(buf.tobytes())


def make_demo(out: Path, size: tuple[int, int], n_train: int, n_test: int, seed: int = 0) -> dict[str, int]:
    """Write the demo set under ``out``; returns the number of pairs per split folder."""
    photos = load_photos()
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("our485", n_train), ("eval15", n_test)):
        names = [f"demo{i + 1:04d}.png" for i in range(n)]
        for sub in ("low", "high"):
            folder = out / split / sub
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():
                if _DEMO_NAME.match(stale.name) and stale.name not in names:
                    stale.unlink()
        for i, name in enumerate(names):
            gt = random_crop(photos[i % len(photos)], size, rng)
            low = synthesize_low_light(gt, rng)
            _write_png(out / split / "high" / name, gt)
            _write_png(out / split / "low" / name, low)
        counts[split] = n
    return counts


def make_unpaired(out: Path, n: int, long_side: int, seed: int = 0) -> list[str]:
    """Write ``n`` whole photos, resized to ``long_side`` and darkened, to ``out`` (no ground truth); their names.

    Re-running removes ``<photo>.png`` files of the other bundled photos left by a larger earlier run.
    """
    if not 1 <= n <= len(PHOTOS):
        raise ValueError(f"--n-unpaired must be in [1, {len(PHOTOS)}], got {n}")
    rng = np.random.default_rng([seed, 1])  # a stream of its own: the paired set does not change
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{name}.png" for name in PHOTOS[:n]]
    for stale in (out / f"{name}.png" for name in PHOTOS[n:]):
        stale.unlink(missing_ok=True)
    for name, photo in zip(names, load_photos()):
        h, w = photo.shape[:2]
        scale = long_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        _write_png(out / name, synthesize_low_light(cv2.resize(photo, size, interpolation=interp), rng))
    return names


def parse_size(text: str) -> tuple[int, int]:
    """``'96x128'`` -> (96, 128) as (H, W); ``'96'`` -> (96, 96)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"--size '{text}': expected HxW, e.g. 96x128") from None
    if len(parts) > 2 or not (8 <= h <= 1024 and 8 <= w <= 1024):
        raise argparse.ArgumentTypeError(f"--size '{text}': expected HxW with 8 <= H, W <= 1024")
    return h, w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("datasets/demo_lol"), help="output root")
    parser.add_argument("--size", type=parse_size, default=(96, 128), help="image size HxW (default 96x128)")
    parser.add_argument("--n-train", type=int, default=24, help="training pairs (our485)")
    parser.add_argument("--n-test", type=int, default=6, help="test pairs (eval15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unpaired", type=Path, help="also write darkened whole photos (no ground truth) here")
    parser.add_argument("--n-unpaired", type=int, default=4, help=f"photos in --unpaired (1-{len(PHOTOS)}, default 4)")
    parser.add_argument("--unpaired-size", type=int, default=320, help="longer side of the --unpaired photos")
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        parser.error("--n-train and --n-test must be at least 1")
    if not 1 <= args.n_unpaired <= len(PHOTOS) or not 8 <= args.unpaired_size <= 2048:
        parser.error(f"--n-unpaired must be in [1, {len(PHOTOS)}] and --unpaired-size in [8, 2048]")
    counts = make_demo(args.out, args.size, args.n_train, args.n_test, args.seed)
    h, w = args.size
    print(f"wrote {counts['our485']} train + {counts['eval15']} test pairs of {w}x{h} (WxH) to {args.out}")
    if args.unpaired is not None:
        names = make_unpaired(args.unpaired, args.n_unpaired, args.unpaired_size, args.seed)
        print(f"wrote {len(names)} unpaired photos (longer side {args.unpaired_size}) to {args.unpaired}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
