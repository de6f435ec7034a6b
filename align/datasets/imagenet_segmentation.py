"""ImageNet-Segmentation (Guillaumin et al.; 4,276 ImageNet validation images with object masks) as distributed in
``gtsegs_ijcv.mat``: a MATLAB v7.3 file, i.e. HDF5, read with h5py.

Layout (as read by the reference code, hila-chefer/Transformer-Explainability ``data/imagenet.py``, which the
CLIP decomposition and CompAlign papers reuse):

* ``/value/img``: [N, 1] HDF5 object references; reference ``i`` points to a uint8 dataset [3, W, H] (MATLAB's
  column-major H×W×3 image seen from C order), so ``transpose(2, 1, 0)`` gives [H, W, 3];
* ``/value/gt``: [N, 1] object references to [1, 1] datasets of references (a MATLAB cell inside a cell), whose
  single reference points to the mask [W, H] (``transpose(1, 0)`` gives [H, W]; nonzero = object).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGES, MASKS = "value/img", "value/gt"


class ImageNetSegmentation:
    """``len(data)`` images; ``data[i]`` -> (image uint8 [H, W, 3], mask bool [H, W]). Opened once, read lazily.

    Refuses (``ValueError``) a file that is not HDF5 or does not have the layout above, naming what it found.
    """

    def __init__(self, path: str | Path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; pass ImageNet-Segmentation's gtsegs_ijcv.mat")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as error:
            raise ValueError(f"{self.path} is not an HDF5 (MATLAB v7.3) file, as gtsegs_ijcv.mat is ({error})") from None
        self._check_layout(h5py)

    def _check_layout(self, h5py) -> None:
        expected = f"datasets /{IMAGES} and /{MASKS} of [N, 1] object references (gtsegs_ijcv.mat's layout)"
        found = []
        self.file.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
        for name in (IMAGES, MASKS):
            item = self.file.get(name)
            if not isinstance(item, h5py.Dataset) or item.dtype != h5py.ref_dtype or item.ndim != 2:
                raise ValueError(f"{self.path} is not ImageNet-Segmentation: expected {expected}; found datasets "
                                 f"{found[:8]}{' ...' if len(found) > 8 else ''}")
        if self.file[IMAGES].shape != self.file[MASKS].shape:
            raise ValueError(f"{self.path}: {self.file[IMAGES].shape[0]} image references but "
                             f"{self.file[MASKS].shape[0]} mask references")
        if len(self):
            self[0]   # checks the referenced shapes on the first pair

    def __len__(self) -> int:
        return int(self.file[IMAGES].shape[0])

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image = np.asarray(self.file[self.file[IMAGES][index, 0]])
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{self.path}: image {index} has shape {image.shape}; expected [3, W, H] (MATLAB v7.3 "
                             "of an H×W×3 image)")
        cell = self.file[self.file[MASKS][index, 0]]
        mask = np.asarray(self.file[cell[0, 0]]) if cell.dtype == self.file[MASKS].dtype else np.asarray(cell)
        image, mask = image.transpose(2, 1, 0), mask.transpose(1, 0)
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{self.path}: mask {index} is {mask.shape}, its image {image.shape[:2]}")
        return np.ascontiguousarray(image.astype(np.uint8)), np.ascontiguousarray(mask != 0)

    def close(self) -> None:
        self.file.close()
