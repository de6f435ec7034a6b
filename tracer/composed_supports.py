"""Pixel supports of attention keys, composed through the tokens of an earlier fork.

Where convolutions on the trunk widen receptive fields (DaViT's ``x + dwconv(x)`` in every block), a
later key reaches most of the image, so group testing in the grid cannot beat one backward pass per key,
and each pass runs back through every block and the stem. But the grid reaches a later fork ``F`` only
through the embedding carried at an earlier fork ``I`` (checked on the autograd graph), so

    support(key of F) = ∪ support(token j of I) over the tokens j of I it reaches,

where a token of ``I`` is the set of elements of its embedding feeding one of its keys (``element_keys``)
and that key's pixel support is already known. At ``I`` a key of ``F`` reaches few tokens (a few blocks of
3×3 convolutions), so group testing there (``tracer.receptive_fields`` on ``LabelledCells``) takes few
passes, each ending at ``I``; an or of the tokens' supports (packed bits) then gives the pixel supports. Exact, not approximate:

* the union holds for the elements a key reaches; it holds for whole tokens when the key reaches every
  element of each token it reaches. A key that reaches some token only partly is found in its own
  pixel-level passes instead, as are all keys when their embedding reaches elements of ``I`` that feed
  no key there (no support known), or when the grid reaches ``F`` by another path;
* both sides rest on what the direct passes rest on: a random direction does not cancel exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .receptive_fields import cell_supports, key_supports
from .support_cells import LabelledCells

CANDIDATES = 2   # earlier forks tried as the intermediate, the latest first (older ones are dropped)


@dataclass
class ForkSupports:
    """An earlier fork's embedding and its keys' pixel supports.

    carried: ``[rows, *fork shape]``, the tensor whose row ``row`` is the fork's embedding (a function of
    the grid); element_keys: ``[*fork shape]`` key + 1 per element (0: none); supports: its keys' cells."""
    carried: torch.Tensor
    row: int
    element_keys: torch.Tensor
    supports: PackedSupports


class SupportChain:
    """Pixel supports of the keys of forks in graph order, each composed through a recent fork when the grid
    reaches it only through that fork's embedding, else found by passes to the grid."""

    def __init__(self, grid: torch.Tensor):
        self.grid = grid                      # [..., H, W], a leaf requiring grad
        self.width = grid.shape[-1]
        self.cells = grid.shape[-2] * self.width
        self.recent: list[ForkSupports] = []

    def key_centroids(self, carried: torch.Tensor, row: int, element_keys: torch.Tensor, keys: int
                      ) -> list[tuple[float, float] | None]:
        """(row, col) centroid of the grid cells each key of the embedding ``carried[row]`` depends on
        (``tracer.receptive_fields.key_supports``; None: no cell)."""
        embedding = carried[row]
        supports = None
        for earlier in reversed(self.recent):
            if only_through(embedding, earlier.carried, self.grid):
                supports = self._composed(earlier, embedding, element_keys, keys)
                break
        if supports is None:
            supports = PackedSupports.of(key_supports(self.grid, embedding, element_keys, keys), self.cells)
        self.recent = self.recent[1 - CANDIDATES:] + [ForkSupports(carried, row, element_keys, supports)]
        return supports.centroids(self.width)

    def _composed(self, earlier: ForkSupports, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int
                  ) -> PackedSupports | None:
        """Supports through ``earlier``'s tokens (None when all keys together reach an element of no token or
        a token only partly); keys that alone reach a token partly get passes to the grid."""
        labels = torch.full(earlier.carried.shape, -1, dtype=torch.long, device=earlier.carried.device)
        labels[earlier.row] = earlier.element_keys - 1
        places = torch.tensor([place or (math.nan, math.nan) for place in earlier.supports.centroids(self.width)],
                              dtype=torch.float64).view(-1, 2)
        cells = LabelledCells(labels, places)
        if not _wholly_reached(cells, earlier.carried, embedding, element_keys):
            return None
        tokens, partly = cell_supports(earlier.carried, embedding, element_keys, keys, cells)
        supports = earlier.supports.unions(tokens)
        if partly:
            alone = torch.where(torch.isin(element_keys - 1, torch.tensor(sorted(partly), device=element_keys.device)),
                                element_keys, torch.zeros_like(element_keys))
            direct = PackedSupports.of(key_supports(self.grid, embedding, alone, keys), self.cells)
            supports.bits[sorted(partly)] = direct.bits[sorted(partly)]
        return supports


