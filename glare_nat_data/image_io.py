"""Reading, writing and listing images: the one place where files become arrays.

Every dataset and the ``enhance`` CLI read through :func:`read_image`, so all of them agree on
channel order (RGB), range ([0, 1]), bit depth (8- and 16-bit) and the error raised for a bad file.
Nothing here imports basicsr or torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_io_backend",
    "is_image_file",
    "list_images",
    "natural_key",
    "read_image",
    "write_image",
]

#: File suffixes (lower case) treated as images; everything else in a folder is skipped silently.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"})

_JPEG_MAGIC = b"\xff\xd8\xff"


def is_image_file(path: str | Path) -> bool:
    """True for a regular, non-hidden file with an image suffix (``.DS_Store``, ``._x.png``, ``Thumbs.db`` are not)."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()


def natural_key(text: str) -> tuple:
    """Sort key that orders ``2.png`` before ``10.png`` (digits compare as numbers, letters case-insensitively)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", text) if t)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, in natural order; stray non-image files are skipped.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a directory.
        ValueError: ``folder`` holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist (or is not a directory)")
    files = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name))
    if not files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"image folder '{folder}' contains no image files (looked for {exts})")
    return files


def _to_unit_float(img: np.ndarray, path: Path) -> np.ndarray:
    """Scale an integer or float array to float32 in [0, 1] according to its dtype."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype in (np.float32, np.float64):
        return np.clip(img.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"image '{path}' has unsupported pixel type {img.dtype} (expected 8/16-bit integer or float)")


def _to_rgb(img: np.ndarray, path: Path) -> np.ndarray:
    """OpenCV channel layouts (H,W), (H,W,1), (H,W,2) gray+alpha, BGR, BGRA -> RGB (H, W, 3)."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"image '{path}' has unsupported shape {img.shape} (expected gray, gray+alpha, RGB or RGBA)")
    channels = img.shape[2]
    if channels <= 2:  # gray (+ alpha, dropped)
        return np.repeat(img[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 RGB in [0, 1].

    Gray images are repeated to three channels, an alpha channel is dropped, 16-bit files are divided
    by 65535 (8-bit by 255), and JPEG EXIF orientation is applied. Non-ASCII paths work (the bytes are
    read by Python and decoded in memory).

    Args:
        path: image file.

    Returns:
        ``(H, W, 3)`` float32 array, RGB, values in [0, 1].

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty, cannot be decoded, or has an unsupported layout/pixel type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file '{path}' does not exist")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"image file '{path}' is empty (0 bytes)")
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_UNCHANGED keeps 16-bit depth and alpha but ignores EXIF orientation; JPEG is always 8-bit
    # without alpha, so decode it with IMREAD_COLOR, which applies the orientation tag.
    flag = cv2.IMREAD_COLOR if data[:3] == _JPEG_MAGIC else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error as exc:  # some codecs raise instead of returning None
        raise ValueError(f"image file '{path}' could not be decoded: {exc}") from exc
    if img is None or img.size == 0:
        raise ValueError(f"image file '{path}' could not be decoded (corrupt or not an image)")
    return _to_unit_float(_to_rgb(img, path), path)


def write_image(path: str | Path, img: np.ndarray) -> None:
    """Write an RGB image, creating parent folders; the format follows the suffix.

    Args:
        path: output file (``.png`` recommended: lossless).
        img: ``(H, W, 3)`` RGB (or ``(H, W)`` gray); uint8, uint16, or float in [0, 1] (clipped, then
            rounded to 8 bits).
    """
    path = Path(path)
    arr = np.asarray(img)
    if arr.dtype not in (np.uint8, np.uint16):
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 3:
        if arr.shape[2] != 3:
            raise ValueError(f"cannot write '{path}': expected (H, W, 3) RGB, got shape {arr.shape}")
        arr = np.ascontiguousarray(arr[:, :, ::-1])  # RGB -> BGR for OpenCV
    ok, encoded = cv2.imencode(path.suffix or ".png", arr)
    if not ok:
        raise ValueError(f"cannot encode image for '{path}' (unsupported suffix '{path.suffix}'?)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())


def check_io_backend(opt: Mapping, owner: str) -> None:
    """Accept BasicSR's ``io_backend: {type: disk}`` (or no key); raise ``NotImplementedError`` for others."""
    backend = (opt.get("io_backend") or {}).get("type", "disk")
    if backend != "disk":
        raise NotImplementedError(f"{owner}: io_backend type '{backend}' is not supported (only 'disk')")
