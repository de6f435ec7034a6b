"""One walk of a traced graph, node by node, for every pass that needs more than ``gm(images)``.

Like ``torch.fx.Interpreter``: a ``GraphRunner`` keeps each node's value in ``values``, computes it in
``step`` (a pass overrides it to do more per node: record a snapshot, carry components, read attention
weights) and frees a value after its last use. The probe, the components pass and the attention maps
are such passes; they differ only in their ``step``.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .node_calls import node_arguments
from .tracing import call_target


def fetch_attribute(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for the target ``"a.b.c"`` of a ``get_attr`` node."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def last_uses(nodes: Iterable[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """node -> the values whose last use (among ``nodes``, in order) is that node."""
    last_user: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for parent in node.all_input_nodes:
            last_user[parent] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_user.items():
        freed.setdefault(user, []).append(value)
    return freed


class GraphRunner:
    """Runs ``gm``'s graph on ``images`` (its first input; other inputs take their defaults).

    ``run(until)`` walks the nodes in order and returns the value of ``until`` (default: the graph's
    output). Subclasses override ``step`` (compute one node) and ``free`` (drop a node's state).
    nodes: the nodes to walk, in graph order (default: all; early pooling's unit tail walks the trunk
    after its start and what that reads).
    """

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor | None, nodes: list[fx.Node] | None = None):
        self.gm, self.images = gm, images
        self.values: dict[fx.Node, Any] = {}
        self.placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        self.nodes = list(gm.graph.nodes) if nodes is None else nodes
        self._frees = last_uses(self.nodes)

    def run(self, until: fx.Node | None = None) -> Any:
        for node in self.nodes:
            if node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: self.values[n])
            self.step(node)
            if node is until or self.finished():
                return self.values.get(node)
            for done in self._frees.get(node, ()):
                self.free(done)
        raise RuntimeError("the graph ended before the node asked for")

    def step(self, node: fx.Node) -> None:
        self.values[node] = self.evaluate(node)

    def finished(self) -> bool:
        """Whether the walk can stop after the current node (a pass that found all it wanted)."""
        return False

    def free(self, node: fx.Node) -> None:
        self.values.pop(node, None)

    def evaluate(self, node: fx.Node) -> Any:
        """``node``'s value from the runner's values of its inputs."""
        if node.op == "placeholder":
            return self.images if node is self.placeholder else (node.args[0] if node.args else None)
        if node.op == "get_attr":
            return fetch_attribute(self.gm, node.target)
        args, kwargs = node_arguments(node, self.values)
        return call_target(node, self.gm, args, kwargs)
