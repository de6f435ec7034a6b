"""Streaming a folder of images through a ``Decomposer`` into a store on disk.

``decompose_dataset`` writes fixed shards (see ``store``), skips shards already on disk
(resume after a kill), and under ``torchrun`` gives shard ``k`` to rank ``k % world``.
Memory is bounded by one shard: the shard size is chosen from the component count so
that a shard stays under ``shard_megabytes``.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .decomposer import Decomposer
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    DecompositionStore,
    atomic_write_text,
    check_compatible,
    label_records,
    read_manifest,
    shard_path,
    write_shard,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class ImageFiles(Dataset):
    """Image files under ``root`` (recursively, sorted); an ImageFolder layout works as is.

    Items are ``(tensor or None, relative path, error or None)``: unreadable files are
    reported, not raised.
    """

    def __init__(self, root: str | Path, transform: Callable):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not self.files:
            raise ValueError(f"no files under {self.root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def identifier(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def __getitem__(self, index: int):
        tensor, error = read_image(self.files[index], self.transform)
        return tensor, self.identifier(index), error


def read_image(path: Path, transform: Callable):
    """(``transform`` of the RGB image at ``path``, None), or (None, the error) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return transform(image.convert("RGB")), None
    except Exception as error:  # noqa: BLE001  (not an image, truncated, unreadable)
        return None, f"{type(error).__name__}: {error}"


def _collate(items):
    good = [(t, i) for t, i, e in items if e is None]
    skipped = [{"id": i, "error": e} for _, i, e in items if e is not None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], skipped


def evaluation_transform(pretrained_cfg: dict | None) -> tuple[Callable, dict]:
    """timm's eval preprocessing for a model's ``pretrained_cfg`` and the data config it gives."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, pretrained_cfg=pretrained_cfg or {}, use_test_size=True)
    return create_transform(**config, is_training=False), {k: (list(v) if isinstance(v, tuple) else v)
                                                          for k, v in config.items()}


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def decompose_dataset(decomposer: Decomposer, images: str | Path, out: str | Path, level: str = "head", *,
                      transform: Callable | None = None, preprocessing: dict | None = None,
                      model_name: str = "", checkpoint: str | None = None, batch_size: int = 16,
                      store_dtype: torch.dtype = torch.float32, shard_megabytes: float = 256,
                      num_workers: int = 0, progress: bool = True,
                      on_batch: Callable[[int], Any] | None = None) -> DecompositionStore | None:
    """Decompose every image under ``images`` into the store ``out``; returns the store (rank 0).

    transform:  PIL image -> tensor [C, H, W] (default: timm's eval transform of the model)
    on_batch:   called with the number of batches done in this run (progress hooks, tests)
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if transform is None:
        transform, preprocessing = evaluation_transform(decomposer.pretrained_cfg)
    dataset = ImageFiles(images, transform)
    ids = [dataset.identifier(i) for i in range(len(dataset))]
    labels, shape = _labels_and_shape(decomposer, dataset, level)
    per_image = len(labels) * math.prod(shape) * torch.finfo(store_dtype).bits // 8
    shard_size = max(1, min(1024, int(shard_megabytes * 2**20 // max(per_image, 1))))
    manifest = {"format_version": FORMAT_VERSION, "model": model_name, "checkpoint": checkpoint,
                "output": decomposer.output, "level": level, "dtype": str(store_dtype).removeprefix("torch."),
                "shard_size": shard_size, "image_count": len(ids),
                "images_digest": hashlib.sha1("\n".join(ids).encode()).hexdigest(),
                "representation_shape": list(shape), "preprocessing": preprocessing or {},
                "labels": label_records(labels)}
    existing = read_manifest(root)
    if existing is not None:
        check_compatible(existing, manifest)
    rank, world = _distributed()
    if rank == 0 and existing is None:
        atomic_write_text(root / MANIFEST, json.dumps(dict(manifest, shards=[], complete=False), indent=1))
    _barrier()
    shard_count = math.ceil(len(ids) / shard_size)
    todo = [k for k in range(shard_count) if k % world == rank and not shard_path(root, k).is_file()]
    batches_done = 0
    bar = tqdm(total=sum(min(shard_size, len(ids) - k * shard_size) for k in todo), unit="img",
               desc=f"decompose[{rank}]" if world > 1 else "decompose", disable=not progress)
    for k in todo:
        positions = list(range(k * shard_size, min((k + 1) * shard_size, len(ids))))
        subset = torch.utils.data.Subset(dataset, positions)
        loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
        components, representation, kept, skipped = [], [], [], []
        for batch, batch_ids, batch_skipped in loader:
            skipped += batch_skipped
            if batch is not None:
                dec = decomposer(batch.to(**_model_tensors(decomposer)), level=level)
                components.append(dec.components.to("cpu", store_dtype))
                representation.append(dec.representation.to("cpu", store_dtype))
                kept += batch_ids
            bar.update(len(batch_ids) + len(batch_skipped))
            batches_done += 1
            if on_batch is not None:
                on_batch(batches_done)
        _write(root, k, components, representation, kept, positions, ids, skipped, labels, shape, store_dtype)
        if world == 1:
            _write_manifest(root, manifest, complete=False)
    bar.close()
    _barrier()
    if rank == 0:
        _write_manifest(root, manifest, complete=True)
        return DecompositionStore(root)
    return None


def _model_tensors(decomposer: Decomposer) -> dict:
    """dtype and device of the model's parameters (images go there)."""
    parameter = next(decomposer.graph_module.parameters(), None)
    return {"dtype": parameter.dtype, "device": parameter.device} if parameter is not None else {"dtype": torch.float32}


def _labels_and_shape(decomposer: Decomposer, dataset: ImageFiles, level: str):
    """Labels (and representation shape) from the first readable image."""
    for index in range(len(dataset)):
        tensor, _, error = dataset[index]
        if error is None:
            dec = decomposer(tensor.unsqueeze(0).to(**_model_tensors(decomposer)), level=level)
            return dec.labels, tuple(dec.representation.shape[1:])
    raise ValueError(f"none of the {len(dataset)} files under {dataset.root} is a readable image")


def _write(root, index, components, representation, kept, positions, ids, skipped, labels, shape, dtype):
    if components:
        stacked, reps = torch.cat(components, dim=1), torch.cat(representation)
    else:
        stacked = torch.zeros((len(labels), 0) + tuple(shape), dtype=dtype)
        reps = torch.zeros((0,) + tuple(shape), dtype=dtype)
    position_of = {ids[p]: p for p in positions}
    kept_positions = [position_of[i] for i in kept]
    write_shard(root, index, stacked, reps, kept, kept_positions)
    if skipped:  # reported next to the shard, folded into the manifest
        atomic_write_text(shard_path(root, index).with_suffix(".skipped.json"), json.dumps(skipped))


def _write_manifest(root: Path, manifest: dict, complete: bool) -> None:
    shards, skipped = [], []
    for path in sorted((root / "shards").glob("shard-*.safetensors")):
        index = int(path.stem.split("-")[1])
        with safe_open(str(path), framework="pt") as handle:
            count = len(json.loads(handle.metadata()["image_ids"]))
        shards.append({"index": index, "file": path.relative_to(root).as_posix(), "count": count})
        report = path.with_suffix(".skipped.json")
        if report.is_file():
            skipped += json.loads(report.read_text())
    atomic_write_text(root / MANIFEST, json.dumps(
        dict(manifest, shards=shards, skipped=skipped, skipped_count=len(skipped), complete=complete), indent=1))
