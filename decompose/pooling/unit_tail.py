"""The unit tail: the trunk after the pooling start, run on a small token grid with every
data-dependent per-token scale set to 1 and no biases (see ``decompose.pooling``)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from tracer.graph_runner import GraphRunner
from tracer.linear_rules import (
    Evaluator,
    additive_sign,
    batch_norm_scale,
    bias_free_call,
    has_bias_argument,
    is_binary_additive,
    norm_argument,
)
from tracer.node_calls import ReplacedCall, ValueOverlay
from tracer.ops import OpKind, op_kind
from tracer.roles import Role, TrunkPlan
from tracer.tracing import describe

_SCALING_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
                     "mul", "mul_", "div", "div_"}


class TailUnavailable(Exception):
    """The unit tail cannot be run: an op on the trunk is not a per-token scaling of a linear map."""


# how a unit tail fails on a grid its ops do not accept (shape errors from the graph's own code)
TAIL_FAILURES = (TailUnavailable, RuntimeError, ValueError, IndexError, TypeError)


class _Values(dict):
    """Node values while the unit tail runs: row 0 (the zero row) of a tail node's stack, or the
    value of a non-data node; reading any other data node is refused."""

    def __init__(self, stacks: dict):
        super().__init__()
        self.stacks = stacks

    def __missing__(self, node):
        if node in self.stacks:
            return self.stacks[node][0]
        raise TailUnavailable(f"{describe(node)} is read by the trunk after the pooling start but is not on it")


@dataclass
class _Stack:
    """Rows ``[1 + Σ counts, *shape]`` of one tail node: the zero row, then each injection's rows."""

    rows: torch.Tensor
    segments: tuple[tuple[fx.Node, int], ...]


