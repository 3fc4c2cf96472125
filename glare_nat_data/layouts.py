"""Find the low-light / ground-truth folders of a LOL-style dataset, pair their files, pick subsets.

Layouts (folder names are matched case-insensitively, so ``Low``/``low``, ``Train``/``train`` all work):

- ``lolv1``: ``our485/{low,high}`` (split ``train``) and ``eval15/{low,high}`` (split ``test``).
- ``lolv2_real``: ``Real_captured/{Train,Test}/{Low,Normal}``, names ``low00001.png`` <-> ``normal00001.png``.
  ``dataroot`` may be the LOL-v2 root or the subset folder itself (GLARE's ``LOL-v2-real/test/{low,high}``).
- ``lolv2_synthetic``: ``Synthetic/{Train,Test}/{Low,Normal}``, same names on both sides (root likewise).
- ``folders``: ``dataroot/{low,high}`` (also ``input/target``, ``Low/Normal``, ``lq/gt``).
- ``auto``: the first of the above whose folders exist (a LOL-v2 root holding both subsets gives
  ``Real_captured``: name the layout to get ``Synthetic``).

Pairing key: the file stem, lower-cased, without a leading ``low``/``normal``/``high`` word (and an
optional ``_``/``-`` after it). So ``low00001.png`` and ``normal00001.png`` pair, and so do ``1.png`` and
``1.png``; the suffix may differ (``1.png`` with ``1.jpg``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from glare_nat_data.image_io import list_images, natural_key

__all__ = ["LAYOUTS", "holdout_split", "pair_files", "pair_key", "resolve_pair_dirs", "select_pairs"]

LAYOUTS = ("lolv1", "lolv2_real", "lolv2_synthetic", "folders", "auto")

_LQ_NAMES = ("low", "input", "lq")
_GT_NAMES = ("high", "normal", "target", "gt")
_SPLIT_DIRS = {
    "lolv1": {"train": ("our485",), "test": ("eval15",)},
    "lolv2": {"train": ("train",), "test": ("test",)},
}
_PREFIX = re.compile(r"^(low|normal|high)[_\-]?(?=.)")

Pair = tuple[Path, Path]


def pair_key(path: Path) -> str:
    """Pairing key of a file: lower-case stem without a leading ``low``/``normal``/``high`` word."""
    return _PREFIX.sub("", path.stem.lower())


def _child(parent: Path, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``parent`` whose name equals one of ``names`` (case-insensitive)."""
    if not parent.is_dir():
        return None
    subdirs = {p.name.lower(): p for p in sorted(parent.iterdir()) if p.is_dir()}
    for name in names:
        if name in subdirs:
            return subdirs[name]
    return None


def _lq_gt_dirs(folder: Path | None) -> tuple[Path, Path] | None:
    if folder is None:
        return None
    lq, gt = _child(folder, _LQ_NAMES), _child(folder, _GT_NAMES)
    return (lq, gt) if lq is not None and gt is not None else None


def _try_layout(root: Path, layout: str, split: str) -> tuple[Path, Path] | None:
    """Folders for ``layout`` under ``root`` or None when they are not there."""
    if layout == "folders":
        return _lq_gt_dirs(root)
    if layout == "lolv1":
        return _lq_gt_dirs(_child(root, _SPLIT_DIRS["lolv1"][split]))
    # ``dataroot`` is the LOL-v2 root, or the subset folder itself (GLARE: ``LOL-v2-real/test/{low,high}``)
    base = _child(root, ("real_captured" if layout == "lolv2_real" else "synthetic",)) or root
    return _lq_gt_dirs(_child(base, _SPLIT_DIRS["lolv2"][split]))


def resolve_pair_dirs(opt: Mapping) -> tuple[Path, Path]:
    """Low-light and ground-truth folders from dataset options.

    Either ``dataroot_lq`` + ``dataroot_gt`` (explicit), or ``dataroot`` + ``layout`` (default ``auto``)
    + ``split`` (``train``/``test``; default ``train`` when ``phase == 'train'``, else ``test``).

    Raises:
        KeyError: neither form of options is given.
        ValueError: unknown ``layout`` or ``split``.
        FileNotFoundError: the folders of the layout are not under ``dataroot`` (message lists what is there).
    """
    if opt.get("dataroot_lq") is not None or opt.get("dataroot_gt") is not None:
        if opt.get("dataroot_lq") is None or opt.get("dataroot_gt") is None:
            raise KeyError("dataset options: give both 'dataroot_lq' and 'dataroot_gt' (or 'dataroot' with 'layout')")
        return Path(opt["dataroot_lq"]), Path(opt["dataroot_gt"])
    if opt.get("dataroot") is None:
        raise KeyError("dataset options: need 'dataroot' (with 'layout') or 'dataroot_lq' + 'dataroot_gt'")
    root = Path(opt["dataroot"])
    layout = opt.get("layout", "auto")
    if layout not in LAYOUTS:
        raise ValueError(f"dataset option 'layout' is '{layout}'; expected one of {', '.join(LAYOUTS)}")
    split = opt.get("split") or ("train" if opt.get("phase") == "train" else "test")
    if split not in ("train", "test"):
        raise ValueError(f"dataset option 'split' is '{split}'; expected 'train' or 'test'")
    if not root.is_dir():
        raise FileNotFoundError(f"dataroot '{root}' does not exist (or is not a directory)")
    candidates = ("lolv1", "lolv2_real", "lolv2_synthetic", "folders") if layout == "auto" else (layout,)
    for cand in candidates:
        found = _try_layout(root, cand, split)
        if found is not None:
            return found
    there = sorted(p.name for p in root.iterdir())[:20]
    raise FileNotFoundError(
        f"dataroot '{root}': no '{split}' low/ground-truth folders for layout '{layout}' "
        f"(see glare_nat_data/layouts.py for the expected trees); it contains: {there}"
    )


