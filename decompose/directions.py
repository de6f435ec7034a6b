"""Directions to score components along: ⟨component c of image b, u⟩ without building the components.

``Directions`` holds a table ``[M, k, D]`` of directions in the space of the decomposed output, or
``[M, B, k, D]`` with directions of each image of the batch, and says which row of it each component uses:

* ``shared(U)``: one row, ``U`` [k, D], for every component and image;
* ``per_component(table, row_of)``: component c uses ``table[row_of(label c)]`` (an aligner's maps pulled
  back: each component's W_i t for CLIP texts t, a head's token components on the head's map);
* ``per_image(U)``: ``U`` [B, k, D], image b's components along ``U[b]`` (each image's class or text);
* ``per_component_per_image(table, row_of)``: component c of image b along ``table[row_of(label c), b]``
  (an aligner's maps pulled back for each image's own text).

The decomposer pulls each row back to where components are born (``decompose.scoring``). Per-image
directions cost what k shared ones cost: the pull-back is per image anyway, so image b's adjoint carries
image b's directions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .labels import ComponentLabel


class DirectionError(ValueError):
    """Directions that cannot score this decomposition (wrong width or batch, non-finite, unknown component)."""


@dataclass
class Directions:
    """table: [M, k, D] directions shared by every image, or [M, B, k, D] per image; row_of: a component's
    label -> its row (None: every label uses row 0)."""

    table: torch.Tensor
    row_of: Callable[[ComponentLabel], int] | None = None

    @property
    def count(self) -> int:
        """k: scores per component."""
        return self.table.shape[-2]

    @property
    def images(self) -> int | None:
        """B for directions per image (a table [M, B, k, D]); None for directions shared by every image."""
        return self.table.shape[1] if self.table.dim() == 4 else None

    def row(self, row: int) -> torch.Tensor:
        """One row's directions: [k, D], or [B, k, D] per image."""
        return self.table[row]

    def columns(self, first: int, last: int) -> Directions:
        """Directions ``first`` to ``last`` - 1 of every row (and image)."""
        return Directions(self.table[..., first:last, :], self.row_of)

    def rows(self, labels: Sequence[ComponentLabel]) -> torch.Tensor:
        """Long [C]: the table row each label uses."""
        return torch.tensor(self.row_list(labels), dtype=torch.long)

    def row_list(self, labels: Sequence[ComponentLabel]) -> list[int]:
        """The table row each label uses, from the labels alone (never a value read back from a tensor)."""
        if self.row_of is None:
            return [0] * len(labels)
        return [self.row_of(label) for label in labels]

    def checked(self, width: int, like: torch.Tensor, batch: int) -> Directions:
        """These directions for a batch of ``batch`` images with ``width`` output numbers each, in ``like``'s
        dtype and device."""
        if self.table.shape[-1] != width:
            shape = f"[k, {width}]" if self.images is None else f"[{batch}, k, {width}]"
            raise DirectionError(f"directions have width {self.table.shape[-1]} but the decomposed output has "
                                 f"{width} numbers per image; give directions of shape {shape}")
        if self.images is not None and self.images != batch:
            raise DirectionError(f"directions per image are given for {self.images} images but the batch has "
                                 f"{batch}; give one set of directions per image of the batch "
                                 f"([{batch}, k, {width}]), or directions shared by every image ([k, {width}])")
        return Directions(self.table.to(dtype=like.dtype, device=like.device), self.row_of)

    def project(self, values: torch.Tensor, labels: Sequence[ComponentLabel]) -> torch.Tensor:
        """``values`` [c, B, *D] of components ``labels`` -> their scores [c, B, k]."""
        flat = values.reshape(values.shape[0], values.shape[1], -1).to(self.table.dtype)
        rows = self.row_list(labels)
        if len(set(rows)) <= 1:
            return _along(flat, self.row(rows[0] if rows else 0))
        if self.images is None:
            return torch.einsum("cbd,ckd->cbk", flat, self.table[self.rows(labels).to(self.table.device)])
        # per image and row: each row's components at once (never a [c, B, k, D] gathered table)
        scores = flat.new_empty(*flat.shape[:2], self.count)
        for row in sorted(set(rows)):
            at = torch.tensor([i for i, r in enumerate(rows) if r == row], device=flat.device)
            scores[at] = _along(flat[at], self.row(row))
        return scores


def _along(flat: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``flat`` [c, B, D] along ``directions`` [k, D] (every image) or [B, k, D] (each image its own): [c, B, k]."""
    if directions.dim() == 2:
        return flat @ directions.T
    return torch.einsum("cbd,bkd->cbk", flat, directions)


def shared(directions: torch.Tensor) -> Directions:
    """The same directions ``[k, D]`` (or one ``[D]``) for every component."""
    return Directions(_table(directions, (), "shared directions").unsqueeze(0))


def per_component(table: torch.Tensor, row_of: Callable[[ComponentLabel], int]) -> Directions:
    """Component c scored along ``table[row_of(label c)]`` ([M, k, D], or [M, D] for k = 1). ``row_of``
    raises a ``DirectionError`` (or a subclass of ``LookupError``) for a component it has no row for."""
    table = _table(table, ("M",), "per-component directions")
    return Directions(table, _bounded(row_of, table.shape[0]))


def per_image(directions: torch.Tensor) -> Directions:
    """Image b's components along ``directions[b]`` ([B, k, D], or [B, D] for one direction per image): each
    image its own class row or text, at the cost of k shared directions."""
    return Directions(_table(directions, ("B",), "directions per image").unsqueeze(0))


def per_component_per_image(table: torch.Tensor, row_of: Callable[[ComponentLabel], int]) -> Directions:
    """Component c of image b along ``table[row_of(label c), b]`` ([M, B, k, D], or [M, B, D] for k = 1): an
    aligner's maps pulled back for each image's own text. ``row_of`` as for ``per_component``."""
    table = _table(table, ("M", "B"), "per-component directions per image")
    return Directions(table, _bounded(row_of, table.shape[0]))


def _table(value, lead: tuple[str, ...], what: str) -> torch.Tensor:
    """``value`` as a finite floating table [*lead, k, D] (given as that, or [*lead, D] for k = 1)."""
    table = _as_tensor(value)
    if table.dim() == len(lead) + 1:
        table = table.unsqueeze(-2)
    if table.dim() != len(lead) + 2:
        raise DirectionError(f"{what} must be [{', '.join((*lead, 'k', 'D'))}] or [{', '.join((*lead, 'D'))}], "
                             f"got shape {tuple(table.shape)}")
    return _finite(table)


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
