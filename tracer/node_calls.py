"""Calling one graph node's op on values other than its own: with some inputs replaced, other
arguments, or another target (the building blocks of every rule that re-evaluates an op)."""
from __future__ import annotations

from typing import Any

import torch.fx as fx


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