def _index(files: list[Path], role: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        key = pair_key(f)
        if key in out:
            raise ValueError(f"{role} files '{out[key]}' and '{f}' have the same pairing key '{key}'")
        out[key] = f
    return out


def pair_files(lq_dir: str | Path, gt_dir: str | Path) -> list[Pair]:
    """Pair the images of two folders by :func:`pair_key`; every file must have a partner.

    Returns:
        ``[(lq_path, gt_path), ...]`` in natural order of the pairing key.

    Raises:
        FileNotFoundError / ValueError: a folder is missing or has no image (named); a file has no partner
        (the file is named); two files of one folder share a key.
    """
    lq_dir, gt_dir = Path(lq_dir), Path(gt_dir)
    lqs = _index(list_images(lq_dir), "low-light")
    gts = _index(list_images(gt_dir), "ground-truth")
    for key, f in lqs.items():
        if key not in gts:
            raise FileNotFoundError(f"low-light image '{f}' has no ground-truth partner in '{gt_dir}'")
    for key, f in gts.items():
        if key not in lqs:
            raise FileNotFoundError(f"ground-truth image '{f}' has no low-light partner in '{lq_dir}'")
    return [(lqs[k], gts[k]) for k in sorted(lqs, key=natural_key)]


def holdout_split(pairs: list[Pair], count: int, seed: int = 0, role: str = "train") -> list[Pair]:
    """Deterministically hold ``count`` pairs out of ``pairs`` (e.g. a validation split of training data).

    ``role='val'`` returns the ``count`` held-out pairs, ``role='train'`` the others; both keep the input
    order, and the same ``(pairs, count, seed)`` always gives the same split.
    """
    if role not in ("train", "val"):
        raise ValueError(f"dataset option 'holdout.role' is '{role}'; expected 'train' or 'val'")
    if not 0 < count < len(pairs):
        raise ValueError(f"dataset option 'holdout.count' is {count}; it must be in [1, {len(pairs) - 1}]")
    held = set(random.Random(seed).sample(range(len(pairs)), count))
    return [p for i, p in enumerate(pairs) if (i in held) == (role == "val")]


def select_pairs(pairs: list[Pair], opt: Mapping) -> list[Pair]:
    """Apply ``holdout``, then ``subset``, then ``max_images`` from the dataset options.

    - ``holdout: {count: N, seed: S, role: train|val}`` (see :func:`holdout_split`; ``role`` defaults to
      ``train`` in the train phase, else ``val``).
    - ``subset``: a list of names (file names or stems of either image, or pairing keys), or a fraction in
      (0, 1] drawn with ``subset_seed`` (default 0).
    - ``max_images``: keep the first N.
    """
    hold = opt.get("holdout")
    if hold:
        if "count" not in hold:
            raise KeyError("dataset option 'holdout' needs 'count' (and optionally 'seed', 'role')")
        role = hold.get("role") or ("train" if opt.get("phase") == "train" else "val")
        pairs = holdout_split(pairs, int(hold["count"]), int(hold.get("seed", 0)), role)
    subset = opt.get("subset")
    if subset is not None:
        if isinstance(subset, int | float) and not isinstance(subset, bool):
            if not 0 < subset <= 1:
                raise ValueError(f"dataset option 'subset' is {subset}; a fraction must be in (0, 1]")
            n = max(1, round(len(pairs) * subset))
            keep = set(random.Random(int(opt.get("subset_seed", 0))).sample(range(len(pairs)), n))
            pairs = [p for i, p in enumerate(pairs) if i in keep]
        else:
            pairs = _by_names(pairs, [str(s) for s in subset])
    if opt.get("max_images") is not None:
        pairs = pairs[: int(opt["max_images"])]
    return pairs


def _by_names(pairs: list[Pair], names: list[str]) -> list[Pair]:
    lookup: dict[str, Pair] = {}
    for pair in pairs:
        for f in pair:
            lookup.update({f.name: pair, f.stem: pair, pair_key(f): pair})
    missing = [n for n in names if n not in lookup]
    if missing:
        raise ValueError(f"dataset option 'subset' names {missing}, which are not among the {len(pairs)} pairs")
    wanted = {lookup[n] for n in names}
    return [p for p in pairs if p in wanted]
