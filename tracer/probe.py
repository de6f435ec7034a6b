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

from .ops import META_FUNCTIONS, META_METHODS, is_in_place
from .tracing import call_target, describe


class ModelRunError(RuntimeError):
    """The traced model failed on the given input."""


def _snapshot(value: Any) -> Any:
    """A copy that later in-place operations cannot change."""
    return tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


class ValueOverlay(dict):
    """Read-through mapping: the overlay's values first, then ``base`` (node values)."""

    def __init__(self, base: dict, overlay: dict):
        super().__init__(overlay)
        self.base = base

    def __missing__(self, key):
        return self.base[key]

    def get(self, key, default=None):
        return self[key] if key in self or key in self.base else default


class ReplacedCall:
    """A stand-in for ``node`` with other arguments (and optionally another target): the same op
    called differently, e.g. without its bias or with a size replaced."""

    def __init__(self, node: fx.Node, args: tuple, kwargs: dict, target: Any = None):
        self.op, self.name, self.meta = node.op, node.name, node.meta
        self.target = node.target if target is None else target
        self.args, self.kwargs = tuple(args), kwargs
        self.all_input_nodes = node.all_input_nodes


def node_arguments(node: fx.Node, values: dict[fx.Node, Any]) -> tuple[tuple, dict]:
    args = fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    return args, kwargs


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


def run_probe(gm: fx.GraphModule, images: torch.Tensor) -> Probe:
    """Run ``gm`` on ``images`` node by node, keeping a snapshot of every value."""
    values: dict[fx.Node, Any] = {}
    live: dict[fx.Node, Any] = {}
    data_nodes: set[fx.Node] = set()
    passthrough: set[fx.Node] = set()
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                live[node] = images if node is _first_placeholder(gm) else _default_argument(node)
            elif node.op == "get_attr":
                live[node] = _fetch_attr(gm, node.target)
            elif node.op == "output":
                values[node] = live[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                continue
            else:
                args, kwargs = node_arguments(node, live)
                try:
                    live[node] = call_target(node, gm, args, kwargs)
                except Exception as error:
                    raise ModelRunError(
                        f"the model failed on input of shape {tuple(images.shape)} at "
                        f"{describe(node)}: {type(error).__name__}: {error}") from error
                if _passes_through(node, live, values):
                    passthrough.add(node)
            values[node] = _snapshot(live[node])
            if _carries_image_data(node, live[node], data_nodes):
                data_nodes.add(node)
    return Probe(gm, values, data_nodes, passthrough)


def _first_placeholder(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def _default_argument(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
