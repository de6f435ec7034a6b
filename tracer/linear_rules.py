"""Linearization rules: apply one graph op to a stack of components.

Components of a value ``v`` are a tensor ``[C, *v.shape]`` whose sum over the
first axis is ``v``. An op that is affine in ``v`` (given frozen scalars) maps
them to ``[C, *out.shape]`` plus constant offsets (biases) that become
components of their own. The rules:

* ``F.linear`` / convolutions: called without bias; the bias is an offset.
* norms: divide by the *real* per-token scale (biased variance, the op's eps);
  each component is centred by its own mean; the norm's bias is an offset.
* fused attention on the trunk: weights frozen at their real values.
* everything else affine (reshapes, pooling, slicing, opaque affine leaves):
  ``vmap`` of the op over the component axis, minus its value at zero.
"""
from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .attention import (
    mha_arguments,
    mha_output_projection,
    mha_parts,
    mha_value_heads,
    sdpa_arguments,
    sdpa_values,
    sdpa_weights,
)
from .component_axis import with_component_axis
from .node_calls import ReplacedCall, ValueOverlay, node_arguments
from .ops import IN_PLACE_FUNCTIONS, META_FUNCTIONS, META_METHODS, OpKind, is_in_place, is_subtraction
from .recording import structural
from .tracing import MODEL_PREFIX, call_target, module_path
from .vocabulary import ComponentKind


@dataclass
class Offset:
    """A constant term produced by an affine op (bias, shift), shaped like its output."""

    value: torch.Tensor
    name: str
    kind: ComponentKind = ComponentKind.BIAS


def parameter_name(node: Any, carriers: dict | None = None) -> str | None:
    """``blocks.0.attn.proj.bias`` for a get_attr node (or a node computed from get_attr nodes)."""
    if not isinstance(node, fx.Node):
        return None
    sources, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            sources.append(str(current.target).removeprefix(MODEL_PREFIX))
        if current.target in META_FUNCTIONS or current.target in META_METHODS:
            continue  # x.shape, x.size(): sizes, not values
        stack.extend(current.all_input_nodes)
    return "+".join(sorted(sources)) if sources else None


