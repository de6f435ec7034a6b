"""Splitting a birth value into components at the requested level.

A birth is where a branch's contribution becomes linear all the way to the
output (see ``tracer.roles``). At level ``branch`` it is one component; an
attention birth splits along its head axes (level ``head``: the non-batch,
non-query, non-key axes of the attention weights) and further along the key
axis of ``weights @ values`` (level ``token``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx
from torch.utils._pytree import tree_map

from tracer.attention import (
    AttentionParts,
    mha_arguments,
    mha_output_projection,
    mha_parts,
    sdpa_arguments,
    sdpa_values,
    sdpa_weights,
)
from tracer.linear_rules import Offset
from tracer.ops import is_multihead_attention
from tracer.probe import node_arguments
from tracer.relevance import Slice, index_tensor
from tracer.roles import Birth

LEVELS = ("branch", "head", "token")


@dataclass
class BornComponents:
    """Components born at one node: ``values`` [K, *out.shape] (or MHA's (tensor, None))."""

    values: torch.Tensor | tuple
    heads: list[int | None]
    tokens: list[int | None]
    offsets: list[Offset]


def split_birth(gm: fx.GraphModule, birth: Birth, real: dict, level: str,
                spec: Slice | None = None, batch_size: int | None = None) -> BornComponents:
    """Components born at ``birth.node``; ``spec``: only these positions of its value are needed.

    batch_size: images in the batch; an attention whose batch axis holds more rows than that
    attends within windows (level ``token`` splits its keys per window).
    """
    node = birth.node
    if not isinstance(real[node], torch.Tensor) and not is_multihead_attention(node, gm):
        # an opaque op with several outputs, e.g. an LSTM's (out, (h, c)): one component
        return BornComponents(tree_map(lambda v: v.unsqueeze(0) if torch.is_tensor(v) and v.is_floating_point()
                                       else v, real[node]), [None], [None], [])
    value = real[node] if spec is None else spec.take(real[node])
    if birth.kind != "attention" or (level == "branch" and not is_multihead_attention(node, gm)):
        return BornComponents(value.unsqueeze(0), [None], [None], [])
    if is_multihead_attention(node, gm):
        return _split_multihead(gm, node, real, level, spec)
    head_dims = list(range(1, value.dim() - 2))
    if level == "branch":
        return BornComponents(value.unsqueeze(0), [None], [None], [])
    if level == "head":
        return _split_heads(value, head_dims)
    parts = attention_parts(node, real)
    if parts is None:
        return _split_heads(value, head_dims)
    if spec is not None:
        parts = _slice_parts(parts, spec, real[node].dim())
    return _split_tokens(parts, value, head_dims, attention_groups(value.shape[0], batch_size))


def attention_groups(rows: int, batch_size: int | None) -> int:
    """Attention groups per image: windows when the batch axis holds several rows per image."""
    return rows // batch_size if batch_size and rows % batch_size == 0 else 1


def attention_parts(node: fx.Node, real: dict) -> AttentionParts | None:
    """Weights [..., Nq, Nk] and values [..., Nk, d] of an attention birth, None if it has none."""
    args, kwargs = node_arguments(node, real)
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        bound = sdpa_arguments(args, kwargs)
        return AttentionParts(sdpa_weights(**bound), sdpa_values(bound["value"], bound["query"],
                                                                 bound.get("enable_gqa", False)))
    weights, values = args[0], args[1]
    if weights.dim() < 2 or values.dim() < 2:
        return None
    return AttentionParts(weights, values)


def _slice_parts(parts: AttentionParts, spec: Slice, ndim: int) -> AttentionParts:
    """Weights and values restricted to the positions ``spec`` keeps of ``weights @ values``."""
    index = index_tensor(spec.index, parts.weights.device)
    axis = spec.axis - ndim                     # negative: aligns operands of different rank
    weights, values = parts.weights, parts.values
    if axis == -2:                              # query axis
        return AttentionParts(weights.index_select(-2, index), values)
    if axis == -1:                              # value feature axis
        return AttentionParts(weights, values.index_select(-1, index))
    if weights.dim() >= -axis and weights.shape[axis] == spec.full:
        weights = weights.index_select(axis, index)
    if values.dim() >= -axis and values.shape[axis] == spec.full:
        values = values.index_select(axis, index)
    return AttentionParts(weights, values)


def _head_mask(shape: torch.Size, head_dims: list[int], like: torch.Tensor) -> torch.Tensor:
    """[H, *broadcast shape] one-hot over the (flattened) head axes."""
    count = math.prod(shape[d] for d in head_dims)
    view = [shape[d] if d in head_dims else 1 for d in range(len(shape))]
    return torch.eye(count, dtype=like.dtype, device=like.device).reshape(count, *view)


def _split_heads(value: torch.Tensor, head_dims: list[int]) -> BornComponents:
    if not head_dims:
        return BornComponents(value.unsqueeze(0), [None], [None], [])
    mask = _head_mask(value.shape, head_dims, value)
    heads = list(range(mask.shape[0]))
    return BornComponents(value.unsqueeze(0) * mask, heads, [None] * len(heads), [])


def _split_tokens(parts: AttentionParts, value: torch.Tensor, head_dims: list[int],
                  windows: int = 1) -> BornComponents:
    """[H*S, *out]: component (h, s) = weights[..., h, :, j] ⊗ values[..., h, j, :] for source s.

    Without windows the sources are the keys j. With ``windows`` attention groups per image
    on the batch axis (rows ``b * windows + w``, as window partitions lay them out), source
    ``s = w * Nk + j`` is key j of window w: it lives in the rows of window w only. Dense (memory
    ~ sources x value size): branches that early pooling plans are pooled straight from the weights
    and values instead (``early_pooling._token_components``).
    """
    weights, values = parts.weights, parts.values
    keys = weights.shape[-1]
    # [Nk, ..., Nq, d]: contribution of each key token through all heads
    per_token = torch.einsum("...qk,...kd->k...qd", weights, values)
    per_token = per_token.expand(keys, *value.shape)
    if windows > 1:  # [nW * Nk, B * nW, ...]: key j of window w, zero outside window w's rows
        rows = per_token.unflatten(1, (-1, windows))                                # [Nk, B, nW, ...]
        own_window = torch.eye(windows, dtype=value.dtype, device=value.device)
        own_window = own_window.view(windows, 1, 1, windows, *([1] * (rows.dim() - 3)))
        per_token = (rows.unsqueeze(0) * own_window).flatten(2, 3).flatten(0, 1)
        keys = keys * windows
    if head_dims:
        mask = _head_mask(value.shape, head_dims, value)            # [H, *view]
        components = (per_token.unsqueeze(0) * mask.unsqueeze(1)).flatten(0, 1)
        heads = [h for h in range(mask.shape[0]) for _ in range(keys)]
    else:
        components, heads = per_token, [None] * keys
    tokens = [j for _ in range(len(heads) // keys) for j in range(keys)]
    return BornComponents(components, heads, tokens, [])


def _split_multihead(gm: fx.GraphModule, node: fx.Node, real: dict, level: str,
                     spec: Slice | None) -> BornComponents:
    """``nn.MultiheadAttention`` born in a branch: per-head (and per-token) outputs of out_proj."""
    mha = gm.get_submodule(node.target)
    args, kwargs = node_arguments(node, real)
    parts = mha_parts(mha, **mha_arguments(args, kwargs))
    real_out = real[node][0]
    query_axis = 1 if mha.batch_first else 0
    if spec is not None and spec.axis == query_axis:  # only some query tokens are needed
        index = index_tensor(spec.index, parts.weights.device)
        parts = AttentionParts(parts.weights.index_select(-2, index), parts.values)
        real_out = spec.take(real_out)
        spec = None
    heads_out = torch.matmul(parts.weights, parts.values)                     # [N, H, L, d]
    count = mha.num_heads
    if level == "branch":
        values = mha_output_projection(mha, heads_out).unsqueeze(0)
        heads, tokens = [None], [None]
    else:
        mask = torch.eye(count, dtype=heads_out.dtype, device=heads_out.device).view(count, 1, count, 1, 1)
        if level == "head":
            values = mha_output_projection(mha, heads_out.unsqueeze(0) * mask)  # [H, ...]
            heads, tokens = list(range(count)), [None] * count
        else:
            keys = parts.weights.shape[-1]
            per_token = torch.einsum("nhqk,nhkd->knhqd", parts.weights, parts.values)  # [S, N, H, L, d]
            masked = (per_token.unsqueeze(0) * mask.unsqueeze(1)).flatten(0, 1)      # [H*S, N, H, L, d]
            values = mha_output_projection(mha, masked)
            heads = [h for h in range(count) for _ in range(keys)]
            tokens = [j for _ in range(count) for j in range(keys)]
    if spec is not None:
        values, real_out = spec.take(values, leading=1), spec.take(real_out)
    _check_multihead(real_out, values.sum(0), mha, node)
    offsets = []
    if mha.out_proj.bias is not None:
        bias = mha.out_proj.bias.expand(real_out.shape)  # MHA returns (output, weights)
        offsets.append(Offset((bias, None), f"{node.target.removeprefix('model.')}.out_proj.bias"))
    return BornComponents((values, None), heads, tokens, offsets)


def _check_multihead(real_out: torch.Tensor, without_bias: torch.Tensor, mha, node) -> None:
    bias = mha.out_proj.bias if mha.out_proj.bias is not None else 0
    error = (without_bias + bias - real_out).norm() / real_out.norm().clamp_min(1e-30)
    tolerance = 1e-9 if real_out.dtype == torch.float64 else 1e-4
    if error > tolerance:
        raise ValueError(f"nn.MultiheadAttention at {node.target}: re-computed heads differ from "
                         f"its output (relative error {float(error):.2e}); this configuration is not supported")


