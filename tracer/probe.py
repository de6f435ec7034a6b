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
from torch.utils._pytree import tree_flatten, tree_map

from .graph_runner import GraphRunner
from .ops import META_FUNCTIONS, META_METHODS, is_in_place
from .tracing import describe


class ModelRunError(RuntimeError):
    """The traced model failed on the given input."""


def _snapshot(value: Any) -> Any:
    """A copy that later in-place operations cannot change."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _versions(value: Any) -> list[int]:
    return [v._version for v in _tensors(value)]


def _may_write(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into its first argument: an in-place op, ``inplace=True``, or a module
    built with ``inplace=True`` (``nn.ReLU(inplace=True)``)."""
    if is_in_place(node) or node.kwargs.get("inplace"):
        return True
    return node.op == "call_module" and bool(getattr(gm.get_submodule(node.target), "inplace", False))


@dataclass
class Probe:
    """Values of every node for one input, and which of them depend on the image."""

    gm: fx.GraphModule
    values: dict[fx.Node, Any]
    data_nodes: set[fx.Node] = field(default_factory=set)
    passthrough: set[fx.Node] = field(default_factory=set)  # ops that returned their input itself
    copied_all: bool = False  # a write that no op announced made the probe copy every value

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
    last use) and each kept as it was computed.

    Values are kept by reference (views of one storage cost nothing more), and copied just before an op
    that may write into their storage runs (copy on write). ``clone_all`` copies every value instead; the
    probe falls back to it when a tensor's version counter shows a write that no op announced.
    """

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, clone_all: bool = False):
        super().__init__(gm, images)
        self.clone_all = clone_all
        self.snapshots: dict[fx.Node, Any] = {}
        self.versions: dict[fx.Node, list[int]] = {}
        self.by_storage: dict[int, set[fx.Node]] = {}   # storage address -> nodes kept by reference on it
        self.data_nodes: set[fx.Node] = set()
        self.passthrough: set[fx.Node] = set()

    def unchanged(self) -> bool:
        """Whether no value kept by reference was written to after it was kept."""
        return all(_versions(self.snapshots[node]) == versions for node, versions in self.versions.items())

    def _copy_before_write(self, node: fx.Node) -> None:
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not _may_write(node, self.gm):
            return
        for tensor in _tensors(self.values.get(target)):
            for kept in self.by_storage.pop(tensor.untyped_storage().data_ptr(), ()):
                if kept in self.versions:
                    self.snapshots[kept] = _snapshot(self.snapshots[kept])
                    del self.versions[kept]

    def _keep(self, node: fx.Node, value: Any) -> None:
        if self.clone_all:
            self.snapshots[node] = _snapshot(value)
            return
        self.snapshots[node] = value
        self.versions[node] = _versions(value)
        for tensor in _tensors(value):
            self.by_storage.setdefault(tensor.untyped_storage().data_ptr(), set()).add(node)

    def step(self, node: fx.Node) -> None:
        if not self.clone_all:
            self._copy_before_write(node)
        try:
            super().step(node)
        except Exception as error:
            raise ModelRunError(
                f"the model failed on input of shape {tuple(self.images.shape)} at "
                f"{describe(node)}: {type(error).__name__}: {error}") from error
        if _passes_through(node, self.values, self.snapshots):
            self.passthrough.add(node)
        self._keep(node, self.values[node])
        if _carries_image_data(node, self.values[node], self.data_nodes):
            self.data_nodes.add(node)


def run_probe(gm: fx.GraphModule, images: torch.Tensor) -> Probe:
    """Run ``gm`` on ``images`` node by node, keeping every value as it was computed."""
    run = _ProbeRun(gm, images)
    with torch.no_grad():
        output = run.run()
    if not run.unchanged():                      # a write no op announced: copy every value instead
        run = _ProbeRun(gm, images, clone_all=True)
        with torch.no_grad():
            output = run.run()
    node = next(n for n in gm.graph.nodes if n.op == "output")
    run.snapshots[node] = output if isinstance(node.args[0], fx.Node) else None
    return Probe(gm, run.snapshots, run.data_nodes, run.passthrough, run.clone_all)
