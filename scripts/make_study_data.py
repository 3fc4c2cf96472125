"""Build the proxy-study paired dataset from the photos bundled with scikit-image (no network).

Unlike the demo set (scripts/make_demo_lol.py: train and test are crops of the same four photos), the test split
here is made of WHOLE photos that no training crop comes from, so test numbers measure generalisation.

Output (LOL-v1 layout, read by ``LOLPairedDataset`` with ``layout: lolv1`` or ``auto``)::

    <out>/our485/{low,high}/studyNNNN.png   --n-train crops of the training photos, --crop x --crop pixels
    <out>/eval15/{low,high}/<photo>.png     the held-out photos, whole, longer side about --test-size

Photos (all ship inside the scikit-image wheel; the functions that would download through pooch are not used):

- training (``TRAIN_PHOTOS``): colour ``astronaut``, ``coffee``, ``immunohistochemistry``, ``hubble_deep_field``,
  ``retina``; greyscale ``brick``, ``grass``, ``gravel``, ``moon``, ``coins``, ``clock``, ``cell`` stored as grey RGB
  (texture variety for the codebook).
- held out (``TEST_PHOTOS``): ``chelsea``, ``rocket``, ``motorcycle_left`` (left view of ``stereo_motorcycle``; the
  right view is used nowhere: it is nearly the same picture) and ``camera`` (greyscale).

Training crops: crop ``i`` comes from training photo ``i mod 12``; the photo is first resized (area interpolation)
so that its longer side is ``U(0.75, 1.5) * --test-size`` (never enlarged beyond the original), so objects appear
at about the scale of the held-out photos, then a random ``--crop`` square is cut and flipped horizontally with
probability 1/2. Held-out photos: resized so the longer side is ``--test-size``, then centre-cropped to multiples
of 8 pixels. Both splits are darkened by the demo's low-light synthesis
(:func:`make_demo_lol.synthesize_low_light`: gamma 2.2, exposure x U(0.02, 0.10), colour cast, Poisson-Gaussian
noise, 8-bit).

Deterministic: the same arguments give byte-identical files (``numpy.random.default_rng``; the held-out photos use a
stream of their own, so ``--n-train`` does not change them). Re-running removes stale ``study*.png`` / held-out
files left in the four folders by an earlier run; other files there are left alone.

Usage: ``python scripts/make_study_data.py --out datasets/study_lol --n-train 480 --crop 96 --test-size 256``
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_lol import _write_png, synthesize_low_light  # noqa: E402 (the demo's camera model, not a copy)

TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "clock",
    "cell",
)
TEST_PHOTOS = ("chelsea", "rocket", "motorcycle_left", "camera")
_STUDY_NAME = re.compile(r"^study\d+\.png$")


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as RGB uint8 ``(H, W, 3)`` (greyscale replicated); fails clearly when not offline."""
    try:
        img = skdata.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skdata, name)()
    except Exception as exc:  # pooch download attempt / missing file
        raise RuntimeError(f"scikit-image sample photo '{name}' is not available offline: {exc}") from exc
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise RuntimeError(f"scikit-image sample photo '{name}' has dtype {img.dtype}, expected uint8")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def resize_long_side(photo: np.ndarray, long_side: float) -> np.ndarray:
    """``photo`` resized (area interpolation when shrinking) so its longer side is ``long_side`` pixels."""
    h, w = photo.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(photo, size, interpolation=interp)


def train_crop(photo: np.ndarray, crop: int, test_size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``crop x crop`` RGB uint8 crop at about the held-out scale (module docstring)."""
    long_side = min(max(photo.shape[:2]), rng.uniform(0.75, 1.5) * test_size)
    long_side = max(long_side, crop * max(photo.shape[:2]) / min(photo.shape[:2]))  # the short side fits the crop
    img = resize_long_side(photo, long_side)
    h, w = img.shape[:2]
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    out = img[top : top + crop, left : left + crop]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def test_image(photo: np.ndarray, test_size: int) -> np.ndarray:
    """The whole photo, longer side ``test_size``, centre-cropped to multiples of 8."""
    img = resize_long_side(photo, test_size)
    h, w = img.shape[:2]
    h8, w8 = h - h % 8, w - w % 8
    top, left = (h - h8) // 2, (w - w8) // 2
    return np.ascontiguousarray(img[top : top + h8, left : left + w8])


def _clean(folder: Path, keep: set[str], pattern) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if pattern(stale.name) and stale.name not in keep:
            stale.unlink()


def make_study(out: Path, n_train: int, crop: int, test_size: int, seed: int = 0) -> dict[str, int]:
    """Write the study set under ``out``; returns the number of pairs per split folder."""
    train = [load_photo(name) for name in TRAIN_PHOTOS]
    test = [load_photo(name) for name in TEST_PHOTOS]
    names = [f"study{i + 1:04d}.png" for i in range(n_train)]
    test_names = [f"{name}.png" for name in TEST_PHOTOS]
    for sub in ("low", "high"):
        _clean(out / "our485" / sub, set(names), lambda n: bool(_STUDY_NAME.match(n)))
        _clean(out / "eval15" / sub, set(test_names), lambda n: n[:-4] in TEST_PHOTOS and n.endswith(".png"))
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        gt = train_crop(train[i % len(train)], crop, test_size, rng)
        _write_png(out / "our485" / "high" / name, gt)
        _write_png(out / "our485" / "low" / name, synthesize_low_light(gt, rng))
    rng = np.random.default_rng([seed, 2])  # a stream of its own: --n-train does not change the test set
    for name, photo in zip(test_names, test):
        gt = test_image(photo, test_size)
        _write_png(out / "eval15" / "high" / name, gt)
        _write_png(out / "eval15" / "low" / name, synthesize_low_light(gt, rng))
    return {"our485": n_train, "eval15": len(test_names)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("datasets/study_lol"), help="output root")
    parser.add_argument("--n-train", type=int, default=480, help="training crops (our485, default 480)")
    parser.add_argument("--crop", type=int, default=96, help="training crop side in pixels (default 96)")
    parser.add_argument("--test-size", type=int, default=256, help="longer side of the held-out photos (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problems = []
    if args.n_train < 1:
        problems.append(f"--n-train must be at least 1, got {args.n_train}")
    if not 16 <= args.crop <= 512:
        problems.append(f"--crop must be in [16, 512], got {args.crop}")
    if not 64 <= args.test_size <= 1024:
        problems.append(f"--test-size must be in [64, 1024], got {args.test_size}")
    if problems:
        parser.error("; ".join(problems))
    counts = make_study(args.out, args.n_train, args.crop, args.test_size, args.seed)
    print(
        f"wrote {counts['our485']} training crops of {args.crop}x{args.crop} and {counts['eval15']} held-out photos "
        f"(longer side {args.test_size}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
