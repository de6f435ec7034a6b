"""Where CompAlign's training pairs come from: (components [C, b, d_model], CLIP targets [b, d_clip]).

Three sources share one interface (``labels``, ``d_model``, ``d_clip``, ``model``, ``level``,
``batches(split, epoch)``, ``summary()``):

* ``TensorAlignmentData``: components and targets already in memory;
* ``StoreAlignmentData``: a ``DecompositionStore`` on disk (one shard in memory at a time,
  kept in its storage dtype; batches are cast to float32 by the aligner);
* ``StreamingAlignmentData``: a DataLoader of images run through a decomposer and a CLIP
  image encoder on the fly.

``split`` is ``"train"``, ``"heldout"`` or ``"all"``. The held-out images are a fixed random
subset (``heldout_fraction``, ``seed``) for the in-memory and store sources.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from safetensors import safe_open

from decompose import ComponentLabel, DecompositionStore

SPLITS = ("train", "heldout", "all")


class AlignmentData(Protocol):
    labels: list[ComponentLabel]
    d_model: int
    d_clip: int
    model: str
    level: str

    def batches(self, split: str, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(components [C, b, d_model], targets [b, d_clip]); ``epoch`` given: shuffled for that epoch."""

    def summary(self) -> dict[str, Any]: ...


