"""Paired low-light / normal-light dataset (LOL-v1, LOL-v2 real and synthetic, generic folders).

Example options (BasicSR YAML)::

    datasets:
      train:
        name: LOLv1
        type: LOLPairedDataset
        dataroot: datasets/LOL        # our485/, eval15/
        layout: lolv1                 # lolv1 | lolv2_real | lolv2_synthetic | folders | auto (default)
        split: train                  # default: train in the train phase, else test
        holdout: {count: 15, seed: 10, role: train}   # keep 15 training pairs for validation
        gt_size: 256                  # paired random crop (train phase only)
        use_hflip: true
        use_rot: false                # vertical flip + transpose (8 dihedral variants with use_hflip)
        resize_short_side: [~, ~]     # GLARE Stage II: short side random in [gt_size, S], then crop
        batch_size_per_gpu: 2
        num_worker_per_gpu: 0
      val:
        name: LOLv1-holdout
        type: LOLPairedDataset
        dataroot: datasets/LOL
        split: train
        holdout: {count: 15, seed: 10, role: val}

See :mod:`glare_nat_data.layouts` for layouts, pairing and the selection options
(``holdout``, ``subset``, ``max_images``), and :mod:`glare_nat_data.transforms` for the augmentations.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from glare_nat_data.image_io import check_io_backend, read_image
from glare_nat_data.layouts import pair_files, resolve_pair_dirs, select_pairs
from glare_nat_data.transforms import (
    check_crop_fits,
    check_same_size,
    img_to_tensor,
    paired_random_crop,
    random_flips,
    random_resize_pair_8bit_lq,
)

__all__ = ["LOLPairedDataset"]


def _resize_range(opt: Mapping, gt_size: int | None) -> tuple[int, int | None] | None:
    """``(lo, hi)`` of the random short-side resize, or None when off.

    ``resize_short_side: [lo, hi]`` (``~`` = ``gt_size`` / the image's short side) or GLARE's
    ``use_resize_crop: true`` (same as ``[~, ~]``).
    """
    spec = opt.get("resize_short_side")
    if spec is None and opt.get("use_resize_crop"):
        spec = [None, None]
    if spec is None:
        return None
    if gt_size is None:
        raise KeyError("dataset option 'resize_short_side'/'use_resize_crop' needs 'gt_size' (the crop after it)")
    if not isinstance(spec, list | tuple) or len(spec) != 2:
        raise ValueError(f"dataset option 'resize_short_side' is {spec!r}; expected [min, max] (each may be ~)")
    lo = gt_size if spec[0] is None else int(spec[0])
    hi = None if spec[1] is None else int(spec[1])
    if lo < gt_size or (hi is not None and hi < lo):
        raise ValueError(f"dataset option 'resize_short_side' is {spec!r}; need gt_size ({gt_size}) <= min <= max")
    return lo, hi


@DATASET_REGISTRY.register()
class LOLPairedDataset(data.Dataset):
    """Pairs of low-light and ground-truth images.

    Items: ``{'lq': (3, H, W) float32 in [0, 1], 'gt': (3, H, W) float32, 'lq_path': str, 'gt_path': str}``.
    In the train phase (``opt['phase'] == 'train'``) H = W = ``gt_size`` when given; otherwise full images.

    Options: folders (``dataroot`` + ``layout`` + ``split``, or ``dataroot_lq`` + ``dataroot_gt``), selection
    (``holdout``, ``subset``, ``subset_seed``, ``max_images``), train augmentation (``gt_size``,
    ``resize_short_side`` / ``use_resize_crop``, ``use_hflip`` (alias ``use_flip``), ``use_vflip``, ``use_rot``),
    ``io_backend`` (``disk`` only).

    Pairing is checked when the dataset is built (file names only); decoding and size errors are raised when
    an item is loaded, naming the file(s). The random resize works as the official loader: the LQ is resized as
    8-bit (it stays on the k/255 grid), the GT in float, not clipped.
    """

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        check_io_backend(opt, "LOLPairedDataset")
        self.phase = opt.get("phase", "test")
        self.lq_dir, self.gt_dir = resolve_pair_dirs(opt)
        self.pairs = select_pairs(pair_files(self.lq_dir, self.gt_dir), opt)
        if not self.pairs:
            raise ValueError(f"LOLPairedDataset: no pairs left in '{self.lq_dir}' after holdout/subset/max_images")
        self.gt_size = None if opt.get("gt_size") is None else int(opt["gt_size"])
        if self.gt_size is not None and self.gt_size <= 0:
            raise ValueError(f"dataset option 'gt_size' is {self.gt_size}; it must be positive")
        self.resize_range = _resize_range(opt, self.gt_size)
        self.hflip = bool(opt.get("use_hflip", opt.get("use_flip", False)))
        self.vflip = bool(opt.get("use_vflip", False)) or bool(opt.get("use_rot", False))
        self.rot90 = bool(opt.get("use_rot", False))

    def __len__(self) -> int:
        return len(self.pairs)

    def _augment(self, lq: np.ndarray, gt: np.ndarray, lq_path: object) -> tuple[np.ndarray, np.ndarray]:
        if self.resize_range is not None:
            lq, gt = random_resize_pair_8bit_lq(lq, gt, *self.resize_range)
        if self.gt_size is not None:
            check_crop_fits(lq, self.gt_size, lq_path)
            lq, gt = paired_random_crop([lq, gt], self.gt_size)
        lq, gt = random_flips([lq, gt], self.hflip, self.vflip, self.rot90)
        return lq, gt

    def __getitem__(self, index: int) -> dict:
        lq_path, gt_path = self.pairs[index]
        lq, gt = read_image(lq_path), read_image(gt_path)
        check_same_size(lq, gt, lq_path, gt_path)
        if self.phase == "train":
            lq, gt = self._augment(lq, gt, lq_path)
        return {"lq": img_to_tensor(lq), "gt": img_to_tensor(gt), "lq_path": str(lq_path), "gt_path": str(gt_path)}
