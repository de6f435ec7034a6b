"""Scores along directions: ``[C, B, k]`` = ⟨component c of image b, u⟩ without ``[C, B, D]``.

Without early pooling, one components pass at level ``branch`` carries each birth as one component whose
value is an autograd leaf (``BirthLeaves``). Its components at the output are few; one backward pass per
group of directions gives each birth's adjoint G = ∂⟨output, u⟩/∂birth under the frozen linear trunk, and
the finer components' scores are contractions of the birth's split with G (``birth_scores``). The other
components (embedding, constants, biases) are projected at the output.

With early pooling (``pooling``), the pass runs at the requested level and every component is projected
as soon as gathering brings it to the output, so only pieces of ``[c, B, D]`` exist at a time.

A random direction rides along as one more column: its scores must sum to ⟨representation, r⟩, which
checks the whole pull-back on every call.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from tracer.vocabulary import Level

from .birth_scores import BirthScores
from .births import split_birth
from .carried import Carried, ComponentRegistry
from .directions import Directions
from .labels import ComponentLabel
from .propagate import born_label, propagate, with_offsets
from .run_plan import RunPlan

# one batched backward pass takes the directions of table rows while they are at most this many and their
# adjoints (all births) at most this many bytes (the pass's intermediate gradients are several times that)
BATCHED_DIRECTIONS, ADJOINT_BYTES = 16, 2 ** 23


def with_check_direction(directions: Directions, width: int, like: torch.Tensor) -> Directions:
    """``directions`` [M, (B,) k, D] with one more column, the same random unit direction r in every row (and
    for every image)."""
    generator = torch.Generator().manual_seed(1234)
    check = torch.randn(width, generator=generator, dtype=torch.float64).to(like)
    check = check / check.norm()
    table = directions.table
    return Directions(torch.cat([table, check.expand(*table.shape[:-2], 1, width)], dim=-2), directions.row_of)


def check_direction(checked: Directions) -> torch.Tensor:
    """[D] the random unit direction that ``with_check_direction`` added as the last column."""
    return checked.table.reshape(-1, *checked.table.shape[-2:])[0, -1]


def without_check_direction(checked: Directions) -> Directions:
    """The directions ``with_check_direction`` was given."""
    return checked.columns(0, checked.count - 1)


class BirthLeaves:
    """A ``propagate.PassExtension``: every birth (but the image) enters the pass as its one branch-level
    component, the value an autograd leaf; the birth's split at ``level`` is kept (``BirthScores``)."""

    needs_grad = True

    def __init__(self, plan: RunPlan, level: Level):
        self.level = level
        self.births = {node for node in plan.births if node.op != "placeholder"}
        self.leaves: dict[int, tuple[torch.Tensor, BirthScores, list[ComponentLabel]]] = {}  # branch id ->

    def computes(self, node: fx.Node) -> bool:
        return node in self.births

    def step(self, gm, plan: RunPlan, node: fx.Node, real: dict, registry: ComponentRegistry, level: Level,
             positions: list | None, batch_size: int) -> Carried:
        spec = plan.compact.slices.get(node) if plan.compact is not None else None
        birth = plan.births[node]
        born = split_birth(gm, birth, real, Level.BRANCH, spec, batch_size)
        leaves, structure = tree_flatten(born.values)
        floating = [k for k, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        if len(floating) != 1:
            raise NotImplementedError(f"scores along directions: the birth {birth.name} (node {node.name}) has "
                                      f"{len(floating)} floating outputs; decompose it without directions")
        leaf = leaves[floating[0]].detach().clone().requires_grad_(True)
        leaves[floating[0]] = leaf
        split = BirthScores(gm, birth, real, self.level, spec, batch_size)
        labels = [born_label(birth, node, h, t, positions) for h, t in zip(split.heads, split.tokens)]
        component = registry.new(born_label(birth, node, None, None))
        self.leaves[component] = (leaf, split, labels)
        return with_offsets(Carried.single([component], tree_unflatten(leaves, structure)), born.offsets,
                            plan.layer(node), node, registry)

    def after_real(self, node: fx.Node, real: dict) -> None:
        pass

    def park(self, node: fx.Node, carried: Carried, real: dict) -> Carried:
        return carried


@dataclass
class Scored:
    """One batch scored: labels and ``scores`` [C, B, k + 1] (the last column: the check direction)."""

    representation: torch.Tensor
    labels: list[ComponentLabel]
    scores: torch.Tensor


def score_by_adjoints(gm: fx.GraphModule, plan: RunPlan, images: torch.Tensor, level: Level,
                      directions: Directions, positions: dict | None,
                      check_sum: Callable[[torch.Tensor, torch.Tensor], None]) -> Scored:
    """Scores without early pooling (see the module doc). ``check_sum(total, representation)`` checks the
    branch-level components' sum before anything is scored."""
    registry = ComponentRegistry()
    leaves = BirthLeaves(plan, level)
    representation, carried = propagate(gm, plan, images, Level.BRANCH, registry, compact=plan.compact,
                                        positions=positions, parking=leaves)
    with torch.enable_grad():
        ids, components = carried.drain()                                       # [Cb, B, *D], few
    check_sum(components.detach().sum(0), representation)
    directions = directions.checked(representation[0].numel(), representation, representation.shape[0])
    labels: list[ComponentLabel] = []
    rows_of: dict[int, list[int]] = {}
    for i in ids:
        own = leaves.leaves[i][2] if i in leaves.leaves else [registry.labels[i]]
        rows_of[i] = directions.row_list(own)
        labels.extend(own)
    born = [i for i in ids if i in leaves.leaves]
    rows = [sorted(set(rows_of[i])) for i in born]                          # each birth's table rows
    first_row, count = {}, 0                                               # component id -> its first score row
    for i in ids:
        first_row[i], count = count, count + len(rows_of[i])
    scores = components.new_zeros(len(labels), components.shape[1], directions.count)    # [C, B, k]
    for k, i in enumerate(ids):
        if i not in leaves.leaves:
            scores[first_row[i]] = directions.project(components[k: k + 1].detach(), [registry.labels[i]])[0]
    for n, row, first, last, adjoint in _adjoint_passes(components, [ids.index(i) for i in born],
                                                        [leaves.leaves[i][0] for i in born], rows, directions):
        i = born[n]
        needed = None if len(rows[n]) == 1 else [r == row for r in rows_of[i]]
        start = first_row[i]
        scores[start: start + len(rows_of[i]), :, first:last] += leaves.leaves[i][1].scores(adjoint, needed)
    return Scored(representation, labels, scores)


def _adjoint_passes(components: torch.Tensor, positions: list[int], leaves: list[torch.Tensor],
                    rows: list[list[int]], directions: Directions):
    """Yields (birth n, table row, first, last, adjoint [last - first, *leaf value]): the adjoint of birth n's
    leaf for directions ``first:last`` of that row, pass by pass, so that only one pass's adjoints exist.

    Birth n's leaf reaches only its own row ``positions[n]`` of the branch-level ``components`` [Cb, B, *D],
    so one backward pass serves every birth, each with a direction of its own: pass j puts birth n's j-th
    row of the table on its component (as many passes as a birth has rows: one for shared directions), in
    groups of at most ``BATCHED_DIRECTIONS`` directions and ``ADJOINT_BYTES`` of adjoints (``is_grads_batched``).
    Where every birth takes the same row, the pass starts from the components' sum with that row's directions
    (the same adjoints, without a [g, Cb, B, *D] cotangent). Images are independent through the frozen trunk, so with directions per image the cotangent of image b
    carries image b's directions: k directions per image cost k directions, whatever the batch.
    """
    if not leaves:
        return
    k = directions.count
    per_direction = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    size = max(1, min(BATCHED_DIRECTIONS, ADJOINT_BYTES // max(1, per_direction)))    # directions per pass
    passes = [(j, first, min(first + size, k)) for j in range(max(len(r) for r in rows)) for first in range(0, k, size)]
    total = None
    for number, (j, first, last) in enumerate(passes):
        used = {rows[n][j] for n in range(len(rows)) if j < len(rows[n])}
        if len(used) == 1 and all(j < len(r) for r in rows):  # one row for every birth: the sum's cotangent
            if total is None:
                with torch.enable_grad():
                    total = components.sum(0)                                          # [B, *D]
            output = total
            cotangent = _cotangent(directions.row(used.pop()), first, last, components).expand(-1, *total.shape)
        else:
            output = components
            cotangent = components.new_zeros(last - first, *components.shape)       # [g, Cb, B, *D]
            for n, position in enumerate(positions):
                if j < len(rows[n]):
                    cotangent[:, position] = _cotangent(directions.row(rows[n][j]), first, last, components)
        with torch.enable_grad():
            grads = torch.autograd.grad(output, leaves, cotangent, is_grads_batched=True, allow_unused=True,
                                        retain_graph=number + 1 < len(passes))
        del cotangent
        for n, (leaf, grad) in enumerate(zip(leaves, grads)):  # the leaf is [1, *value]: drop its component axis
            if j < len(rows[n]):
                yield n, rows[n][j], first, last, (leaf.new_zeros((last - first, *leaf.shape[1:])) if grad is None
                                                   else grad[:, 0])
        del grads


def _cotangent(directions: torch.Tensor, first: int, last: int, components: torch.Tensor) -> torch.Tensor:
    """Directions ``first`` to ``last`` - 1 of one row, [k, D] (every image) or [B, k, D] (per image), as the
    cotangent of one component of ``components`` [Cb, B, *D]: [g, 1 or B, *D]."""
    chosen = directions[..., first:last, :].to(components.dtype)
    if chosen.dim() == 2:
        return chosen.view(last - first, 1, *components.shape[2:])
    return chosen.transpose(0, 1).reshape(last - first, chosen.shape[0], *components.shape[2:])


class Projection:
    """For early pooling's gathering (``pooling.gathering.OutputProjection``): components' values at the
    output [c, B, *D] -> scores [c, B, k]; ``factor(ids)``: the matrix [D, k] (per image: [B, D, k]) that
    projects all of ``ids`` when they use one table row."""

    def __init__(self, directions: Directions, registry: ComponentRegistry):
        self.directions, self.registry = directions, registry

    def __call__(self, ids: list[int], values: torch.Tensor) -> torch.Tensor:
        return self.directions.project(values, [self.registry.labels[i] for i in ids])

    def factor(self, ids: list[int]) -> torch.Tensor | None:
        rows = set(self.directions.row_list([self.registry.labels[i] for i in ids]))
        return self.directions.row(rows.pop()).transpose(-2, -1) if len(rows) == 1 else None


