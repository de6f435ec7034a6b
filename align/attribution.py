"""One call for attribution: which components and which image positions push each image towards a target.

``attribute(decomposer, images, target)`` scores every component along the target's direction (scores along
directions: the component vectors are never built) and returns an ``Attribution``: labelled scores with a
table of the top components and top source positions, a heatmap and a plot. The target is

* a class index (or one per image): the classifier's logit, for a decomposer made with ``output="logits"``;
* a text (or one per image): its CLIP embedding, each component seen through its CompAlign map
  (``aligner=`` and ``clip=``);
* a vector ``[D]`` in the decomposed output's space (a probe, a classifier row of your own).

Per-image targets (a list of B classes or texts) score each image along its own target, at the cost of one
target (directions per image, ``decompose.directions.per_image``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decompose import ComponentLabel, Decomposer
from decompose.decomposition import Decomposition
from decompose.directions import Directions
from decompose.directions import per_image as per_image_directions
from decompose.display import bar_figure, figure_svg, html_table

from .clip_models import ClipModel
from .compalign import CompAlign
from .heatmaps import grid_layout, is_grid_position, token_heatmaps
from .parent_maps import aligner_directions, per_image_aligner_directions
from .text_bank import encode_descriptions


class AttributionTargetError(ValueError):
    """A target that cannot be turned into directions for this decomposer."""


@dataclass
class Attribution:
    """scores [C, B]: ⟨component c of image b, its target direction⟩, labels in the decomposition's order;
    ``targets``: the target of each image, as given; ``total`` [B]: the target's score of the whole
    representation (the sum of the scores, with a shared direction)."""

    scores: torch.Tensor
    labels: list[ComponentLabel]
    targets: list[str]
    level: str
    decomposition: Decomposition

    def top_components(self, count: int = 10, image: int | None = None) -> list[tuple[str, float]]:
        """The ``count`` components that push most towards the target (largest score; mean over the batch,
        or one ``image``), as (label key, score)."""
        values = self._per_image(image)
        order = values.argsort(descending=True)[:count].tolist()
        return [(self.labels[i].key, float(values[i])) for i in order]

    def position_scores(self, image: int | None = None) -> dict[tuple[int, int], float]:
        """(row, col) on each attention's token grid -> the summed score of its source tokens (level token;
        grids of different stages are kept apart by their own coordinates)."""
        values = self._per_image(image)
        out: dict[tuple[int, int], float] = {}
        for value, label in zip(values.tolist(), self.labels):
            if label.token is not None and is_grid_position(label.position):
                key = tuple(label.position)
                out[key] = out.get(key, 0.0) + value
        return out

    def top_positions(self, count: int = 10, image: int | None = None) -> list[tuple[tuple[int, int], float]]:
        """The ``count`` source positions that push most towards the target (level token)."""
        if self.level != "token":
            raise ValueError(f"source positions need level 'token', this attribution is level {self.level!r}")
        return sorted(self.position_scores(image).items(), key=lambda item: -item[1])[:count]

    def heatmaps(self, image_size: tuple[int, int]) -> torch.Tensor:
        """[B, H, W]: each image's token scores on the image grid (``align.heatmaps.token_heatmaps``)."""
        if self.level != "token":
            raise ValueError(f"heatmaps need level 'token', this attribution is level {self.level!r}")
        return token_heatmaps(self.scores, self.labels, image_size)

    def table(self, count: int = 10, image: int | None = None) -> str:
        """Text table: the top components, then (level token) the top source positions."""
        where = f"image {image}" if image is not None else f"mean over {self.scores.shape[1]} images"
        lines = [f"target: {', '.join(dict.fromkeys(self.targets))}  ({where}, level {self.level})",
                 f"{'component':44s} {'score':>10s}"]
        lines += [f"{key:44s} {value:10.4f}" for key, value in self.top_components(count, image)]
        if self.level == "token":
            lines += ["", f"{'source position (row, col)':44s} {'score':>10s}"]
            lines += [f"{position!s:44s} {value:10.4f}" for position, value in self.top_positions(count, image)]
        return "\n".join(lines)

    def plot(self, count: int = 15, image: int | None = None):
        """matplotlib Figure: bars of the top components and, at level token, the source-position grid."""
        from matplotlib.figure import Figure

        top = self.top_components(count, image)
        grid = self._grid(image) if self.level == "token" else None
        figure = Figure(figsize=(10 if grid is not None else 6, 0.3 * len(top) + 1.5), layout="constrained")
        axes = figure.subplots(1, 2 if grid is not None else 1, squeeze=False)[0]
        bar_figure([key for key, _ in top], [value for _, value in top],
                   f"top components towards {', '.join(dict.fromkeys(self.targets))}", "score", axes[0])
        if grid is not None:
            shown = axes[1].imshow(grid.numpy(), cmap="coolwarm", vmin=-float(grid.abs().max()),
                                   vmax=float(grid.abs().max()))
            figure.colorbar(shown, ax=axes[1], fraction=0.046)
            axes[1].set_title("score per source position", fontsize=10)
        return figure

    def _repr_html_(self) -> str:
        rows = [[key, value] for key, value in self.top_components(10)]
        return (f"<div><b>Attribution</b> to {', '.join(dict.fromkeys(self.targets))}, level {self.level}, "
                f"{self.scores.shape[1]} images<div style='display:flex;gap:1em'>"
                f"{html_table(['component', 'mean score'], rows)}<div style='max-width:720px'>"
                f"{figure_svg(self.plot())}</div></div></div>")

    def _per_image(self, image: int | None) -> torch.Tensor:
        return self.scores.mean(1) if image is None else self.scores[:, image]

    def _grid(self, image: int | None) -> torch.Tensor | None:
        """[rows, cols] of the finest token grid among the attentions (the scores of that grid's sources)."""
        by_size: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            if label.token is not None and is_grid_position(label.position):
                by_size.setdefault(label.node, []).append(i)
        if not by_size:
            return None
        values = self._per_image(image)
        grids = [grid_layout(values[rows].unsqueeze(0), [self.labels[r].position for r in rows])[0]
                 for rows in by_size.values()]
        finest = max(grid.numel() for grid in grids)
        return sum(grid for grid in grids if grid.numel() == finest)


