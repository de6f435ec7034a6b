"""Where the token heatmaps of ``heatmap`` / ``segment`` come from, batch by batch:

* ``StoreHeatmaps``: a token-level store's components, projected on the aligner's pulled-back text directions;
* ``FolderHeatmaps``: ``--model`` decomposes an image folder here, at level token with scores along those
  directions (``align.parent_maps.aligner_directions``): a batch holds its scores [C, b, 1], never the
  component vectors [C, b, D], and nothing is kept between batches but what the command keeps.

Both give the same heatmaps for the same model, preprocessing and images (``tests/test_heatmap_streaming.py``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from align.compalign import AlignerMismatch, CompAlign
from align.heatmaps import token_heatmaps
from align.parent_maps import aligner_directions, text_contributions
from decompose import ComponentLabel, DecompositionStore, trace_and_decompose
from decompose.dataset import evaluation_transform
from decompose.directions import DirectionError
from decompose.store import preprocessing_transform

from .decompose_commands import model_and_data_config
from .image_batches import ImageBatches
from .options import model_from_arguments, open_store_and_aligner
from .text_queries import text_direction

Keep = Callable[[ComponentLabel], bool]


@dataclass
class HeatmapBatch:
    ids: list[str]
    heatmaps: torch.Tensor              # [b, H, W] on the cpu
    images: torch.Tensor | None         # [b, 3, H, W] the model's (normalised) inputs; None: not read


def labels_with_positions(store: DecompositionStore, args) -> tuple[list[ComponentLabel], Any]:
    """The store's labels with token positions (recorded in the store, else from ``--model``), and the
    decomposer when one was built."""
    if store.level != "token":
        raise ValueError(f"heatmaps need a token-level store; this one is level {store.level!r} "
                         "(vit-decompose decompose --level token)")
    if any(label.position is not None for label in store.labels):  # stores record positions since they exist
        return store.labels, None
    if not args.model:
        raise ValueError("this store's labels carry no token positions; name its model so they can be recovered: "
                         "--model NAME [--model-kwargs JSON] [--checkpoint FILE]")
    decomposer = trace_and_decompose(model_from_arguments(args))
    probe = torch.zeros((1,) + tuple(store.manifest["preprocessing"]["input_size"]))
    labels = decomposer(probe, level="token").labels
    if [l.key for l in labels] != [l.key for l in store.labels]:
        raise ValueError(f"--model {args.model} gives other components than the store's ({len(labels)} vs "
                         f"{len(store.labels)}); pass the model (and --model-kwargs) the store was made with")
    return labels, decomposer


def read_images(root: Path, ids: list[str], transform) -> torch.Tensor:
    """[N, 3, H, W]: the images ``ids`` (paths relative to ``root``) through ``transform``."""
    from PIL import Image

    images = []
    for image_id in ids:
        path = root / image_id
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} is not under {root}; pass the folder the store was made from")
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


class StoreHeatmaps:
    """Heatmaps of a token-level ``--store`` along the ``--text`` (its ``--aligner``; images from ``--images``)."""

    def __init__(self, args, device: torch.device):
        self.store, self.aligner = open_store_and_aligner(args, device, same_level=False)
        self.labels, self._decomposer = labels_with_positions(self.store, args)
        self.direction = text_direction(args, self.aligner, device)                    # [d_clip]
        self.image_size = self.store.image_size
        self.folder = Path(args.images) if args.images else None
        self.args, self.device = args, device

    def transform(self, normalise: bool = True, nearest: bool = False):
        return self.store.transform(normalise, nearest)

    def first_ids(self, count: int | None) -> list[str]:
        return self.store.image_ids()[:count]

    def batches(self, ids: list[str], batch_size: int, keep: Keep, with_images: bool = False
                ) -> Iterator[HeatmapBatch]:
        if with_images and self.folder is None:
            raise ValueError("this needs the images themselves: give --images DIR, the folder the store was made from")
        rows = self.store.positions_of(ids)
        for start in range(0, len(ids), batch_size):
            batch_ids = ids[start:start + batch_size]
            components, _ = self.store.load_rows(rows[start:start + batch_size])
            contributions = text_contributions(self.aligner, components.to(self.device), self.labels,
                                               self.direction)                          # [C, b]
            images = read_images(self.folder, batch_ids, self.transform()) if with_images else None
            yield HeatmapBatch(batch_ids, token_heatmaps(contributions.cpu(), self.labels, self.image_size, keep),
                               images)

    def decomposer(self):
        """The store's model traced (``--model``), for the attention baseline (on the cpu)."""
        if not self.args.model:
            raise ValueError("--baseline runs the model: give --model NAME (with --model-kwargs / --checkpoint as "
                             "the store was made)")
        if self._decomposer is None:
            self._decomposer = trace_and_decompose(model_from_arguments(self.args))
        return self._decomposer


