"""Which elements of each carried value can reach the output (docs/design.md §4, Cost).

A class-token model reads one row of the last stream, so every component is
needed at that row only; the whole chain of linear trunk and branch ops can run
on that row. This module finds such pruning from the graph, never from names:

1. ``relevance``: a perturbation ``δ_n`` (zeros, requiring grad) is added to the
   components of every carried node in one linear pass on the probe image; the
   nonzero entries of ``∂⟨output, r⟩/∂δ_n`` (random ``r``) are the elements of
   node ``n`` that reach the output.
2. ``Slice``: the relevant positions along the one axis where they are fewest.
3. ``Compaction``: for each node, whether its op may run on sliced inputs (with
   same-shaped frozen inputs sliced alike, and sizes in reshape-like arguments
   replaced) — checked numerically on the probe values; otherwise the sliced
   inputs are scattered back to full size first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from .node_calls import ReplacedCall, ValueOverlay, node_arguments
from .progress import progress
from .tracing import call_target
from .vocabulary import Vocabulary

# compact a node only when at most this fraction of its axis is relevant
COMPACT_FRACTION = 0.5


@functools.lru_cache(maxsize=4096)
def index_tensor(index: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``index`` as a long tensor on ``device``, made once (a host-to-device copy per call costs
    more than the slicing on a GPU)."""
    return torch.tensor(index, dtype=torch.long, device=device)


@dataclass(frozen=True)
class Slice:
    """Kept positions ``index`` along ``axis`` (of the real value; batch axis included)."""

    axis: int
    index: tuple[int, ...]
    full: int

    def take(self, tensor: torch.Tensor, leading: int = 0) -> torch.Tensor:
        """Slice ``tensor`` (with ``leading`` extra axes in front, e.g. the component axis)."""
        return tensor.index_select(self.axis + leading, index_tensor(self.index, tensor.device))

    def scatter(self, compact: torch.Tensor, leading: int = 0) -> torch.Tensor:
        """Zero-filled full-size tensor holding ``compact`` at the kept positions."""
        shape = list(compact.shape)
        shape[self.axis + leading] = self.full
        full = compact.new_zeros(shape)
        return full.index_copy(self.axis + leading, index_tensor(self.index, compact.device), compact)


def find_slice(mask: torch.Tensor) -> Slice | None:
    """The axis (not the batch axis) with the fewest relevant positions, if few enough."""
    best: Slice | None = None
    if not bool(mask.any()):  # reaches nothing: computed whole (it sums to zero at the output)
        return None
    for axis in range(1, mask.dim()):
        if mask.shape[axis] < 2:
            continue
        other = [d for d in range(mask.dim()) if d != axis]
        along = mask.any(dim=other) if other else mask
        kept = tuple(along.nonzero().flatten().tolist())
        if len(kept) > COMPACT_FRACTION * mask.shape[axis]:
            continue
        if best is None or len(kept) / mask.shape[axis] < len(best.index) / best.full:
            best = Slice(axis, kept, mask.shape[axis])
    return best


class CompactionMode(Vocabulary):
    COMPACT = "compact"   # the op runs on sliced inputs
    EXPAND = "expand"     # sliced inputs are scattered back to full size first


@dataclass
class Compaction:
    """How to run one carried node when some values are sliced.

    output: the node's slice (None: full size)
    mode:   ``COMPACT`` (run on sliced inputs) or ``EXPAND`` (scatter inputs back first)
    sliced_arguments: frozen input nodes sliced like the carried input
    size_positions: leaves of the flattened (args, kwargs) holding the full size to replace
    """

    output: Slice | None
    mode: CompactionMode = CompactionMode.EXPAND
    input_slice: Slice | None = None
    sliced_arguments: tuple[fx.Node, ...] = ()
    size_positions: tuple[int, ...] = ()


@dataclass
class CompactPlan:
    slices: dict[fx.Node, Slice] = field(default_factory=dict)
    nodes: dict[fx.Node, Compaction] = field(default_factory=dict)


def compact_arguments(node: fx.Node, real: dict, compaction: Compaction) -> tuple[dict, Any]:
    """Real values of the frozen inputs, sliced, and ``(args, kwargs)`` with sizes replaced.

    Returns an overlay {node: sliced value} and a stand-in node to call.
    """
    spec = compaction.input_slice
    overlay = {n: spec.take(real[n]) for n in compaction.sliced_arguments}
    if not compaction.size_positions:
        return overlay, node
    leaves, structure = tree_flatten((node.args, dict(node.kwargs)))
    for position in compaction.size_positions:
        leaves[position] = len(spec.index)
    args, kwargs = tree_unflatten(leaves, structure)
    return overlay, ReplacedCall(node, args, kwargs)


def _frozen_candidates(node: fx.Node, real: dict, carrier: fx.Node, spec: Slice) -> tuple[fx.Node, ...]:
    """Frozen tensor inputs with the carrier's shape along and after the sliced axis."""
    reference = real[carrier]
    found = []
    for other in node.all_input_nodes:
        value = real.get(other)
        if other is carrier or not isinstance(value, torch.Tensor) or value.dim() != reference.dim():
            continue
        if value.shape[spec.axis] == spec.full:
            found.append(other)
    return tuple(found)


def plan_compaction(gm: fx.GraphModule, carriers: list[fx.Node], relevance: dict[fx.Node, torch.Tensor],
                    values: dict[fx.Node, Any], births: set[fx.Node]) -> CompactPlan:
    """Slices of the carried nodes and, for each node, a verified way to run it."""
    plan = CompactPlan()
    for node in carriers:
        mask = relevance.get(node)
        if mask is not None:
            spec = find_slice(mask)
            if spec is not None:
                plan.slices[node] = spec
    for node in progress(carriers, "compaction"):
        if node in births:
            continue
        inputs = [n for n in node.all_input_nodes if n in relevance or n in plan.slices]
        input_specs = {plan.slices.get(n) for n in inputs}
        output = plan.slices.get(node)
        if input_specs == {None} and output is None:
            continue
        compaction = Compaction(output)
        if len(input_specs) == 1 and None not in input_specs and len(inputs) >= 1:
            verified = _verify_compact(gm, node, values, inputs, input_specs.pop(), output)
            if verified is not None:
                compaction = verified
        plan.nodes[node] = compaction
    return plan


def _int_value(leaf: Any, values: dict) -> int | None:
    value = values.get(leaf) if isinstance(leaf, fx.Node) else leaf
    return value if type(value) is int else None


def _verify_compact(gm, node, values, inputs, spec: Slice, output: Slice | None) -> Compaction | None:
    """Try running ``node`` on sliced probe values; keep the first variant that matches.

    Variants: sliced inputs only; then also every size argument equal to the full
    length of the sliced axis replaced by the kept length (``reshape(B, N, C)``).
    """
    real_out = values[node]
    if not isinstance(real_out, torch.Tensor):
        return None
    expected = output.take(real_out) if output is not None else real_out
    sliced = _frozen_candidates(node, values, inputs[0], spec) + tuple(inputs)
    leaves, _ = tree_flatten((node.args, dict(node.kwargs)))
    sizes = tuple(i for i, leaf in enumerate(leaves) if _int_value(leaf, values) == spec.full)
    for positions in ((), sizes) if sizes else ((),):
        candidate = Compaction(output, CompactionMode.COMPACT, spec, sliced, positions)
        try:
            overlay, callee = compact_arguments(node, values, candidate)
            args, kwargs = node_arguments(callee, ValueOverlay(values, overlay))
            got = call_target(callee, gm, args, kwargs)
        except Exception:
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
                got, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)):
            return candidate
    return None


