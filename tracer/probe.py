"""One real run of the traced graph that records every node's value.

The recorded values answer questions the graph alone cannot: which nodes hold
image-dependent tensors (shape arithmetic such as ``x.shape[0]`` does not), and
how opaque operations behave on tensors of their real shapes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .graph_runner import GraphRunner
from .ops import META_FUNCTIONS, META_METHODS, is_in_place
from .tracing import describe


class ModelRunError(RuntimeError):
    """The traced model failed on the given input."""


def _snapshot(value: Any) -> Any:
    """A copy that later in-place operations cannot change."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


@dataclass
class Probe:
    """Values of every node for one input, and which of them depend on the image."""

    gm: fx.GraphModule
    values: dict[fx.Node, Any]
    data_nodes: set[fx.Node] = field(default_factory=set)
    passthrough: set[fx.Node] = field(default_factory=set)  # ops that returned their input itself

    def is_data(self, node: Any) -> bool:
        return isinstance(node, fx.Node) and node in self.data_nodes

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.data_nodes]


def _carries_image_data(node: fx.Node, value: Any, data_nodes: set[fx.Node]) -> bool:
    if node.op == "placeholder":
        return True
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    if node.target in META_FUNCTIONS or node.target in META_METHODS:
        return False
    has_tensor = isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value))
    return has_tensor and any(n in data_nodes for n in node.all_input_nodes)


def _passes_through(node: fx.Node, live: dict, values: dict) -> bool:
    """The op returned its first argument itself, unchanged (dropout in eval mode, ``contiguous()``,
    a no-op ``.to()``): not a copy, so on any input it does nothing to the values."""
    if node.op not in ("call_function", "call_method") or is_in_place(node) or node.kwargs.get("inplace"):
        return False
    source = node.args[0] if node.args else None
    out = live[node]
    return (isinstance(source, fx.Node) and isinstance(out, torch.Tensor) and live.get(source) is out
            and isinstance(values.get(source), torch.Tensor) and torch.equal(out, values[source]))


class _ProbeRun(GraphRunner):
    """The probe's walk: every value computed as in ``gm(images)`` (the live values, freed after their
    last use) and a snapshot of each kept (later in-place ops cannot change it)."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor):
        super().__init__(gm, images)
        self.snapshots: dict[fx.Node, Any] = {}
        self.data_nodes: set[fx.Node] = set()
        self.passthrough: set[fx.Node] = set()

    def step(self, node: fx.Node) -> None:
        try:
            super().step(node)
        except Exception as error:
            raise ModelRunError(
                f"the model failed on input of shape {tuple(self.images.shape)} at "
                f"{describe(node)}: {type(error).__name__}: {error}") from error
        if _passes_through(node, self.values, self.snapshots):
            self.passthrough.add(node)
        self.snapshots[node] = _snapshot(self.values[node])
        if _carries_image_data(node, self.values[node], self.data_nodes):
            self.data_nodes.add(node)


def run_probe(gm: fx.GraphModule, images: torch.Tensor) -> Probe:
    """Run ``gm`` on ``images`` node by node, keeping a snapshot of every value."""
    run = _ProbeRun(gm, images)
    with torch.no_grad():
        output = run.run()
    node = next(n for n in gm.graph.nodes if n.op == "output")
    run.snapshots[node] = output if isinstance(node.args[0], fx.Node) else None
    return Probe(gm, run.snapshots, run.data_nodes, run.passthrough)