def aligner_misfit(args, aligner: CompAlign, error: Exception) -> AlignerMismatch:
    """The error of an ``--aligner`` whose components or width are not those of ``--model``."""
    return AlignerMismatch(f"the aligner {args.aligner} (model {aligner.model_name!r}, d_model {aligner.d_model}) "
                           f"does not fit --model {args.model} {args.model_kwargs or ''}: {error}")


class ModelHeatmaps:
    """``--model``'s token heatmaps along the ``--text``: scores along the ``--aligner``'s directions W_i t."""

    def __init__(self, args, device: torch.device):
        if not args.model:
            raise ValueError("decomposing images here needs the model: give --model NAME [--checkpoint FILE] "
                             "[--model-kwargs JSON]")
        model, self.config = model_and_data_config(args)
        self.aligner = CompAlign.load(args.aligner, model=args.model, device=device)
        self.directions = aligner_directions(self.aligner, text_direction(args, self.aligner, device))
        self.decomposer = trace_and_decompose(model.to(device))
        self.args, self.device = args, device

    def __call__(self, images: torch.Tensor, keep: Keep) -> torch.Tensor:
        """images [b, 3, H, W] -> heatmaps [b, H, W] on the cpu."""
        images = images.to(self.device)
        try:
            dec = self.decomposer(images, level="token", directions=self.directions)
        except (AlignerMismatch, DirectionError) as error:
            raise aligner_misfit(self.args, self.aligner, error) from None
        return token_heatmaps(dec.scores[..., 0].cpu(), dec.labels, tuple(images.shape[-2:]), keep)


class FolderHeatmaps:
    """Heatmaps of the ``--images`` folder, decomposed here by ``--model`` with its preprocessing."""

    def __init__(self, args, device: torch.device):
        if not args.images:
            raise ValueError("give --images DIR (the folder to decompose with --model), or a token-level --store")
        self.files = ImageBatches(args.images)                                          # refused before loading
        self.model = ModelHeatmaps(args, device)
        self.files.transform, self.preprocessing = evaluation_transform(self.model.config)
        self.image_size = tuple(int(v) for v in self.preprocessing["input_size"][-2:])
        self.folder = self.files.root

    def transform(self, normalise: bool = True, nearest: bool = False):
        return preprocessing_transform(self.preprocessing, normalise, nearest)

    def first_ids(self, count: int | None) -> list[str]:
        return self.files.ids()[:count]

    def batches(self, ids: list[str], batch_size: int, keep: Keep, with_images: bool = False
                ) -> Iterator[HeatmapBatch]:
        """Batches of the readable images among ``ids`` (an unreadable file is skipped with a note)."""
        for batch_ids, images in self.files.batches(ids, batch_size):                   # [b, 3, H, W]
            yield HeatmapBatch(batch_ids, self.model(images, keep), images if with_images else None)

    def decomposer(self):
        return self.model.decomposer


def heatmap_source(args, device: torch.device) -> StoreHeatmaps | FolderHeatmaps:
    """A token ``--store`` (as made by ``vit-decompose decompose --level token``), else ``--model`` on ``--images``."""
    if args.store:
        return StoreHeatmaps(args, device)
    if not args.model and not args.images:
        raise ValueError("give a token-level --store STORE, or --model NAME [--checkpoint FILE] --images DIR to "
                         "decompose the images here batch by batch")
    return FolderHeatmaps(args, device)
