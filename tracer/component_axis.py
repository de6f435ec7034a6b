"""Shape ops applied to a whole stack of components in one call, without ``vmap``.

Components of a value ``v`` are stacked as ``[C, *v.shape]``. For the ops below, what the op
does to each component follows from its arguments alone: dimension arguments shift by one
(the component axis is in front), the sizes of a reshape get the component count in front,
basic indexing gets a leading full slice, and ``F.linear`` (the last axis) and constant ``F.pad``
(trailing axes) act on any leading shape. ``torch.vmap`` gives the same result for every op, at a fixed cost of a few
hundred microseconds per call, which dominates a decomposition on a GPU.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

_SHIFTED_DIMS = {"transpose": None, "swapaxes": None, "flatten": (0, -1), "unsqueeze": None}
_SIZES = {"reshape", "view"}
_FUNCTIONS = {torch.transpose: "transpose", torch.swapaxes: "swapaxes", torch.flatten: "flatten",
              torch.unsqueeze: "unsqueeze", torch.reshape: "reshape", torch.permute: "permute"}


def _shift(dim: Any) -> int | None:
    return None if not isinstance(dim, int) or isinstance(dim, bool) else dim + 1 if dim >= 0 else dim


def _basic_index(index: Any) -> tuple | None:
    """``index`` as a tuple if it only holds ints, slices, None and Ellipsis (no tensors, no lists)."""
    items = index if isinstance(index, tuple) else (index,)
    basic = all(item is None or item is Ellipsis or isinstance(item, slice)
                or (isinstance(item, int) and not isinstance(item, bool)) for item in items)
    return items if basic else None


def _method_name(op: Any) -> str | None:
    if op.op == "call_method":
        return op.target
    if op.op == "call_function":
        return _FUNCTIONS.get(op.target)
    return None


def with_component_axis(op: Any, args: tuple, kwargs: dict, components: torch.Tensor) -> torch.Tensor | None:
    """``op`` (a graph node or stand-in; ``args[0]`` is ``components`` [C, *shape]) applied to each
    component, in one call; None when the op is not one of the above (the caller uses vmap)."""
    if not args or args[0] is not components or kwargs:
        return None
    rest = args[1:]
    if op.op == "call_function" and op.target is F.linear:
        weight = rest[0] if rest else None
        if len(rest) in (1, 2) and rest[1:] in ((), (None,)) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return F.linear(components, weight)
        return None
    if op.op == "call_function" and op.target is F.pad:  # constant padding of trailing axes (the default mode)
        pad = rest[0] if len(rest) == 1 else None
        fits = isinstance(pad, (tuple, list)) and len(pad) // 2 <= components.dim() - 1
        return F.pad(components, pad) if fits else None
    if op.op == "call_function" and op.target is operator.getitem and len(rest) == 1:
        index = _basic_index(rest[0])
        return None if index is None else components[(slice(None), *index)]
    name = _method_name(op)
    if name in _SHIFTED_DIMS:
        dims = rest or _SHIFTED_DIMS[name] or ()
        if name == "flatten" and len(dims) == 1:
            dims = (dims[0], -1)
        shifted = [_shift(d) for d in dims]
        if not shifted or None in shifted:
            return None
        return getattr(components, name)(*shifted)
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        shifted = [_shift(d) for d in dims]
        return None if None in shifted else components.permute(0, *shifted)
    if name in _SIZES:
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)) else rest
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            return None
        return components.reshape(components.shape[0], *sizes)
    if name == "contiguous" and not rest:
        return components.contiguous()
    return None