class UnitTail:
    """The trunk from ``start`` to the decomposed node, with unit per-token scales and no biases.

    ``run`` pushes rows injected at tail nodes to the decomposed node, on any token grid the
    graph's own shape arithmetic accepts (sizes are read from the rows' zero row).
    """

    def __init__(self, gm: fx.GraphModule, plan: TrunkPlan, data_nodes: set[fx.Node], start: fx.Node):
        self.gm, self.start, self.target = gm, start, plan.target
        self.data_nodes = data_nodes
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        tail = {start}
        for node in gm.graph.nodes:
            if order[node] > order[start] and (plan.roles.get(node) is Role.TRUNK or node is plan.target) and any(
                    parent in tail for parent in node.all_input_nodes):
                tail.add(node)
        if plan.target not in tail:
            raise TailUnavailable(f"the decomposed node does not depend on {describe(start)} through the trunk")
        needed: set[fx.Node] = set()
        frontier = list(tail)
        while frontier:  # shape arithmetic and constants the tail reads
            for parent in frontier.pop().all_input_nodes:
                if parent not in tail and parent not in needed and parent not in data_nodes:
                    needed.add(parent)
                    frontier.append(parent)
        self.tail = tail
        self.nodes = [n for n in gm.graph.nodes if n in tail or n in needed]
        self.position = {node: order[node] for node in self.nodes}

    def run(self, start_shape: tuple[int, ...], injections: dict[fx.Node, torch.Tensor] | None = None, *,
            dtype: torch.dtype, device: torch.device | str,
            shapes: dict | None = None, taps: dict | None = None) -> dict[fx.Node, torch.Tensor]:
        """Rows injected at tail nodes (``{node: [rows, *shape at node]}``) pushed to the decomposed
        node: ``{node: [rows, *output shape]}``. ``start_shape``: the start node's value shape on
        the grid to use. ``shapes``, if given, receives every tail node's value shape. ``taps``
        (keys: tail nodes): each gets a zero tensor that requires grad added to all rows there, so
        that a backward pass from the output gives every row's adjoint at those nodes."""
        run = _TailRun(self, start_shape, injections or {}, dtype, device, shapes, taps)
        run.run(until=self.target)
        stacks = run.stacks
        out = stacks[self.target]
        result, row = {}, 1
        for node, count in out.segments:
            result[node] = out.rows[row: row + count]
            row += count
        return result

    # --- the unit rules ------------------------------------------------------------------
    def _apply(self, node: fx.Node, stacks: dict[fx.Node, _Stack], values: _Values) -> _Stack:
        kind = op_kind(node, self.gm)
        carriers = [n for n in node.all_input_nodes if n in self.tail]
        frozen = [n for n in node.all_input_nodes if n in self.data_nodes and n not in self.tail]
        if kind == OpKind.ADDITIVE and is_binary_additive(node):
            parts = [(additive_sign(node, position), stacks[operand])
                     for position, operand in enumerate(node.args[:2]) if isinstance(operand, fx.Node)
                     and operand in self.tail]
            return self._signed_sum(parts)
        if kind == OpKind.ADDITIVE:  # cat / stack: constant pieces are zero in the linear part
            if frozen:
                raise TailUnavailable(f"{describe(node)} joins trunk values with other data")
            aligned = self._aligned([stacks[n] for n in carriers])
            pieces = _constant_pieces(node, self.tail)
            overlay = ValueOverlay(values, {p: torch.zeros_like(values[p]) for p in pieces})
            rows = Evaluator(self.gm, node, overlay).over_components(
                {n: s.rows for n, s in zip(carriers, aligned)})
            return _Stack(rows, aligned[0].segments)
        if len(carriers) != 1:
            raise TailUnavailable(f"{describe(node)} has {len(carriers)} trunk inputs")
        carrier = carriers[0]
        stack = stacks[carrier]
        if kind == OpKind.NORM:
            return _Stack(unit_norm(node, values, stack.rows), stack.segments)
        if kind == OpKind.PRODUCT and has_bias_argument(node, carrier):
            stripped, _ = bias_free_call(node)
            return _Stack(Evaluator(self.gm, stripped, values).over_components({carrier: stack.rows}),
                          stack.segments)
        if kind == OpKind.PRODUCT and frozen:
            if node.target in _SCALING_PRODUCTS and (_is_multiplication(node) or _is_first_argument(node, carrier)):
                return stack  # a frozen per-token scale: 1 on the small grid (γ holds the real one)
            raise TailUnavailable(f"{describe(node)} multiplies the trunk by frozen data")
        if kind in (OpKind.AFFINE, OpKind.PRODUCT, OpKind.UNKNOWN):
            if frozen:
                raise TailUnavailable(f"{describe(node)} reads other data besides the trunk")
            call = _zero_padding(node) if node.target is F.pad else node
            rows = Evaluator(self.gm, call, values).over_components({carrier: stack.rows})
            if not isinstance(rows, torch.Tensor):
                raise TailUnavailable(f"{describe(node)} returns {type(rows).__name__} on the trunk")
            if kind == OpKind.UNKNOWN:  # its value at zero (zero or not: no read-back) is a constant component
                rows = rows - rows[:1]
            return _Stack(rows, stack.segments)
        raise TailUnavailable(f"{describe(node)} ({kind.value}) is not a per-token scaling of a linear map")

    def _signed_sum(self, parts: list[tuple[float, _Stack]]) -> _Stack:
        if not parts:
            raise TailUnavailable("an addition reads the trunk outside its first two arguments")
        aligned = self._aligned([stack for _, stack in parts])
        rows = None
        for (sign, _), stack in zip(parts, aligned):
            term = stack.rows if sign == 1.0 else stack.rows * sign
            rows = term if rows is None else rows + term
        return _Stack(rows, aligned[0].segments)

    def _aligned(self, stacks: list[_Stack]) -> list[_Stack]:
        """The same rows in every stack (zero rows for injections only some of them carry)."""
        if all(stack.segments == stacks[0].segments for stack in stacks):
            return stacks
        counts = dict(segment for stack in stacks for segment in stack.segments)
        union = tuple(sorted(counts.items(), key=lambda item: self.position[item[0]]))
        start, row = {}, 1
        for node, count in union:
            start[node] = row
            row += count
        out = []
        for stack in stacks:
            rows = stack.rows.new_zeros((row, *stack.rows.shape[1:]))
            source = 1
            for node, count in stack.segments:
                rows[start[node]: start[node] + count] = stack.rows[source: source + count]
                source += count
            out.append(_Stack(rows, union))
        return out


