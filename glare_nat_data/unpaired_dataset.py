"""Low-light photos without ground truth (LIME, NPE, MEF, DICM, VV, or your own), for inference.

Example options::

    datasets:
      test_1:
        name: DICM
        type: LOLUnpairedDataset
        dataroot_lq: datasets/DICM    # a folder (non-images skipped, natural order) or a single file
"""

from __future__ import annotations

from pathlib import Path

from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils import data

from glare_nat_data.image_io import check_io_backend, is_image_file, list_images, read_image
from glare_nat_data.transforms import img_to_tensor

__all__ = ["LOLUnpairedDataset"]


@DATASET_REGISTRY.register()
class LOLUnpairedDataset(data.Dataset):
    """Full-size images from a folder or one file.

    Options: ``dataroot_lq`` (or ``dataroot``): folder or image file; ``max_images``: keep the first N;
    ``io_backend`` (``disk`` only).

    Items: ``{'lq': (3, H, W) float32 RGB in [0, 1], 'lq_path': str}``.
    """

    def __init__(self, opt: dict) -> None:
        super().__init__()
        self.opt = opt
        check_io_backend(opt, "LOLUnpairedDataset")
        root = opt.get("dataroot_lq", opt.get("dataroot"))
        if root is None:
            raise KeyError("LOLUnpairedDataset options need 'dataroot_lq' (a folder or an image file)")
        root = Path(root)
        if root.is_file():
            if not is_image_file(root):
                raise ValueError(f"'{root}' is not an image file (unknown suffix '{root.suffix}')")
            self.paths = [root]
        else:
            self.paths = list_images(root)
        if opt.get("max_images") is not None:
            self.paths = self.paths[: int(opt["max_images"])]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"lq": img_to_tensor(read_image(path)), "lq_path": str(path)}