class PackedSupports:
    """Supports of keys as bits: ``bits`` ``[keys, ⌈cells / 8⌉]`` uint8, cell ``c`` in bit ``c % 8`` of byte
    ``c // 8``."""

    def __init__(self, bits: torch.Tensor, cells: int):
        self.bits, self.cells = bits, cells

    @classmethod
    def of(cls, supports: list[torch.Tensor], cells: int) -> PackedSupports:
        """From per-key flat cell indices."""
        width = (cells + 7) // 8
        lengths = torch.tensor([len(s) for s in supports], dtype=torch.long)
        flat = torch.cat(supports).cpu().long() if supports else torch.zeros(0, dtype=torch.long)
        owner = torch.arange(len(supports)).repeat_interleave(lengths)
        packed = torch.zeros(len(supports) * width, dtype=torch.int32)   # distinct bits: their sum is their or
        packed.index_add_(0, owner * width + flat // 8, (1 << (flat % 8)).int())
        return cls(packed.to(torch.uint8).view(len(supports), width), cells)

    def unions(self, tokens: list[torch.Tensor], chunk: int = 64) -> PackedSupports:
        """Per entry of ``tokens`` (indices of keys here), the union of those keys' supports."""
        lengths = [len(t) for t in tokens]
        longest = max(lengths, default=0)
        nothing = len(self.bits)                                      # index of an empty row
        padded = torch.full((len(tokens), max(longest, 1)), nothing, dtype=torch.long)
        for index, found in enumerate(tokens):
            padded[index, :len(found)] = found.cpu()
        rows = torch.cat([self.bits, self.bits.new_zeros(1, self.bits.shape[1])])
        result = torch.empty(len(tokens), self.bits.shape[1], dtype=torch.uint8)
        for start in range(0, len(tokens), chunk):
            gathered = rows[padded[start:start + chunk]]             # [chunk, longest, bytes]
            while gathered.shape[1] > 1:                             # or over the tokens, halving
                if gathered.shape[1] % 2:
                    gathered = torch.cat([gathered,
                                          gathered.new_zeros(gathered.shape[0], 1, gathered.shape[2])], 1)
                gathered = gathered[:, 0::2] | gathered[:, 1::2]
            result[start:start + chunk] = gathered[:, 0]
        return PackedSupports(result, self.cells)

    def centroids(self, width: int, chunk: int = 256) -> list[tuple[float, float] | None]:
        """(row, col) mean of each key's cells in a grid ``width`` wide (None: no cell); sums of whole numbers
        in float64, so the same numbers as ``mean`` over the cells."""
        flat = torch.arange(self.cells)
        places = torch.stack([flat // width, flat % width, torch.ones_like(flat)], 1).double()   # [cells, 3]
        shifts = torch.arange(8, dtype=torch.uint8)
        sums = []
        for start in range(0, len(self.bits), chunk):
            bits = ((self.bits[start:start + chunk].unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :self.cells]
            sums.append(bits.double() @ places)                         # [chunk, 3]: row sum, col sum, count
        total = torch.cat(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)
        return [(float(r / n), float(c / n)) if n > 0 else None for r, c, n in total.tolist()]


def only_through(output: torch.Tensor, through: torch.Tensor, leaf: torch.Tensor) -> bool:
    """Whether ``output`` depends on ``through`` and reaches ``leaf`` only through it, on the autograd graph
    (a walk from ``output`` that stops at ``through``)."""
    if output.grad_fn is None or through.grad_fn is None:
        return False
    stop = (through.grad_fn, through.output_nr)
    stack, seen, stopped = [output.grad_fn], set(), False
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "variable", None) is leaf:      # AccumulateGrad of the leaf: another path
            return False
        for next_node, number in node.next_functions:
            if next_node is stop[0] and number == stop[1]:
                stopped = True
            elif next_node is not None:
                stack.append(next_node)
    return stopped


def _wholly_reached(cells: LabelledCells, source: torch.Tensor, embedding: torch.Tensor,
                    element_keys: torch.Tensor) -> bool:
    """One pass with every key: its gradient at ``source`` is zero outside the tokens and reaches each token
    it reaches wholly."""
    generator = torch.Generator().manual_seed(2)
    direction = (torch.rand(embedding.shape, generator=generator, dtype=torch.float64, device="cpu") + 0.5
                 ).to(embedding)
    gradient, = torch.autograd.grad(embedding, source, direction * (element_keys > 0), retain_graph=True)
    stray = (gradient.flatten() != 0).sum() > (gradient.flatten()[cells.elements] != 0).sum()
    return not bool(stray) and not bool(cells.reached(gradient)[1].any())
