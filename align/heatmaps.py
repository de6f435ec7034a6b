"""Token heatmaps: what each image position contributes along a text direction.

At level ``token`` every attention component is one head's share of one source token, and
its label carries the token's ``position`` (``(row, col)`` in the patch grid of that
attention's stage; windowed attention already undone). With ``contributions`` [C, B] (e.g.
⟨a_i(x), t⟩ from ``parent_maps.text_contributions``), a heatmap sums the selected heads'
contributions per position, per attention branch on its own grid (extent: largest row / col
+ 1 over that branch's tokens), upsamples each grid bilinearly to the image size and adds
the branches. Tokens without a grid position (class / register tokens, padding) are left
out. Nothing here knows the architecture: only labels and tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from decompose import ComponentLabel

from .parent_maps import aligner_directions, coarser_keys, per_image_aligner_directions

Position = tuple[int, int] | str | None


def is_grid_position(position: Position) -> bool:
    return isinstance(position, (tuple, list)) and len(position) == 2 and all(isinstance(v, int) for v in position)


def grid_layout(values: torch.Tensor, positions: Sequence[Position], extent: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """values [B, S] of S sources -> [B, rows, cols] summed per grid cell (non-grid sources dropped).

    extent: (rows, cols) of the grid (default: largest row / col + 1 among ``positions``)
    """
    if values.shape[-1] != len(positions):
        raise ValueError(f"{values.shape[-1]} values for {len(positions)} positions")
    on_grid = [(s, p) for s, p in enumerate(positions) if is_grid_position(p)]
    if not on_grid:
        raise ValueError("no source has a (row, col) grid position; heatmaps need token-level components of "
                         "attention over image patches")
    if extent is None:
        extent = (max(p[0] for _, p in on_grid) + 1, max(p[1] for _, p in on_grid) + 1)
    rows, cols = extent
    sources = torch.tensor([s for s, _ in on_grid], device=values.device)
    cells = torch.tensor([p[0] * cols + p[1] for _, p in on_grid], device=values.device)
    grid = values.new_zeros(values.shape[0], rows * cols)
    grid.index_add_(1, cells, values.index_select(1, sources))
    return grid.view(-1, rows, cols)


def upsample(grids: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """[B, rows, cols] -> [B, H, W], bilinear (``align_corners=False``: cells cover equal areas)."""
    return F.interpolate(grids.unsqueeze(1).float(), size=tuple(image_size), mode="bilinear",
                         align_corners=False).squeeze(1)


def head_selector(keys: Iterable[str] | None) -> Callable[[ComponentLabel], bool]:
    """Keep a token component whose head key (``blocks.3.attn.h5``) or branch (``blocks.3.attn``) is in ``keys``
    (None: every head)."""
    if keys is None:
        return lambda label: True
    wanted = set(keys)
    return lambda label: any(key in wanted for key in coarser_keys(label))


def branch_grids(contributions: torch.Tensor, labels: Sequence[ComponentLabel],
                 keep: Callable[[ComponentLabel], bool] | None = None) -> dict[str, torch.Tensor]:
    """Attention branch name -> [B, rows, cols]: the kept token components' contributions [C, B] per cell."""
    if contributions.shape[0] != len(labels):
        raise ValueError(f"{contributions.shape[0]} contribution rows for {len(labels)} labels")
    keep = keep or (lambda label: True)
    by_branch: dict[str, list[int]] = {}
    extents: dict[str, tuple[int, int]] = {}
    for row, label in enumerate(labels):
        if label.token is None or not is_grid_position(label.position):
            continue
        rows, cols = extents.get(label.name, (0, 0))
        extents[label.name] = (max(rows, label.position[0] + 1), max(cols, label.position[1] + 1))
        if keep(label):
            by_branch.setdefault(label.name, []).append(row)
    if not extents:
        raise ValueError("no token component has a (row, col) position: heatmaps need a decomposition at level "
                         "'token' whose labels carry positions")
    return {name: grid_layout(contributions[rows].T, [labels[r].position for r in rows], extents[name])
            for name, rows in by_branch.items()}


def token_heatmaps(contributions: torch.Tensor, labels: Sequence[ComponentLabel], image_size: tuple[int, int],
                   keep: Callable[[ComponentLabel], bool] | None = None) -> torch.Tensor:
    """[B, H, W]: Σ over kept heads and their source tokens of contributions [C, B], on the image grid."""
    grids = branch_grids(contributions, labels, keep)
    if not grids:
        raise ValueError("no token component was selected for the heatmap")
    return torch.stack([upsample(grid, image_size) for grid in grids.values()]).sum(0)


def text_heatmaps(decomposer, aligner, images: torch.Tensor, texts: torch.Tensor,
                  image_size: tuple[int, int] | None = None, keep: Callable[[ComponentLabel], bool] | None = None
                  ) -> torch.Tensor:
    """[B, H, W]: ``token_heatmaps`` of ⟨a_i(x_b), t_b⟩ for ``images`` [B, C, H, W] and CLIP directions ``texts``
    [B, d_clip] (each image its own text) or [d_clip] (one for all), from the decomposer's scores along the
    aligner's pulled-back directions at level token: the token components [C, B, D] are never built, and a
    text per image costs what one text costs. ``image_size``: default the images' own."""
    if texts.dim() == 1:
        directions = aligner_directions(aligner, texts)
    else:
        directions = per_image_aligner_directions(aligner, texts)
    dec = decomposer(images, level="token", directions=directions)
    return token_heatmaps(dec.scores[..., 0], dec.labels, image_size or tuple(images.shape[-2:]), keep)


class AttentionLayer(Protocol):
    """What ``decompose.attention_maps`` returns per layer (any object with these fields)."""

    name: str
    weights: torch.Tensor           # [B, heads, S]
    positions: list


def attention_heatmaps(maps: Sequence[AttentionLayer], image_size: tuple[int, int], layer: int = -1,
                       heads: Sequence[int] | None = None) -> torch.Tensor:
    """Baseline [B, H, W]: one layer's attention from the output-reading queries, mean over ``heads``."""
    if not maps:
        raise ValueError("no attention layer reaches the output")
    chosen = maps[layer]
    weights = chosen.weights if heads is None else chosen.weights[:, list(heads)]
    return upsample(grid_layout(weights.mean(1), chosen.positions), image_size)
