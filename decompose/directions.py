"""Directions to score components along: ⟨component c of image b, u⟩ without building the components.

``Directions`` holds a table ``[M, k, D]`` of directions in the space of the decomposed output and says
which row of it each component uses:

* ``shared(U)``: one row, ``U`` [k, D], for every component;
* ``per_component(table, row_of)``: component c uses ``table[row_of(label c)]`` (an aligner's maps pulled
  back: each component's W_i t for CLIP texts t, a head's token components on the head's map).

The decomposer pulls each row back to where components are born (``decompose.scoring``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .labels import ComponentLabel


class DirectionError(ValueError):
    """Directions that cannot score this decomposition (wrong width, non-finite, unknown component)."""


@dataclass
class Directions:
    """table: [M, k, D] directions; row_of: a component's label -> its row (None: every label uses row 0)."""

    table: torch.Tensor
    row_of: Callable[[ComponentLabel], int] | None = None

    @property
    def count(self) -> int:
        """k: scores per component."""
        return self.table.shape[1]

    def rows(self, labels: Sequence[ComponentLabel]) -> torch.Tensor:
        """Long [C]: the table row each label uses."""
        return torch.tensor(self.row_list(labels), dtype=torch.long)

    def row_list(self, labels: Sequence[ComponentLabel]) -> list[int]:
        """The table row each label uses, from the labels alone (never a value read back from a tensor)."""
        if self.row_of is None:
            return [0] * len(labels)
        return [self.row_of(label) for label in labels]

    def checked(self, width: int, like: torch.Tensor) -> Directions:
        """These directions for an output of ``width`` numbers per image, in ``like``'s dtype and device."""
        if self.table.shape[-1] != width:
            raise DirectionError(f"directions have width {self.table.shape[-1]} but the decomposed output has "
                                 f"{width} numbers per image; give directions of shape [k, {width}]")
        return Directions(self.table.to(dtype=like.dtype, device=like.device), self.row_of)

    def project(self, values: torch.Tensor, labels: Sequence[ComponentLabel]) -> torch.Tensor:
        """``values`` [c, B, *D] of components ``labels`` -> their scores [c, B, k]."""
        flat = values.reshape(values.shape[0], values.shape[1], -1).to(self.table.dtype)
        if self.row_of is None or self.table.shape[0] == 1:
            return flat @ self.table[0].T
        return torch.einsum("cbd,ckd->cbk", flat, self.table[self.rows(labels).to(self.table.device)])


def shared(directions: torch.Tensor) -> Directions:
    """The same directions ``[k, D]`` (or one ``[D]``) for every component."""
    table = _as_tensor(directions)
    if table.dim() == 1:
        table = table.unsqueeze(0)
    if table.dim() != 2:
        raise DirectionError(f"shared directions must be [k, D] (or [D]), got shape {tuple(table.shape)}")
    return Directions(_finite(table).unsqueeze(0))


def per_component(table: torch.Tensor, row_of: Callable[[ComponentLabel], int]) -> Directions:
    """Component c scored along ``table[row_of(label c)]`` ([M, k, D], or [M, D] for k = 1). ``row_of``
    raises a ``DirectionError`` (or a subclass of ``LookupError``) for a component it has no row for."""
    table = _as_tensor(table)
    if table.dim() == 2:
        table = table.unsqueeze(1)
    if table.dim() != 3:
        raise DirectionError(f"per-component directions must be [M, k, D] or [M, D], got {tuple(table.shape)}")
    return Directions(_finite(table), _bounded(row_of, table.shape[0]))


def as_directions(directions) -> Directions:
    """A ``Directions``, or a tensor ``[k, D]`` / ``[D]`` shared by every component."""
    return directions if isinstance(directions, Directions) else shared(directions)


def _as_tensor(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DirectionError(f"directions must be a tensor [k, D], got {type(value).__name__}") from error
    if not value.is_floating_point():
        raise DirectionError(f"directions must be floating point, got {value.dtype}")
    return value


def _finite(table: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(table).all()):
        bad = (~torch.isfinite(table)).reshape(-1, table.shape[-1]).any(-1).nonzero().flatten().tolist()
        raise DirectionError(f"directions contain NaN or inf (rows {bad[:5]} of the flattened [*, D] table)")
    return table


def _bounded(row_of: Callable[[ComponentLabel], int], rows: int) -> Callable[[ComponentLabel], int]:
    def checked(label: ComponentLabel) -> int:
        row = row_of(label)
        if not isinstance(row, int) or not 0 <= row < rows:
            raise DirectionError(f"no direction row for component {label.key} (row_of gave {row!r}; "
                                 f"the table has {rows} rows)")
        return row
    return checked
