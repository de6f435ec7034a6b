"""Images for the commands that decompose them here (``heatmap``, ``segment``, ``attribute``): the files under an
``--images`` folder or single files, read through the model's preprocessing ``batch_size`` at a time, so memory is
bounded by one batch whatever the folder holds."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from decompose.dataset import ImageFiles, read_image


class ImageBatches:
    """Image id -> file: under ``folder`` (recursively, sorted; ids relative to it, so an ImageFolder id is
    ``CLASS/IMAGE``), or the single ``files`` (ids: their paths as given). ``transform`` (PIL -> [3, H, W]) is set
    once the model's preprocessing is known."""

    def __init__(self, folder: str | Path | None = None, files: Sequence[str] = ()):
        if folder is not None:
            listing = _folder_files(Path(folder))
            self.paths = {listing.identifier(i): path for i, path in enumerate(listing.files)}
            self.where = f"under {listing.root}"
        else:
            absent = [name for name in files if not Path(name).is_file()]
            if absent:
                raise FileNotFoundError(f"image file {absent[0]} does not exist")
            if not files:
                raise ValueError("no images given: pass --images DIR or image files")
            self.paths = {name: Path(name) for name in files}
            self.where = "among the given files"
        self.root = Path(folder) if folder is not None else Path()
        self.transform: Callable | None = None

    def ids(self) -> list[str]:
        return list(self.paths)

    def batches(self, ids: list[str], batch_size: int) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(ids, images [b, 3, H, W]) of the readable images among ``ids``, in order; an unreadable file is skipped
        with a note on stderr, and none readable is refused."""
        missing = [image_id for image_id in ids if image_id not in self.paths]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images are not {self.where} (first: {missing[:3]})")
        errors = []
        for start in range(0, len(ids), batch_size):
            tensors, batch_ids = [], []
            for image_id in ids[start:start + batch_size]:
                tensor, error = read_image(self.paths[image_id], self.transform)
                if error is not None:
                    print(f"skipped {image_id}: {error}", file=sys.stderr)
                    errors.append(f"{image_id}: {error}")
                    continue
                tensors.append(tensor)
                batch_ids.append(image_id)
            if tensors:
                yield batch_ids, torch.stack(tensors)
        if ids and len(errors) == len(ids):
            raise ValueError(f"no images {self.where}: none of the {len(ids)} files is a readable image "
                             f"(first: {errors[0]})")


def _folder_files(folder: Path) -> ImageFiles:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    try:
        return ImageFiles(folder, transform=None)
    except ValueError:
        raise ValueError(f"no images under {folder}: the folder is empty") from None
