"""What each graph operation does to its data inputs, from torch primitives only.

Every call node falls in one ``OpKind``. The tables name torch functions and
tensor methods, never model or module classes: a new architecture built from
torch primitives is covered without change. Operations not in the tables
(timm's opaque leaves, autowrapped helpers such as ``window_reverse``) are
``UNKNOWN`` and are classified numerically (see ``affinity``).
"""
from __future__ import annotations

import enum
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.isub: operator.sub,
                       operator.imul: operator.mul, operator.itruediv: operator.truediv}


def is_in_place(node: fx.Node) -> bool:
    """Whether ``node`` writes into its first argument (``x.add_(y)``, ``x += y``)."""
    return ((node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"))
            or (node.op == "call_function" and node.target in IN_PLACE_FUNCTIONS))


def overwritten_later(node: fx.Node) -> bool:
    """Whether an in-place op (``x.add_(y)``, ``x += y``) writes into ``node``'s value."""
    return any(user.args and user.args[0] is node and is_in_place(user) for user in node.users)


class OpKind(enum.Enum):
    ADDITIVE = "additive"      # linear in every data input jointly: add, sub, cat, stack
    AFFINE = "affine"          # affine in its first input, other inputs are not data
    PRODUCT = "product"        # bilinear: linear in one data input when the others are frozen
    NORM = "norm"              # normalisation: linear once the per-token scale is frozen
    ATTENTION = "attention"    # fused attention: linear in the values once weights are frozen
    NONLINEAR = "nonlinear"    # anything else known: activations, softmax, exp ...
    UNKNOWN = "unknown"        # opaque: decided numerically
    META = "meta"              # shapes, dtypes, asserts: no tensor data flows


ADDITIVE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
                      torch.cat, torch.concat, torch.concatenate, torch.stack}
ADDITIVE_METHODS = {"add", "add_", "sub", "sub_"}
SUBTRACTIONS = {operator.sub, operator.isub, torch.sub, "sub", "sub_"}

# product ops: position(s) that may carry the linear operand
PRODUCT_FUNCTIONS = {operator.mul: (0, 1), operator.imul: (0, 1), torch.mul: (0, 1),
                     operator.truediv: (0,), operator.itruediv: (0,), torch.div: (0,),
                     operator.matmul: (0, 1), torch.matmul: (0, 1), torch.bmm: (0, 1),
                     torch.mm: (0, 1), torch.einsum: None, F.linear: (0,),
                     F.conv1d: (0,), F.conv2d: (0,), F.conv3d: (0,),
                     F.conv_transpose1d: (0,), F.conv_transpose2d: (0,), F.conv_transpose3d: (0,)}
PRODUCT_METHODS = {"mul": (0, 1), "mul_": (0, 1), "div": (0,), "div_": (0,), "matmul": (0, 1),
                   "bmm": (0, 1), "mm": (0, 1)}

NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm, F.normalize}

ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention}

# affine in the first tensor argument; the other arguments are sizes, dims, indices
AFFINE_FUNCTIONS = {
    operator.getitem, operator.neg, operator.pos, torch.flatten, torch.reshape, torch.permute,
    torch.transpose, torch.squeeze, torch.unsqueeze, torch.roll, torch.flip, torch.narrow,
    torch.select, torch.chunk, torch.split, torch.unbind, torch.movedim, torch.swapaxes,
    torch.mean, torch.sum, torch.neg, torch.clone, torch.repeat_interleave, torch.tile,
    torch.index_select, torch.gather, F.pad, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle, F.pixel_unshuffle,
    F.unfold, F.fold, torch.t,
}
AFFINE_METHODS = {
    "view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous", "expand",
    "squeeze", "unsqueeze", "roll", "flip", "narrow", "select", "chunk", "split", "unbind",
    "movedim", "swapaxes", "swapdims", "mean", "sum", "neg", "clone", "repeat", "tile",
    "repeat_interleave", "index_select", "gather", "to", "type", "type_as", "float", "double",
    "half", "bfloat16", "t", "detach", "__getitem__", "view_as", "reshape_as", "unfold",
    "expand_as",
}

META_METHODS = {"size", "dim", "numel", "new_zeros", "new_ones", "new_full",
                "new_empty", "new_tensor"}
META_FUNCTIONS = {torch._assert, getattr, torch.zeros_like, torch.ones_like, torch.full_like,
                  torch.empty_like, torch.rand_like, torch.randn_like, len}

NONLINEAR_FUNCTIONS = {
    F.gelu, F.relu, F.relu6, F.silu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softmax, F.log_softmax, F.softplus,
    F.glu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
    torch.softmax, torch.relu, torch.abs, torch.pow, operator.pow, torch.clamp, torch.erf,
    torch.max, torch.min, torch.amax, torch.amin, torch.var, torch.std, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.cos,
    torch.sin, torch.square, torch.reciprocal, torch.logsumexp, torch.sign,
}
NONLINEAR_METHODS = {
    "softmax", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "relu", "abs", "pow", "clamp",
    "clamp_min", "clamp_max", "max", "min", "amax", "amin", "var", "std", "norm", "square",
    "reciprocal", "sign", "sin", "cos", "exp_", "sigmoid_", "relu_", "logsumexp", "erf",
}


def is_multihead_attention(node: fx.Node, gm: fx.GraphModule) -> bool:
    """torch's own ``nn.MultiheadAttention`` (opaque under fx), e.g. in open_clip."""
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MultiheadAttention)


# first match wins: a function in several tables takes the earlier kind
FUNCTION_KINDS = [(ADDITIVE_FUNCTIONS, OpKind.ADDITIVE), (PRODUCT_FUNCTIONS, OpKind.PRODUCT),
                  (NORM_FUNCTIONS, OpKind.NORM), (ATTENTION_FUNCTIONS, OpKind.ATTENTION),
                  (AFFINE_FUNCTIONS, OpKind.AFFINE), (META_FUNCTIONS, OpKind.META),
                  (NONLINEAR_FUNCTIONS, OpKind.NONLINEAR)]
METHOD_KINDS = [(ADDITIVE_METHODS, OpKind.ADDITIVE), (PRODUCT_METHODS, OpKind.PRODUCT),
                (AFFINE_METHODS, OpKind.AFFINE), (META_METHODS, OpKind.META),
                (NONLINEAR_METHODS, OpKind.NONLINEAR)]


def op_kind(node: fx.Node, gm: fx.GraphModule) -> OpKind:
    """Classify a call node by the torch primitive it runs."""
    if node.op == "call_module":
        return OpKind.ATTENTION if is_multihead_attention(node, gm) else OpKind.UNKNOWN
    tables = {"call_function": FUNCTION_KINDS, "call_method": METHOD_KINDS}.get(node.op)
    if tables is None:
        return OpKind.META
    return next((kind for table, kind in tables if node.target in table), OpKind.UNKNOWN)


def product_positions(node: fx.Node) -> tuple[int, ...] | None:
    """Argument positions in which a PRODUCT node is linear (None: any tensor argument)."""
    if node.op == "call_function":
        return PRODUCT_FUNCTIONS[node.target]
    return PRODUCT_METHODS[node.target]


def is_subtraction(node: fx.Node) -> bool:
    return node.target in SUBTRACTIONS


def attention_value_input(node: fx.Node) -> fx.Node | None:
    """The value input of a fused attention node (SDPA's ``value`` / MHA's ``value``)."""
    if "value" in node.kwargs:
        value = node.kwargs["value"]
    elif len(node.args) > 2:
        value = node.args[2]
    else:
        return None
    return value if isinstance(value, fx.Node) else None
