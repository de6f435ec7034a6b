"""The cells a key's support is made of: groups of elements of the tensor backward passes end at.

A key reaches a cell when the gradient of some element of the cell is nonzero. Two layouts:

* ``GridCells``: the pixel grid ``[..., H, W]``; a cell is one ``(h, w)``, its elements every leading
  index (channels, batch), its place ``(h, w)``;
* ``LabelledCells``: any tensor whose elements carry a cell number (an earlier fork's embedding, its
  elements numbered by the key they feed there); a cell's place is given (that key's centroid in the
  grid). A key that reaches some but not all elements of a cell reaches it *partly*.

Places only guide which keys share a backward pass (``tracer.receptive_fields``), never the result.
"""
from __future__ import annotations

import torch


class GridCells:
    """The cells of a grid ``[..., H, W]``: one per ``(h, w)``, numbered ``h * W + w``."""

    def __init__(self, grid: torch.Tensor):
        height, width = grid.shape[-2:]
        self.count = height * width
        flat = torch.arange(self.count)
        self.places = torch.stack([flat // width, flat % width], 1).double()    # [cells, 2] (row, col)

    def reached(self, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[cells]`` bool: a nonzero gradient in some channel (no cell is ever reached partly)."""
        return (gradient.flatten(0, -3).flatten(1).abs().amax(0) > 0).cpu(), None

    def ratio(self, plain: torch.Tensor, coded: torch.Tensor) -> torch.Tensor:
        """``[cells]`` float64: ``coded / plain`` at the channel where ``|plain|`` is largest."""
        plain, coded = plain.flatten(0, -3).flatten(1), coded.flatten(0, -3).flatten(1)    # [channels, cells]
        largest = plain.abs().argmax(0, keepdim=True)
        return (coded.gather(0, largest) / plain.gather(0, largest)).squeeze(0).double().cpu()


class LabelledCells:
    """Cells made of the elements of a tensor with the same number.

    labels: shaped like the tensor, the cell of each element (-1: none); places: ``[cells, 2]``.
    """

    def __init__(self, labels: torch.Tensor, places: torch.Tensor):
        self.count = len(places)
        self.places = places.double()
        fed = labels.flatten() >= 0
        self.elements = fed.nonzero().flatten().to(labels.device)        # [fed elements] flat indices
        self.cell_of = labels.flatten()[fed]                             # [fed elements] their cells
        # axes along which the labels do not change (channels of a token) are reduced first
        self.constant_axes = tuple(axis for axis in range(labels.dim())
                                   if bool((labels == labels.narrow(axis, 0, 1)).all()))
        reduced = labels.amax(self.constant_axes) if self.constant_axes else labels
        self.reduced_cell = torch.where(reduced >= 0, reduced, self.count).flatten().cpu()   # [columns]
        self.columns = torch.bincount(self.reduced_cell, minlength=self.count + 1)          # [cells + 1]

    def reached(self, gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[cells]`` bool twice: reached (some element's gradient nonzero), and reached only partly."""
        nonzero = gradient != 0
        some = nonzero.any(self.constant_axes) if self.constant_axes else nonzero
        every = nonzero.all(self.constant_axes) if self.constant_axes else nonzero
        size = self.count + 1
        touched = torch.bincount(self.reduced_cell[some.flatten().cpu()], minlength=size)[:self.count]
        whole = torch.bincount(self.reduced_cell[every.flatten().cpu()], minlength=size)[:self.count]
        return touched > 0, (touched > 0) & (whole < self.columns[:self.count])

    def ratio(self, plain: torch.Tensor, coded: torch.Tensor) -> torch.Tensor:
        """``[cells]`` float64: ``coded / plain`` at the element of each cell where ``|plain|`` is largest
        (0 where the cell's gradient is zero)."""
        plain, coded = plain.flatten()[self.elements], coded.flatten()[self.elements]
        size = plain.abs().double().cpu()
        largest = torch.zeros(self.count, dtype=torch.float64).scatter_reduce(0, self.cell_of.cpu(), size, "amax")
        at_largest = (size == largest[self.cell_of.cpu()]) & (size > 0)
        ratio = torch.zeros(self.count, dtype=torch.float64)
        ratio[self.cell_of.cpu()[at_largest]] = (coded / plain).double().cpu()[at_largest]
        return ratio
