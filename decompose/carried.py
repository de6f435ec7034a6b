"""Components as they travel through the pass: chunks of rows with component ids.

A node's components are a ``Carried``: a list of ``Chunk``s, each ``[len(ids), *value shape]``, whose
rows summed over all chunks are the node's value. A residual add concatenates the two lists instead of
copying every earlier component; rows of the same ids add up (``merge_sum``). ``ComponentRegistry``
hands out the ids and keeps each component's label.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .labels import ComponentLabel


@dataclass
class Chunk:
    """Components ``ids`` with values ``[len(ids), *shape]`` (or a tuple of such, e.g. MHA's output)."""

    ids: list[int]
    values: Any


@dataclass
class Carried:
    """Components of one node's value, kept as chunks so that a residual add concatenates
    lists instead of copying every earlier component (the sum over all chunks' rows is the value)."""

    chunks: list[Chunk]

    @classmethod
    def single(cls, ids: list[int], values: Any) -> Carried:
        return cls([Chunk(list(ids), values)])

    @property
    def ids(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk.ids]

    def map(self, transform: Callable[[Any], Any]) -> Carried:
        return Carried([Chunk(chunk.ids, transform(chunk.values)) for chunk in self.chunks])

    def stacked(self) -> torch.Tensor:
        """All components as one tensor ``[C, *shape]`` in ``ids`` order."""
        values = [chunk.values for chunk in self.chunks]
        return values[0] if len(values) == 1 else torch.cat([v.expand(len(c.ids), *values[0].shape[1:])
                                                             for v, c in zip(values, self.chunks)])

    def drain(self) -> tuple[list[int], torch.Tensor]:
        """(each id once, in increasing order; its rows summed over all chunks, ``[C, *shape]``),
        releasing each chunk once copied (peak: result + one chunk, no reordering copy); empties self.

        One component may sit in several chunks (early pooling takes a component that reached several
        pooled nodes to the output from each of them): its rows add up, as everywhere in ``Carried``."""
        ids = self.ids
        ordered = sorted(set(ids))
        if len(self.chunks) == 1 and ids == ordered:
            return ids, self.chunks.pop().values
        repeated = len(ordered) != len(ids)
        rank = {i: k for k, i in enumerate(ordered)}
        first = self.chunks[0].values
        shape = (len(ordered),) + tuple(first.shape[1:])
        out = first.new_zeros(shape) if repeated else first.new_empty(shape)  # every row written once
        while self.chunks:
            chunk = self.chunks.pop(0)
            rows = [rank[i] for i in chunk.ids]
            values = chunk.values.expand(len(rows), *out.shape[1:])
            if repeated:
                out.index_add_(0, torch.tensor(rows, device=out.device), values)
            elif rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive ids: one slice
                out[rows[0]: rows[0] + len(rows)] = values
            else:
                out[torch.tensor(rows, device=out.device)] = values
        return ordered, out


def is_probe(chunk: Chunk) -> bool:
    """A probe chunk: one negative id, chosen by the pass extension that made it (``pooling.Parking``'s
    adjoint probe); never a component. Probes with the same id add up like components; they are never
    stacked with components (they alone need grad)."""
    return len(chunk.ids) == 1 and chunk.ids[0] < 0


def split_probes(carried: Carried) -> tuple[list[Chunk], list[Chunk]]:
    """(the probe chunks; the components' chunks) of ``carried``."""
    return [c for c in carried.chunks if is_probe(c)], [c for c in carried.chunks if not is_probe(c)]


class ComponentRegistry:
    """Labels of all components created in a run; ids are positions in ``labels``."""

    def __init__(self):
        self.labels: list[ComponentLabel] = []
        self._keys: set[str] = set()

    def new(self, label: ComponentLabel) -> int:
        if label.key in self._keys:  # same module path twice: disambiguate by node
            label = dataclasses.replace(label, name=f"{label.name}@{label.node}")
        self._keys.add(label.key)
        self.labels.append(label)
        return len(self.labels) - 1

    def new_many(self, labels: list[ComponentLabel]) -> list[int]:
        """``[new(label) for label in labels]``, in one step when no key repeats (token level: tens of
        thousands of labels per pass)."""
        keys = [label.key for label in labels]
        if len(set(keys)) != len(keys) or not self._keys.isdisjoint(keys):
            return [self.new(label) for label in labels]
        start = len(self.labels)
        self._keys.update(keys)
        self.labels.extend(labels)
        return list(range(start, len(self.labels)))


MAX_CHUNKS = 512
# before an op, many chunks holding few elements in all are stacked into one (one call instead of many)
STACK_CHUNKS, STACK_ELEMENTS = 8, 2**22


def few_chunks(carried: Carried) -> Carried:
    """``carried`` with its chunks stacked into one when they are many but small (the constants and
    head rows that reach a CLS model's final norm); probe chunks stay apart."""
    if len(carried.chunks) <= STACK_CHUNKS or not all(isinstance(c.values, torch.Tensor) for c in carried.chunks):
        return carried
    probe, rest = split_probes(carried)
    shape = rest[0].values.shape[1:]
    if sum(len(c.ids) for c in rest) * shape.numel() > STACK_ELEMENTS:
        return carried
    rest = Carried(rest)
    return Carried(probe + [Chunk(rest.ids, rest.stacked())])


def consolidated(carried: Carried) -> Carried:
    """Bound the number of chunks (each op runs once per chunk) with an occasional copy (probe chunks
    stay apart: they alone need grad)."""
    if len(carried.chunks) <= MAX_CHUNKS or not all(isinstance(c.values, torch.Tensor) for c in carried.chunks):
        return carried
    probe, rest = split_probes(carried)
    rest = Carried(rest)
    return Carried([Chunk(rest.ids, rest.stacked())] + probe)


def is_floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def leafwise(transform: Callable, *values: Any) -> Any:
    """Apply ``transform`` to aligned floating leaves; other leaves (sizes, None) from the first."""
    flat = [tree_flatten(v)[0] for v in values]
    leaves, structure = tree_flatten(values[0])
    out = [transform(*(f[i] for f in flat)) if is_floating(leaf) else leaf for i, leaf in enumerate(leaves)]
    return tree_unflatten(out, structure)


def unsqueezed(value: Any) -> Any:
    return leafwise(lambda leaf: leaf.unsqueeze(0), value)


def merge_sum(a: Carried, b: Carried, sign: float) -> Carried:
    """``a + sign * b`` row-aligned by component id.

    Disjoint components (a residual add, a new constant) just join the chunk list; chunks
    holding the same ids (two slices of one value added together) add up. Rows are broadcast
    to the common shape (``x + pos_embed``), leaf by leaf for tuple-valued ops.
    """
    everything = a.chunks + b.chunks
    if not everything:  # both operands computed elsewhere (see pooling.Parking)
        return Carried([])
    if all(isinstance(c.values, torch.Tensor) for c in everything):  # the common case, without pytrees
        shape = torch.broadcast_shapes(*{c.values.shape[1:] for c in everything})
        common = [shape]

        def broadcast(values: Any) -> Any:
            return values if values.shape[1:] == shape else values.expand(values.shape[0], *shape)
    else:
        shapes = [tree_flatten(c.values)[0] for c in everything]
        common = [torch.broadcast_shapes(*(leaves[i].shape[1:] for leaves in shapes)) if is_floating(leaf)
                  else None for i, leaf in enumerate(shapes[0])]

        def broadcast(values: Any) -> Any:
            leaves, structure = tree_flatten(values)
            return tree_unflatten([leaf.expand(leaf.shape[0], *common[i]) if is_floating(leaf) else leaf
                                   for i, leaf in enumerate(leaves)], structure)

    chunks = [Chunk(c.ids, broadcast(c.values)) for c in a.chunks]
    a_ids = set(a.ids)
    for chunk in b.chunks:
        values = broadcast(chunk.values if sign == 1.0 else leafwise(lambda leaf: leaf * sign, chunk.values))
        if a_ids.isdisjoint(chunk.ids):
            chunks.append(Chunk(chunk.ids, values))
            continue
        same = next((k for k, c in enumerate(chunks) if c.ids == chunk.ids), None)
        if same is None:
            return _merge_by_index(a, b, sign, common[0])
        chunks[same] = Chunk(chunk.ids, leafwise(torch.add, chunks[same].values, values))
    return Carried(chunks)


def _merge_by_index(a: Carried, b: Carried, sign: float, shape) -> Carried:
    """General row alignment (partially overlapping id sets): one dense chunk, and probe chunks apart
    (they alone need grad: inside the dense chunk, each backward pass from one would cost every row's ops)."""
    if not all(isinstance(c.values, torch.Tensor) for c in a.chunks + b.chunks):
        raise NotImplementedError("partially overlapping components of a tuple-valued op")
    (a_probe, a_rest), (b_probe, b_rest) = split_probes(a), split_probes(b)
    probes: dict[int, torch.Tensor] = {}  # probes of one id add up
    for chunk, factor in [(c, 1.0) for c in a_probe] + [(c, sign) for c in b_probe]:
        value = factor * chunk.values.expand(1, *shape)
        probes[chunk.ids[0]] = value if chunk.ids[0] not in probes else probes[chunk.ids[0]] + value
    a, b = Carried(a_rest), Carried(b_rest)
    ids = a.ids + [i for i in b.ids if i not in set(a.ids)]
    position = {i: k for k, i in enumerate(ids)}
    out = (a.chunks + b.chunks)[0].values.new_zeros((len(ids),) + tuple(shape))
    for carried, factor in ((a, 1.0), (b, sign)):
        for chunk in carried.chunks:
            out[[position[i] for i in chunk.ids]] += factor * chunk.values.expand(len(chunk.ids), *shape)
    return Carried([Chunk([i], value) for i, value in probes.items()] + [Chunk(ids, out)])
