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
from .carried import Carried, Chunk, ComponentRegistry
from .directions import Directions
from .labels import ComponentLabel
from .propagate import born_label, propagate, with_offsets
from .run_plan import RunPlan

# bytes of adjoints kept at once (all births, one group of directions)
ADJOINT_BYTES = 2 ** 28


def with_check_direction(directions: Directions, width: int, like: torch.Tensor) -> Directions:
    """``directions`` [M, k, D] with one more column, the same random unit direction r in every row."""
    generator = torch.Generator().manual_seed(1234)
    check = torch.randn(width, generator=generator, dtype=torch.float64).to(like)
    check = check / check.norm()
    table = torch.cat([directions.table, check.expand(directions.table.shape[0], 1, width)], dim=1)
    return Directions(table, directions.row_of)


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
        total = components.sum(0)
    check_sum(total.detach(), representation)
    directions = directions.checked(representation[0].numel(), representation)
    labels: list[ComponentLabel] = []
    rows_of: dict[int, torch.Tensor] = {}
    for i in ids:
        own = leaves.leaves[i][2] if i in leaves.leaves else [registry.labels[i]]
        rows_of[i] = directions.rows(own)
        labels.extend(own)
    born = [i for i in ids if i in leaves.leaves]
    needed = sorted({int(r) for i in born for r in rows_of[i].tolist()})
    adjoints = _adjoints(total, [leaves.leaves[i][0] for i in born], directions, needed)
    parts = []
    for k, i in enumerate(ids):
        if i not in leaves.leaves:
            parts.append(directions.project(components[k: k + 1].detach(), [registry.labels[i]]))
            continue
        split, rows = leaves.leaves[i][1], rows_of[i]
        scores = None
        for row in rows.unique().tolist():
            per_row = split.scores(adjoints[(born.index(i), row)])                   # [K, B, k + 1]
            scores = per_row if scores is None else torch.where((rows == row).view(-1, 1, 1).to(per_row.device),
                                                                per_row, scores)
        parts.append(scores)
    return Scored(representation, labels, torch.cat(parts))


def _adjoints(total: torch.Tensor, leaves: list[torch.Tensor], directions: Directions, rows: list[int]
              ) -> dict[tuple[int, int], torch.Tensor]:
    """(leaf index, table row) -> the leaf's adjoint for every direction of that row, [k, *leaf shape]:
    backward passes of several directions at once (``is_grads_batched``), in groups of bounded memory."""
    if not leaves or not rows:
        return {}
    k = directions.count
    per_direction = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    group = max(1, ADJOINT_BYTES // max(1, per_direction * k))                      # table rows per pass
    found: dict[tuple[int, int], torch.Tensor] = {}
    for start in range(0, len(rows), group):
        chosen = rows[start: start + group]
        cotangent = directions.table[chosen].reshape(-1, *total.shape[1:])          # [g·k, *D]
        cotangent = cotangent.unsqueeze(1).expand(-1, *total.shape).to(total.dtype)  # [g·k, B, *D]
        with torch.enable_grad():
            grads = torch.autograd.grad(total, leaves, cotangent, is_grads_batched=True, allow_unused=True,
                                        retain_graph=start + group < len(rows))
        for n, (leaf, grad) in enumerate(zip(leaves, grads)):
            grad = torch.zeros((len(chosen) * k, *leaf.shape), dtype=leaf.dtype, device=leaf.device) \
                if grad is None else grad
            for position, row in enumerate(chosen):  # the leaf is [1, *value]: drop its component axis
                found[(n, row)] = grad[position * k: (position + 1) * k, 0]
    return found


def projecting(directions: Directions, registry: ComponentRegistry) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """For early pooling's gathering: component ids and their values [c, B, *D] -> scores [c, B, k + 1]."""
    def project(ids: list[int], values: torch.Tensor) -> torch.Tensor:
        return directions.project(values, [registry.labels[i] for i in ids])
    return project


def scores_chunks(carried: Carried, project: Callable[[list[int], torch.Tensor], torch.Tensor]) -> Carried:
    """Every chunk of ``carried`` projected."""
    return Carried([Chunk(chunk.ids, project(chunk.ids, chunk.values)) for chunk in carried.chunks])