class _TailRun(GraphRunner):
    """One ``UnitTail.run``: rows ``[1 + injected, *shape]`` per tail node (row 0: the zero row), the
    values of the shape arithmetic and constants the tail reads."""

    def __init__(self, tail: UnitTail, start_shape: tuple[int, ...], injections: dict, dtype: torch.dtype,
                 device: torch.device | str, shapes: dict | None, taps: dict | None):
        super().__init__(tail.gm, None, tail.nodes)
        self.tail, self.start_shape, self.injections = tail, start_shape, injections
        self.dtype, self.device, self.shapes, self.taps = dtype, device, shapes, taps
        self.stacks: dict[fx.Node, _Stack] = {}
        self.values = _Values({})

    def step(self, node: fx.Node) -> None:
        tail, stacks, values = self.tail, self.stacks, self.values
        if node is tail.start:
            stacks[node] = _Stack(torch.zeros((1, *self.start_shape), dtype=self.dtype, device=self.device), ())
        elif node in tail.tail:
            stacks[node] = tail._apply(node, stacks, values)
        else:  # shape arithmetic and constants the tail reads
            values[node] = self.evaluate(node)
        if node not in stacks:
            return
        values.stacks[node] = stacks[node].rows
        if self.shapes is not None:
            self.shapes[node] = tuple(stacks[node].rows.shape[1:])
        if node in self.injections:
            added = self.injections[node]
            stack = stacks[node]
            stacks[node] = _Stack(torch.cat([stack.rows, added.to(stack.rows.dtype)]),
                                  stack.segments + ((node, added.shape[0]),))
            values.stacks[node] = stacks[node].rows
        if self.taps is not None and node in self.taps:
            self.taps[node] = torch.zeros_like(stacks[node].rows, requires_grad=True)
            stacks[node] = _Stack(stacks[node].rows + self.taps[node], stacks[node].segments)
            values.stacks[node] = stacks[node].rows

    def free(self, node: fx.Node) -> None:
        if node is not self.tail.target:
            self.stacks.pop(node, None)
            self.values.stacks.pop(node, None)
            self.values.pop(node, None)


def _is_multiplication(node: fx.Node) -> bool:
    return node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _is_first_argument(node: fx.Node, carrier: fx.Node) -> bool:
    return bool(node.args) and node.args[0] is carrier


def _constant_pieces(node: fx.Node, tail: set[fx.Node]) -> list[fx.Node]:
    pieces = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else node.args
    return [p for p in pieces if isinstance(p, fx.Node) and p not in tail]


def _zero_padding(node: fx.Node) -> ReplacedCall:
    """``F.pad`` whose linear part pads with zeros (a constant fill is an offset)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = 0.0
    elif "value" in kwargs:
        kwargs["value"] = 0.0
    return ReplacedCall(node, tuple(args), kwargs)


def unit_norm(node: fx.Node, values: dict, rows: torch.Tensor) -> torch.Tensor:
    """A norm with its data-dependent scale set to 1: centring and weight remain."""
    if node.target is F.layer_norm:
        dims = tuple(range(-len(tuple(norm_argument(node, values, "normalized_shape"))), 0))
        out = rows - rows.mean(dims, keepdim=True)
        weight = norm_argument(node, values, "weight")
        return out * weight if weight is not None else out
    if node.target is F.rms_norm:
        weight = norm_argument(node, values, "weight")
        return rows * weight if weight is not None else rows
    if node.target is F.batch_norm:  # running statistics: a fixed per-channel scale, kept
        x = norm_argument(node, values, "input")
        return rows * batch_norm_scale(node, values).reshape((-1,) + (1,) * (x.dim() - 2))
    if node.target is F.normalize:
        return rows
    raise TailUnavailable(f"{describe(node)}: its frozen scale is not one number per token")
