"""Test sets of ``glare-nat-benchmark``: paired LOL-style trees and unpaired folders of photos.

* Paired: :func:`load_test_set` (the ``split: test`` pairs of a ``lolv1`` / ``lolv2_*`` / ``folders`` tree, see
  :mod:`glare_nat_data.layouts`).
* Unpaired: :func:`scan_unpaired` (every image file directly inside a folder; each is decoded once, so unreadable
  files are named and skipped before anything runs, and a folder without a readable image is an error).
* :func:`parse_named_path`: ``DIR`` or ``NAME=DIR`` of the ``--unpaired`` / ``--folders`` flags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from glare_nat_data.image_io import IMAGE_EXTENSIONS, is_image_file, natural_key, read_image

__all__ = ["load_test_set", "UnpairedSet", "scan_unpaired", "parse_named_path", "safe_name"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def load_test_set(name: str, root: str | Path, layout: str, max_images: int | None = None):
    """The ``split: test`` pairs of a LOL-style tree as a :class:`glare_nat_data.lol_dataset.LOLPairedDataset`.

    Raises FileNotFoundError / ValueError naming the folder when the layout is not found or holds no pairs.
    """
    from glare_nat_data.lol_dataset import LOLPairedDataset

    opt = {"name": name, "type": "LOLPairedDataset", "dataroot": str(root), "layout": layout, "split": "test"}
    opt.update(phase="test", max_images=max_images)
    return LOLPairedDataset(opt)


def safe_name(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``. _ + = -`` replaced by ``_``
    (for file and folder names)."""
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_") or "set"


def parse_named_path(text: str, flag: str) -> tuple[str, Path]:
    """``'DIR'`` -> ``(folder name, DIR)``; ``'NAME=DIR'`` -> ``(NAME, DIR)``.

    ``NAME=DIR`` applies when the text before the first ``=`` is a valid name (letters, digits, ``. _ + -``) and
    the whole text is not an existing path. Raises ValueError naming ``flag`` for an empty path.
    """
    name, sep, rest = text.partition("=")
    if not (sep and _NAME.match(name) and not Path(text).exists()):
        name, rest = "", text
    if not rest.strip():
        raise ValueError(f"{flag} '{text}': empty folder path (expected DIR or NAME=DIR)")
    path = Path(rest)
    return name or path.resolve().name or rest, path


@dataclass
class UnpairedSet:
    """A folder of photos without ground truth: the readable ``files`` and the ``skipped`` ``(file, error)``."""

    name: str
    root: Path
    files: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def load(path: Path) -> torch.Tensor:
        """One image as a ``(1, 3, H, W)`` float RGB tensor in [0, 1] (gray repeated, alpha dropped)."""
        rgb = read_image(path)
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None]


def scan_unpaired(name: str, folder: str | Path, max_images: int | None = None) -> UnpairedSet:
    """The readable image files of ``folder`` (non-recursive, natural order; other files are ignored).

    Every image file is decoded once (:func:`glare_nat_data.image_io.read_image`); files that fail (zero bytes,
    corrupt, unsupported layout) are listed in ``skipped`` with the reason. ``max_images`` keeps the first N
    readable files.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: no image file, or no readable one (naming the folder and the unreadable files).
    """
    folder = Path(folder)
    where = f"--unpaired {name}: folder '{folder}'"
    if not folder.is_dir():
        raise FileNotFoundError(f"{where} does not exist (or is not a directory)")
    candidates = sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name))
    if not candidates:
        raise ValueError(f"{where} contains no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for p in candidates:
        if max_images is not None and len(files) >= max_images:
            break
        try:
            read_image(p)
        except (OSError, ValueError) as exc:
            skipped.append((p.name, str(exc)))
            continue
        files.append(p)
    if not files:
        listed = "; ".join(f"{f}: {e}" for f, e in skipped)
        raise ValueError(f"{where} has no readable image ({len(skipped)} unreadable: {listed})")
    return UnpairedSet(name=name, root=folder, files=files, skipped=skipped)
