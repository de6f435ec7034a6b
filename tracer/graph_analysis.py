"""Facts about the nodes of one probed graph: op kinds, image-dependent inputs, ancestry, forks,
and which paths are affine (checked numerically for opaque ops).

``tracer.roles`` walks the graph with these facts; they depend on the graph and the probe only.
"""
from __future__ import annotations

import torch.fx as fx

from .affinity import is_affine_in
from .node_calls import ValueOverlay, node_arguments
from .ops import OpKind, op_kind, product_positions
from .probe import Probe
from .tracing import call_target


class GraphAnalysis:
    """Op kinds, data inputs, ancestry and affinity of the nodes of one probed graph."""

    def __init__(self, gm: fx.GraphModule, probe: Probe, cut_nonlinear_trunk: bool = False):
        self.gm, self.probe = gm, probe
        self.cut_nonlinear_trunk = cut_nonlinear_trunk
        self.order = {node: i for i, node in enumerate(gm.graph.nodes)}
        self._kind: dict[fx.Node, OpKind] = {}
        self._ancestors: dict[fx.Node, int] = {}
        self._affine_cache: dict[tuple[fx.Node, tuple[fx.Node, ...]], bool] = {}
        self._path_cache: dict[tuple[fx.Node, fx.Node], bool] = {}
        self._residual_upstream: dict[fx.Node, bool] = {}

    # --- node facts -----------------------------------------------------------
    def kind(self, node: fx.Node) -> OpKind:
        if node not in self._kind:
            self._kind[node] = op_kind(node, self.gm)
        return self._kind[node]

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Image-dependent inputs that the op's value flows from (not shape/index inputs)."""
        kind = self.kind(node)
        if kind in (OpKind.AFFINE, OpKind.NORM):
            first = node.args[0] if node.args else None
            return [first] if self.probe.is_data(first) else []
        return self.probe.data_inputs(node)

    def ancestors(self, node: fx.Node) -> int:
        """Bitset of data nodes ``node`` depends on (itself included), by graph order."""
        if node not in self._ancestors:
            bits = 1 << self.order[node]
            for parent in self.probe.data_inputs(node):
                bits |= self.ancestors(parent)
            self._ancestors[node] = bits
        return self._ancestors[node]

    def fork(self, nodes: list[fx.Node]) -> fx.Node | None:
        """The nearest node every one of ``nodes`` depends on (latest in graph order)."""
        common = self.ancestors(nodes[0])
        for node in nodes[1:]:
            common &= self.ancestors(node)
        if not common:
            return None
        index = common.bit_length() - 1
        return next(n for n, i in self.order.items() if i == index)

    def depends_on(self, node: fx.Node, ancestor: fx.Node) -> bool:
        return bool(self.ancestors(node) >> self.order[ancestor] & 1)

    # --- affinity --------------------------------------------------------------
    def is_affine_in(self, node: fx.Node, inputs: tuple[fx.Node, ...]) -> bool:
        """Numerically: is ``node`` affine in ``inputs`` jointly, other inputs frozen?"""
        key = (node, inputs)
        if key not in self._affine_cache:
            values = self.probe.values

            def evaluate(replacement):
                replaced = dict(zip(inputs, replacement))
                args, kwargs = node_arguments(node, ValueOverlay(values, replaced))
                return call_target(node, self.gm, args, kwargs)

            example = tuple(values[i] for i in inputs)
            self._affine_cache[key] = is_affine_in(evaluate, example)
        return self._affine_cache[key]

    def linear_inputs(self, node: fx.Node) -> list[fx.Node] | None:
        """Data inputs in which the op is linear with everything else frozen.

        ``None`` means the op is nonlinear (or jointly linear is impossible).
        For ADDITIVE ops and jointly-affine opaque ops this is every data input.
        For PRODUCT and ATTENTION ops the caller decides which one to keep.
        """
        kind = self.kind(node)
        inputs = self.data_inputs(node)
        if kind in (OpKind.ADDITIVE, OpKind.AFFINE, OpKind.NORM):
            return inputs
        if kind == OpKind.UNKNOWN:
            if inputs and self.is_affine_in(node, tuple(inputs)):
                return inputs
            return None
        return None

    def affine_path(self, fork: fx.Node, node: fx.Node) -> bool:
        """Whether every path from ``fork`` to ``node`` is affine (norm scales frozen)."""
        if node is fork:
            return True
        key = (fork, node)
        if key in self._path_cache:
            return self._path_cache[key]
        upstream = [n for n in self.data_inputs(node) if self.depends_on(n, fork)]
        kind = self.kind(node)
        if kind in (OpKind.ADDITIVE, OpKind.AFFINE, OpKind.NORM):
            result = all(self.affine_path(fork, n) for n in upstream)
        elif kind == OpKind.PRODUCT:
            positions = product_positions(node)
            result = (len(upstream) == 1 and self._is_linear_position(node, upstream[0], positions)
                      and self.affine_path(fork, upstream[0]))
        elif kind == OpKind.UNKNOWN:
            result = bool(upstream) and self.is_affine_in(node, tuple(upstream)) and all(
                self.affine_path(fork, n) for n in upstream)
        else:
            result = False
        self._path_cache[key] = result
        return result

    def _is_linear_position(self, node: fx.Node, operand: fx.Node, positions: tuple[int, ...] | None) -> bool:
        if positions is None:
            return True
        return any(i < len(node.args) and node.args[i] is operand for i in positions)

    def is_residual_add(self, node: fx.Node) -> bool:
        """Whether ``node`` adds two or more data operands that are not affinely related (a residual add)."""
        if self.kind(node) != OpKind.ADDITIVE:
            return False
        inputs = self.data_inputs(node)
        if len(inputs) < 2:
            return False
        fork = self.fork(inputs)
        return fork is None or not all(self.affine_path(fork, i) for i in inputs)

    def has_residual_upstream(self, node: fx.Node) -> bool:
        """Whether any residual add feeds ``node``."""
        if node not in self._residual_upstream:
            bits = self.ancestors(node)
            self._residual_upstream[node] = any(
                bits >> index & 1 and candidate is not node and self.is_residual_add(candidate)
                for candidate, index in self.order.items())
        return self._residual_upstream[node]