class Evaluator:
    """Calls a node's op with some inputs replaced (real values for the rest)."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, real: dict):
        self.gm, self.node, self.real = gm, node, real

    def __call__(self, replaced: dict[fx.Node, Any]) -> Any:
        args, kwargs = node_arguments(self.node, ValueOverlay(self.real, replaced))
        return call_target(_out_of_place(self.node), self.gm, args, kwargs)

    def over_components(self, carriers: dict[fx.Node, Any]) -> Any:
        """The op applied to each component: vmap over axis 0 of every carried input.

        Outputs may be pytrees (``(x, (h, w))``): floating tensors get the component axis,
        other leaves (sizes) are taken from one call.
        """
        nodes = list(carriers)
        if len(nodes) == 1 and isinstance(carriers[nodes[0]], torch.Tensor):  # shape ops: no vmap needed
            components = carriers[nodes[0]]
            args, kwargs = node_arguments(self.node, ValueOverlay(self.real, {nodes[0]: components}))
            out = with_component_axis(self.node, args, kwargs, components)
            if out is not None:
                return out
        try:  # the common case: tensor (or tuple of tensors) out, an op with a batching rule
            with warnings.catch_warnings():  # "no batching rule ... performance drop": still exact
                warnings.filterwarnings("ignore", message="There is a performance drop")
                return torch.vmap(lambda *components: self(dict(zip(nodes, components))))(*carriers.values())
        except Exception:
            pass
        template = self({n: _index(c, 0) for n, c in carriers.items()})
        leaves, structure = tree_flatten(template)
        floating = [i for i, leaf in enumerate(leaves) if _is_floating(leaf)]

        def per_component(*components):
            out = tree_flatten(self(dict(zip(nodes, components))))[0]
            return tuple(out[i] for i in floating)

        try:
            stacked = torch.vmap(per_component)(*carriers.values())
        except Exception:  # ops without a batching rule: loop (slow but exact)
            count = _count(next(iter(carriers.values())))
            rows = [per_component(*(_index(c, i) for c in carriers.values())) for i in range(count)]
            stacked = tuple(torch.stack([row[k] for row in rows]) for k in range(len(floating)))
        if isinstance(template, torch.Tensor):
            return stacked[0]
        for k, i in enumerate(floating):
            leaves[i] = stacked[k]
        return tree_unflatten(leaves, structure)


def _is_floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _out_of_place(node):
    """In-place ops must not write into component tensors shared with other nodes."""
    if not is_in_place(node):
        return node
    target = node.target[:-1] if node.op == "call_method" else IN_PLACE_FUNCTIONS[node.target]
    return ReplacedCall(node, node.args, node.kwargs, target=target)


def _count(components: Any) -> int:
    return next(leaf.shape[0] for leaf in tree_flatten(components)[0] if _is_floating(leaf))


def _index(components: Any, i: int) -> Any:
    """Component ``i`` of a pytree of component stacks (non-float leaves are shared)."""
    return tree_map(lambda leaf: leaf[i] if _is_floating(leaf) else leaf, components)


def _is_zero(value: Any) -> bool:
    return all(not bool(leaf.any()) for leaf in tree_flatten(value)[0] if _is_floating(leaf))


def _zeros_like(value: Any) -> Any:
    return tree_map(lambda leaf: torch.zeros_like(leaf) if _is_floating(leaf) else leaf, value)


# --- single-carrier rules ------------------------------------------------------------

def apply_affine(gm: fx.GraphModule, node: fx.Node, kind: OpKind, real: dict,
                 carrier: fx.Node, components: Any) -> tuple[Any, list[Offset]]:
    """``node`` applied to ``components`` of its single linear input ``carrier``."""
    evaluate = Evaluator(gm, node, real)
    if has_bias_argument(node, carrier):
        return _without_bias(evaluate, node, real, carrier, components)
    if kind == OpKind.NORM:
        return _NORM_RULES[node.target](node, real, components)
    if kind == OpKind.ATTENTION:
        return _frozen_attention(gm, node, real, carrier, components)
    if kind == OpKind.AFFINE and node.target is operator.getitem and isinstance(components, (tuple, list)):
        return components[node.args[1]], []
    out = evaluate.over_components({carrier: components})
    if kind in (OpKind.AFFINE, OpKind.PRODUCT) and not _pads_with_a_constant(node):
        return out, []
    at_zero = evaluate({carrier: _zeros_like(real[carrier])})
    if structural(lambda: _is_zero(at_zero), "linear_rules.apply_affine: whether an op's value at zero is zero"):
        return out, []
    shifted = _subtract(out, at_zero)
    return shifted, [Offset(at_zero, f"{module_path(node) or node.name}:{node.name}.offset")]


def _pads_with_a_constant(node: Any) -> bool:
    """``F.pad`` filling with a value that may be nonzero (an offset); zero, reflect, replicate and
    circular padding are linear."""
    if node.target is not F.pad:
        return False
    args = node.args
    mode = node.kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = node.kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode == "constant" and not (value is None or (isinstance(value, (int, float)) and value == 0))


def _subtract(out: Any, at_zero: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out - at_zero
    left, structure = tree_flatten(out)
    right = tree_flatten(at_zero)[0]
    return tree_unflatten([o - z if _is_floating(o) and _is_floating(z) else o for o, z in zip(left, right)],
                          structure)


# functions with a bias argument: position of the bias
_BIAS_ARGUMENT = {F.linear: 2, F.conv1d: 2, F.conv2d: 2, F.conv3d: 2,
                  F.conv_transpose1d: 2, F.conv_transpose2d: 2, F.conv_transpose3d: 2}


def _first_arg(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


def has_bias_argument(node: fx.Node, carrier: fx.Node) -> bool:
    """``F.linear`` / a convolution whose input is ``carrier``: its bias is an offset."""
    return node.op == "call_function" and node.target in _BIAS_ARGUMENT and _first_arg(node) is carrier


def bias_free_call(node: fx.Node) -> tuple[ReplacedCall, Any]:
    """``node`` (a linear map or convolution) called without its bias, and the bias argument."""
    position = _BIAS_ARGUMENT[node.target]
    bias_node = node.args[position] if len(node.args) > position else node.kwargs.get("bias")
    args = list(node.args)
    kwargs = dict(node.kwargs)
    if len(args) > position:
        args[position] = None
    else:
        kwargs.pop("bias", None)
    return ReplacedCall(node, tuple(args), kwargs), bias_node


def _without_bias(evaluate: Evaluator, node: fx.Node, real: dict, carrier: fx.Node, components):
    stripped, bias_node = bias_free_call(node)
    args, kwargs = stripped.args, stripped.kwargs
    out = None
    if node.target is F.linear and isinstance(components, torch.Tensor):
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        out = blockwise_linear(components, real[weight] if isinstance(weight, fx.Node) else weight)
    if out is None:
        out = Evaluator(evaluate.gm, stripped, real).over_components({carrier: components})
    return out, _bias_offsets(node, bias_node, real, out.shape[1:])


def _bias_offsets(node: fx.Node, bias_node: Any, real: dict, shape: torch.Size) -> list[Offset]:
    """A linear map's or convolution's bias as the offset of an output shaped ``shape``."""
    if bias_node is None:
        return []
    bias = real[bias_node] if isinstance(bias_node, fx.Node) else bias_node
    broadcast = (1, -1) + (1,) * (len(shape) - 2) if node.target is not F.linear else (-1,)
    return [Offset(bias.reshape(broadcast).expand(shape), parameter_name(bias_node) or f"{module_path(node)}.bias")]


def affine_offsets(gm: fx.GraphModule, node: fx.Node, kind: OpKind, real: dict, carrier: fx.Node) -> list[Offset]:
    """The offsets ``apply_affine`` gives at ``node`` (they never depend on the components) where no
    components reach it; ``real[node]`` must be known."""
    if has_bias_argument(node, carrier):
        return _bias_offsets(node, bias_free_call(node)[1], real, real[node].shape)
    if kind == OpKind.NORM:
        return norm_offsets(node, real)
    if kind in (OpKind.AFFINE, OpKind.PRODUCT) and not _pads_with_a_constant(node):
        return []
    zero = tree_map(lambda leaf: torch.zeros_like(leaf).unsqueeze(0) if _is_floating(leaf) else leaf, real[carrier])
    return apply_affine(gm, node, kind, real, carrier, zero)[1]


def blockwise_linear(components: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``F.linear(components, weight)`` [K, ..., Din] -> [K, ..., Dout] using exact zero blocks.

    A component that is nonzero in one contiguous block of input features only (one
    attention head after the heads are merged) needs that block of ``weight`` only: the head
    split then costs one projection in total instead of one per head. None when the
    components are not block-sparse (the caller runs the plain op).
    """
    if components.dim() < 2 or components.shape[0] < 2 or weight.dim() != 2:
        return None
    features = components.shape[-1]
    spans = structural(lambda: _feature_spans(components),
                       "linear_rules.blockwise_linear: the block of input features each component is nonzero in")
    if any((b - a != n and n > 0) or n > features // 2 for a, b, n in spans):
        return None
    out = components.new_zeros(components.shape[:-1] + (weight.shape[0],))
    blocks: dict[tuple[int, int], list[int]] = {}
    for k, (a, b, n) in enumerate(spans):
        if n:
            blocks.setdefault((a, b), []).append(k)
    for (a, b), rows in blocks.items():
        first, last = rows[0], rows[-1] + 1
        if last - first == len(rows):  # consecutive rows (one head's components): a view, no gather
            out[first:last] = F.linear(components[first:last, ..., a:b], weight[:, a:b])
        else:
            index = torch.tensor(rows, device=components.device)
            out[index] = F.linear(components[index][..., a:b], weight[:, a:b])
    return out


def _feature_spans(components: torch.Tensor) -> list[list[int]]:
    """[start, stop, count] of the input features (last axis) where each component [K, ..., Din] is nonzero
    (one read-back)."""
    features = components.shape[-1]
    flat = components.reshape(components.shape[0], -1, features)
    nonzero = (flat.amax(1) != 0) | (flat.amin(1) != 0)                                   # [K, Din] (2x ne().any())
    count = nonzero.sum(1)
    start = nonzero.float().argmax(1)
    stop = features - nonzero.flip(1).float().argmax(1)
    return torch.stack([start, stop, count.to(start.dtype)], 1).long().tolist()


def _norm_bias(node: fx.Node, real: dict, name: str, shape_like: torch.Tensor, broadcast: Callable):
    bias_node = _arg(node, name)
    if bias_node is None:
        return []
    bias = real[bias_node] if isinstance(bias_node, fx.Node) else bias_node
    return [Offset(broadcast(bias).expand(shape_like.shape), parameter_name(bias_node) or f"{module_path(node)}.bias")]


_SIGNATURES = {
    F.layer_norm: ["input", "normalized_shape", "weight", "bias", "eps"],
    F.rms_norm: ["input", "normalized_shape", "weight", "eps"],
    F.group_norm: ["input", "num_groups", "weight", "bias", "eps"],
    F.batch_norm: ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
    F.normalize: ["input", "p", "dim", "eps", "out"],
}
_DEFAULTS = {
    F.layer_norm: {"weight": None, "bias": None, "eps": 1e-5},
    F.rms_norm: {"weight": None, "eps": None},
    F.group_norm: {"weight": None, "bias": None, "eps": 1e-5},
    F.batch_norm: {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    F.normalize: {"p": 2.0, "dim": 1, "eps": 1e-12},
}


def _arg(node: fx.Node, name: str):
    names = _SIGNATURES[node.target]
    index = names.index(name)
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, _DEFAULTS[node.target].get(name))


def norm_argument(node: fx.Node, real: dict, name: str):
    """Value of argument ``name`` of a norm call (``input``, ``weight``, ``eps`` ...), defaults included."""
    arg = _arg(node, name)
    return real[arg] if isinstance(arg, fx.Node) else arg


def frozen_row_scale(node: fx.Node, real: dict) -> torch.Tensor | None:
    """The data-dependent factor of a norm that scales each row by one number (layer / RMS norm,
    ``F.normalize``): ``[*input shape, normalized axes of size 1]``; None for other ops."""
    if node.target not in ROW_SCALED_NORMS:
        return None
    x = norm_argument(node, real, "input")
    if node.target is F.normalize:
        norm = x.norm(norm_argument(node, real, "p"), norm_argument(node, real, "dim"), keepdim=True)
        return 1 / norm.clamp_min(norm_argument(node, real, "eps"))
    dims = tuple(range(-len(tuple(norm_argument(node, real, "normalized_shape"))), 0))
    eps = norm_argument(node, real, "eps")
    if node.target is F.rms_norm:
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        return torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
    # the kernel's own 1/std (as the real forward computes it; faster than ``x.var`` on short rows)
    return torch.native_layer_norm(x, x.shape[len(x.shape) - len(dims):], None, None, eps)[2]


def _layer_norm(node: fx.Node, real: dict, components: torch.Tensor):
    dims = tuple(range(-len(tuple(norm_argument(node, real, "normalized_shape"))), 0))
    scale = frozen_row_scale(node, real)
    weight = norm_argument(node, real, "weight")
    if weight is not None:  # one small product, then one pass over the components
        scale = scale * weight
    return (components - components.mean(dims, keepdim=True)).mul_(scale), norm_offsets(node, real)


def _rms_norm(node: fx.Node, real: dict, components: torch.Tensor):
    out = components * frozen_row_scale(node, real)
    weight = norm_argument(node, real, "weight")
    return (out * weight if weight is not None else out), []


def _group_norm(node: fx.Node, real: dict, components: torch.Tensor):
    x = norm_argument(node, real, "input")
    groups = norm_argument(node, real, "num_groups")
    grouped = x.reshape(x.shape[0], groups, -1)
    inv_std = torch.rsqrt(grouped.var(-1, unbiased=False, keepdim=True) + norm_argument(node, real, "eps"))
    c = components.reshape(components.shape[0], x.shape[0], groups, -1)
    out = ((c - c.mean(-1, keepdim=True)) * inv_std).reshape(components.shape)
    channel = (-1,) + (1,) * (x.dim() - 2)
    weight = norm_argument(node, real, "weight")
    if weight is not None:
        out = out * weight.reshape(channel)
    return out, norm_offsets(node, real)


def _batch_norm(node: fx.Node, real: dict, components: torch.Tensor):
    x = norm_argument(node, real, "input")
    if norm_argument(node, real, "training"):
        raise ValueError(f"batch_norm in training mode at {node.name}: call model.eval()")
    channel = (-1,) + (1,) * (x.dim() - 2)
    return components * batch_norm_scale(node, real).reshape(channel), norm_offsets(node, real)


def norm_offsets(node: fx.Node, real: dict) -> list[Offset]:
    """The constant a norm rule adds (its bias; an eval batch norm's shift): from its real input's shape."""
    x = norm_argument(node, real, "input")
    channel = (-1,) + (1,) * (x.dim() - 2)
    if node.target is F.layer_norm:
        return _norm_bias(node, real, "bias", x, lambda b: b)
    if node.target is F.group_norm:
        return _norm_bias(node, real, "bias", x, lambda b: b.reshape(channel))
    if node.target is F.batch_norm:
        bias = norm_argument(node, real, "bias")
        shift = -norm_argument(node, real, "running_mean") * batch_norm_scale(node, real)
        if bias is not None:
            shift = shift + bias
        name = parameter_name(_arg(node, "bias")) or f"{module_path(node)}.shift"
        return [Offset(shift.reshape(channel).expand(x.shape), name)]
    return []


def batch_norm_scale(node: fx.Node, real: dict) -> torch.Tensor:
    """[channels] the per-channel factor of an eval-mode batch norm (running statistics)."""
    scale = torch.rsqrt(norm_argument(node, real, "running_var") + norm_argument(node, real, "eps"))
    weight = norm_argument(node, real, "weight")
    return scale * weight if weight is not None else scale


def _normalize(node: fx.Node, real: dict, components: torch.Tensor):
    return components * frozen_row_scale(node, real), []


_NORM_RULES = {F.layer_norm: _layer_norm, F.rms_norm: _rms_norm, F.group_norm: _group_norm,
               F.batch_norm: _batch_norm, F.normalize: _normalize}
ROW_SCALED_NORMS = {F.layer_norm, F.rms_norm, F.normalize}


def _frozen_attention(gm: fx.GraphModule, node: fx.Node, real: dict, carrier: fx.Node, components):
    """Attention on the trunk (attention pooling): weights frozen, linear in the values."""
    args, kwargs = node_arguments(node, real)
    if node.op == "call_function":
        bound = sdpa_arguments(args, kwargs)
        weights = sdpa_weights(**bound)
        values = sdpa_values(components, bound["query"], bound.get("enable_gqa", False))
        return torch.matmul(weights, values), []
    mha = gm.get_submodule(node.target)
    bound = mha_arguments(args, kwargs)
    parts = mha_parts(mha, **bound)  # the weights depend on query and key only
    value_comps = components if mha.batch_first else components.transpose(1, 2)
    out = mha_output_projection(mha, torch.matmul(parts.weights, mha_value_heads(mha, value_comps, with_bias=False)))
    value = bound["value"] if mha.batch_first else bound["value"].transpose(0, 1)
    at_zero = mha_output_projection(mha, torch.matmul(parts.weights, mha_value_heads(mha, torch.zeros_like(value))))
    if mha.out_proj.bias is not None:
        at_zero = at_zero + mha.out_proj.bias
    offsets = [] if _is_zero(at_zero) else [Offset((at_zero, None), f"{module_path(node)}.bias")]  # MHA's layout
    return (out, None), offsets


# --- multi-carrier rules (additive) --------------------------------------------------

def additive_sign(node: fx.Node, position: int) -> float:
    """Coefficient of operand ``position`` in add / sub (``alpha`` included)."""
    if position == 0:
        return 1.0
    alpha = node.kwargs.get("alpha", 1)
    return -float(alpha) if is_subtraction(node) else float(alpha)


def is_binary_additive(node: fx.Node) -> bool:
    return node.target not in (torch.cat, torch.concat, torch.concatenate, torch.stack)