def attribute(decomposer: Decomposer, images: torch.Tensor, target, level: str = "token",
              aligner: CompAlign | None = None, clip: ClipModel | None = None,
              templates: str | Sequence[str] | None = None) -> Attribution:
    """Score every component of ``images`` [B, C, H, W] towards ``target`` (see the module doc)."""
    batch = images.shape[0]
    targets, per_image = _as_list(target, batch)
    if isinstance(targets[0], str):
        directions, names = _text_directions(targets, aligner, clip, templates, per_image), list(targets)
    elif isinstance(targets[0], int):
        directions, names = _class_directions(decomposer, images, targets, per_image), [f"class {c}" for c in targets]
    else:
        vector = torch.as_tensor(targets[0]) if len(targets) == 1 else None
        if vector is None or vector.dim() != 1:
            raise AttributionTargetError("a vector target must be one direction [D] (for several, call "
                                         "decomposer(images, directions=[k, D]) directly)")
        directions, names = vector.unsqueeze(0), ["vector"]
    dec = decomposer(images, level=level, directions=directions)     # [C, B, 1]: each image along its own target
    return Attribution(dec.scores[..., 0], dec.labels, names if per_image else names * batch, str(dec.level), dec)


def _as_list(target, batch: int) -> tuple[list, bool]:
    """(the distinct targets as a list, whether there is one per image)."""
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        target = int(target)
    if isinstance(target, (str, int, torch.Tensor)):
        return [target], False
    target = list(target)
    if not target:
        raise AttributionTargetError("the target list is empty")
    if len(target) != batch:
        raise AttributionTargetError(f"{len(target)} targets for {batch} images: give one target, or one per image")
    if not all(isinstance(t, type(target[0])) for t in target):
        raise AttributionTargetError("per-image targets must all be class indices or all be texts")
    return target, True


def _class_directions(decomposer: Decomposer, images: torch.Tensor, classes: list[int], per_image: bool):
    """The classifier's logit of ``classes`` (one, or one per image: directions per image)."""
    if decomposer.output != "logits":
        raise AttributionTargetError("a class index needs the classifier's logits: decompose with "
                                     "trace_and_decompose(model, output='logits'), or give the class's "
                                     "classifier row as a vector target")
    width = decomposer.output_width(images)
    unique = list(dict.fromkeys(classes))
    bad = [c for c in unique if not 0 <= c < width]
    if bad:
        raise AttributionTargetError(f"class indices {bad} are outside the model's {width} classes")
    rows = torch.eye(width, dtype=images.dtype, device=images.device)
    return per_image_directions(rows[classes]) if per_image else rows[classes[:1]]


def _text_directions(texts: list[str], aligner: CompAlign | None, clip: ClipModel | None,
                     templates: str | Sequence[str] | None, per_image: bool) -> Directions:
    """The texts' CLIP embeddings through the aligner's maps (one text, or one per image: each encoded once)."""
    if aligner is None or clip is None:
        raise AttributionTargetError("a text target needs aligner= (a CompAlign for this model) and clip= (its "
                                     "CLIP model, align.load_clip)")
    unique = list(dict.fromkeys(texts))
    embedded = encode_descriptions(clip, unique, templates)                          # [T, d_clip]
    if not per_image:
        return aligner_directions(aligner, embedded)
    return per_image_aligner_directions(aligner, embedded[[unique.index(text) for text in texts]])