def heldout_mask(count: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """Bool [count]: a fixed random ``fraction`` of positions (at least one when count > 1)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    chosen = round(count * fraction)
    if fraction > 0 and count > 1:
        chosen = min(max(chosen, 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(count, dtype=torch.bool)
    mask[order[:chosen]] = True
    return mask


def _split_rows(mask: torch.Tensor, split: str) -> torch.Tensor:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "all":
        return torch.arange(len(mask))
    return torch.nonzero(mask if split == "heldout" else ~mask).flatten()


def _shuffled(rows: torch.Tensor, seed: int, epoch: int | None) -> torch.Tensor:
    if epoch is None:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))]


def _check_targets(targets: torch.Tensor, count: int) -> None:
    if targets.dim() != 2 or targets.shape[0] != count:
        raise ValueError(f"targets must be [N={count}, d_clip], got {tuple(targets.shape)}")


class TensorAlignmentData:
    """In memory. components: [C, N, *D]; targets: [N, d_clip] (CLIP image embeddings)."""

    def __init__(self, components: torch.Tensor, targets: torch.Tensor, labels: Sequence[ComponentLabel],
                 batch_size: int = 128, heldout_fraction: float = 0.1, seed: int = 0, model: str = "",
                 level: str = ""):
        self.components = components.flatten(2)  # [C, N, d_model]
        _check_targets(targets, self.components.shape[1])
        if len(labels) != self.components.shape[0]:
            raise ValueError(f"{len(labels)} labels for {self.components.shape[0]} components")
        self.targets, self.labels = targets, list(labels)
        self.batch_size, self.seed, self.model, self.level = batch_size, seed, model, level
        self.heldout = heldout_mask(self.components.shape[1], heldout_fraction, seed)  # [N]
        self.d_model, self.d_clip = self.components.shape[2], targets.shape[1]

    def batches(self, split: str, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = _shuffled(_split_rows(self.heldout, split), self.seed, epoch)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            yield self.components[:, batch], self.targets[batch]

    def summary(self) -> dict[str, Any]:
        return {"source": "tensors", "images": int(self.components.shape[1]),
                "heldout_images": int(self.heldout.sum()), "seed": self.seed}


class StoreAlignmentData:
    """A decomposition store. targets: [N, d_clip] in the store's image order (``store.image_ids()``)."""

    def __init__(self, store: DecompositionStore, targets: torch.Tensor, batch_size: int = 128,
                 heldout_fraction: float = 0.1, seed: int = 0):
        _check_targets(targets, len(store))
        self.store, self.targets, self.labels = store, targets, list(store.labels)
        self.batch_size, self.seed = batch_size, seed
        self.model, self.level = store.manifest.get("model", ""), store.level
        self.heldout = heldout_mask(len(store), heldout_fraction, seed)  # [N] in store order
        self.d_model = int(store.components(0).flatten(1).shape[1]) if len(store) else 0
        self.d_clip = targets.shape[1]

    def batches(self, split: str, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _split_rows(self.heldout, split)  # validates split
        offsets = torch.tensor([0] + [shard.count for shard in self.store.shards]).cumsum(0)
        order = list(range(len(self.store.shards)))
        if epoch is not None:  # shards in random order, rows shuffled within each shard
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        for k in order:
            shard = self.store.shards[k]
            start = int(offsets[k])
            in_shard = self.heldout[start:start + shard.count]
            rows = _shuffled(_split_rows(in_shard, split), self.seed + k, epoch)
            if len(rows) == 0:
                continue
            with safe_open(str(shard.path), framework="pt") as handle:
                components = handle.get_tensor("components").flatten(2)  # [C, n, d_model], storage dtype
            for first in range(0, len(rows), self.batch_size):
                batch = rows[first:first + self.batch_size]
                yield components[:, batch], self.targets[start + batch]

    def summary(self) -> dict[str, Any]:
        return {"source": "store", "store": str(self.store.root), "images": len(self.store),
                "heldout_images": int(self.heldout.sum()), "seed": self.seed,
                "store_dtype": self.store.manifest.get("dtype")}


class StreamingAlignmentData:
    """On the fly: every batch of ``loader`` is decomposed and CLIP-encoded when it is used.

    loader:        yields images [B, 3, H, W] (or tuples whose first element is the images)
    decomposer:    ``decomposer(images, level=level)`` -> ``Decomposition`` (e.g. ``trace_and_decompose(m)``)
    encode_images: images -> CLIP image embeddings [B, d_clip] (e.g. ``ClipModel.encode_images``
                   behind the CLIP preprocessing your images need)
    heldout_loader: held-out images; without it every ``heldout_every``-th batch of ``loader`` is
                   held out (use a loader that does not shuffle, so the split stays fixed)
    """

    def __init__(self, loader: Iterable, decomposer: Callable, encode_images: Callable[[torch.Tensor], torch.Tensor],
                 level: str = "head", model: str = "", heldout_loader: Iterable | None = None,
                 heldout_every: int = 10):
        self.loader, self.decomposer, self.encode_images = loader, decomposer, encode_images
        self.level, self.model = level, model
        self.heldout_loader, self.heldout_every = heldout_loader, heldout_every
        self.images_seen = {"train": 0, "heldout": 0}
        components, targets = self._pair(next(iter(loader)), remember_labels=True)
        self.d_model, self.d_clip = components.shape[2], targets.shape[1]

    def _pair(self, batch, remember_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        with torch.no_grad():
            decomposition = self.decomposer(images, level=self.level)
            targets = self.encode_images(images).float()
        if remember_labels:
            self.labels = list(decomposition.labels)
        elif [l.key for l in decomposition.labels] != [l.key for l in self.labels]:
            raise ValueError("the decomposer returned other components than on the first batch")
        return decomposition.components.flatten(2), targets  # [C, B, d_model], [B, d_clip]

    def batches(self, split: str, epoch: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _split_rows(torch.zeros(0, dtype=torch.bool), split)  # validates split
        if self.heldout_loader is not None:
            sources = {"train": [self.loader], "heldout": [self.heldout_loader],
                       "all": [self.loader, self.heldout_loader]}[split]
            for loader in sources:
                for batch in loader:
                    yield self._counted(batch, split)
            return
        for index, batch in enumerate(self.loader):
            held_out = self.heldout_every > 0 and index % self.heldout_every == self.heldout_every - 1
            if split == "all" or held_out == (split == "heldout"):
                yield self._counted(batch, split)

    def _counted(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        components, targets = self._pair(batch)
        if split in self.images_seen:
            self.images_seen[split] += components.shape[1]
        return components, targets

    def summary(self) -> dict[str, Any]:
        return {"source": "streaming", "heldout": "heldout_loader" if self.heldout_loader is not None
                else f"every {self.heldout_every}th batch", "images_decomposed": dict(self.images_seen)}


def store_component_rows(store: DecompositionStore, index: int) -> torch.Tensor:
    """One component over all images of a store: [N, d_model] (storage dtype), reading one row per shard."""
    rows = []
    for shard in store.shards:
        with safe_open(str(shard.path), framework="pt") as handle:
            rows.append(handle.get_slice("components")[index].flatten(1))
    return torch.cat(rows)


def store_component_batches(store: DecompositionStore, batch_size: int = 128,
                            max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Components of a store's images in order, [C, b, d_model] (storage dtype), one shard read at a time."""
    remaining = len(store) if max_images is None else min(max_images, len(store))
    for shard in store.shards:
        if remaining <= 0:
            return
        with safe_open(str(shard.path), framework="pt") as handle:
            components = handle.get_tensor("components").flatten(2)  # [C, n, d_model]
        components = components[:, :remaining]
        remaining -= components.shape[1]
        for start in range(0, components.shape[1], batch_size):
            yield components[:, start:start + batch_size]
