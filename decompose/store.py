"""A decomposition store on disk: shards of components plus a manifest.

Layout of ``DIR``::

    manifest.json                  model, level, labels, preprocessing, shard index, skipped files
    shards/shard-000012.safetensors  components [C, n, *D], representation [n, *D], image ids

Shard ``k`` always holds images ``k*S .. (k+1)*S-1`` of the sorted image list (``S`` the
shard size), whoever wrote it: a resumed run, or rank ``k % world`` of a ``torchrun`` job,
writes exactly the same files. Every file is written to a temporary name and renamed
(atomic on POSIX), so a killed run leaves complete shards only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .labels import ComponentLabel

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class StoreMismatch(ValueError):
    """The store on disk was written for another model, level or image list."""


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def shard_path(root: Path, index: int) -> Path:
    return root / "shards" / f"shard-{index:06d}.safetensors"


def write_shard(root: Path, index: int, components: torch.Tensor, representation: torch.Tensor,
                image_ids: list[str], positions: list[int]) -> None:
    """Atomically write one shard (``positions``: indices of its images in the full image list)."""
    path = shard_path(root, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"components": components.contiguous(), "representation": representation.contiguous(),
               "positions": torch.tensor(positions, dtype=torch.long)},
              str(temporary), metadata={"image_ids": json.dumps(image_ids)})
    os.replace(temporary, path)


def label_records(labels: list[ComponentLabel]) -> list[dict]:
    """JSON-able labels (a token's grid position becomes a [row, col] list)."""
    return [dict(key=l.key, name=l.name, kind=l.kind, layer=l.layer, head=l.head, token=l.token, node=l.node,
                 position=list(l.position) if isinstance(l.position, tuple) else l.position, note=l.note)
            for l in labels]


def label_from_record(record: dict) -> ComponentLabel:
    position = record.get("position")
    return ComponentLabel(record["name"], record["kind"], record["layer"], record["head"], record["token"],
                          record["node"], tuple(position) if isinstance(position, list) else position,
                          record.get("note"))


def check_compatible(existing: dict, wanted: dict) -> None:
    """Refuse to mix shards of different models / levels / image lists in one store."""
    for field in ("model", "checkpoint", "output", "level", "dtype", "shard_size", "image_count", "images_digest"):
        if existing.get(field) != wanted.get(field):
            raise StoreMismatch(
                f"the store was written with {field}={existing.get(field)!r}, this run has "
                f"{field}={wanted.get(field)!r}; use another --out folder (or delete it) rather than "
                "mixing decompositions")
    if existing.get("labels") and wanted.get("labels") and existing["labels"] != wanted["labels"]:
        raise StoreMismatch("the store's component labels differ from this model's; use another --out folder")


@dataclass
class ShardInfo:
    index: int
    path: Path
    count: int


class DecompositionStore:
    """Reads a store lazily: one shard file is opened when its images are asked for.

    ``store.labels``; ``store.components(i)`` -> [C, *D] for image ``i`` (position in the
    stored order); ``store.iter_shards()`` -> (components [C, n, *D], representation, ids).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: not a decomposition store (or still running)")
        self.manifest = json.loads(manifest_path.read_text())
        self.labels = [label_from_record(r) for r in self.manifest["labels"]]
        self.shards = [ShardInfo(s["index"], self.root / s["file"], s["count"])
                       for s in sorted(self.manifest["shards"], key=lambda s: s["index"])]
        self._offsets = []
        total = 0
        for shard in self.shards:
            self._offsets.append(total)
            total += shard.count
        self._length = total

    def __len__(self) -> int:
        return self._length

    @property
    def level(self) -> str:
        return self.manifest["level"]

    def _locate(self, item: int) -> tuple[ShardInfo, int]:
        if not 0 <= item < self._length:
            raise IndexError(item)
        for shard, offset in zip(reversed(self.shards), reversed(self._offsets)):
            if item >= offset:
                return shard, item - offset
        raise IndexError(item)

    def components(self, item: int) -> torch.Tensor:
        shard, row = self._locate(item)
        with safe_open(str(shard.path), framework="pt") as handle:
            return handle.get_slice("components")[:, row]

    def representation(self, item: int) -> torch.Tensor:
        shard, row = self._locate(item)
        with safe_open(str(shard.path), framework="pt") as handle:
            return handle.get_slice("representation")[row]

    def image_ids(self) -> list[str]:
        ids: list[str] = []
        for shard in self.shards:
            with safe_open(str(shard.path), framework="pt") as handle:
                ids += json.loads(handle.metadata()["image_ids"])
        return ids

    def iter_shards(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for shard in self.shards:
            with safe_open(str(shard.path), framework="pt") as handle:
                yield (handle.get_tensor("components"), handle.get_tensor("representation"),
                       json.loads(handle.metadata()["image_ids"]))

    def positions_of(self, ids) -> list[int]:
        """Positions in the store of image ids (refuses ids the store does not hold)."""
        where = {image_id: i for i, image_id in enumerate(self.image_ids())}
        missing = [i for i in ids if i not in where]
        if missing:
            raise ValueError(f"{len(missing)} ids are not in the store (first: {missing[0]!r}); ids are image paths "
                             f"relative to the decomposed folder, e.g. {next(iter(where), '?')!r}")
        return [where[i] for i in ids]

    @torch.no_grad()
    def load_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(components [C, n, D], representation [n, D]) in float32 of the images at positions ``rows``, in that
        order (``*D`` flattened)."""
        wanted = {row: k for k, row in enumerate(rows)}
        components = representation = None
        offset = 0
        for shard_components, shard_representation, ids in self.iter_shards():
            local = [(k, r - offset) for r, k in wanted.items() if offset <= r < offset + len(ids)]
            offset += len(ids)
            if not local:
                continue
            if components is None:
                components = shard_components.new_zeros((shard_components.shape[0], len(rows))
                                                        + tuple(shard_components.shape[2:])).float()
                representation = shard_representation.new_zeros((len(rows),) + tuple(shard_representation.shape[1:]))
                representation = representation.float()
            targets = torch.tensor([k for k, _ in local])
            sources = torch.tensor([r for _, r in local])
            components[:, targets] = shard_components[:, sources].float()
            representation[targets] = shard_representation[sources].float()
        if components is None:
            raise ValueError("no images selected")
        return components.flatten(2), representation.flatten(1)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model saw."""
        size = self.manifest.get("preprocessing", {}).get("input_size")
        if not size:
            raise ValueError("the store records no input size; it was not written by decompose_dataset")
        return int(size[-2]), int(size[-1])

    def transform(self, normalise: bool = True, nearest: bool = False):
        """The store's preprocessing rebuilt (``preprocessing_transform``): PIL -> [3, H, W]."""
        preprocessing = self.manifest.get("preprocessing", {})
        if not normalise and not preprocessing.get("input_size"):
            raise ValueError("the store records no preprocessing (input_size); it was not written by decompose_dataset")
        return preprocessing_transform(preprocessing, normalise, nearest)


def preprocessing_transform(preprocessing: dict, normalise: bool = True, nearest: bool = False):
    """timm's eval transform of a recorded ``preprocessing`` (``dataset.evaluation_transform``'s config): PIL ->
    [3, H, W]. ``normalise=False`` keeps the resize / crop only (values in [0, 1]); ``nearest`` resizes without
    mixing pixels (masks)."""
    from timm.data import create_transform

    fields = ("input_size", "interpolation", "crop_pct", "crop_mode") + (("mean", "std") if normalise else ())
    settings = {k: preprocessing[k] for k in fields if k in preprocessing}
    if nearest:
        settings["interpolation"] = "nearest"
    if not normalise:
        settings.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return create_transform(**settings, is_training=False)


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
