"""Splitting a birth value into components at the requested level.

A birth is where a branch's contribution becomes linear all the way to the
output (see ``tracer.roles``). At level ``branch`` it is one component; an
attention birth splits by head (level ``head``: the axes that split a projection's
channels, ``tracer.head_axes``; windows of the same head are summed) and further by
source, the key axis of ``weights @ values`` per window (level ``token``).
"""
from __future__ import annotations

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
from tracer.head_axes import AttentionAxes
from tracer.linear_rules import Offset
from tracer.node_calls import node_arguments
from tracer.ops import is_multihead_attention
from tracer.recording import check
from tracer.relevance import Slice, index_tensor
from tracer.roles import Birth
from tracer.vocabulary import ComponentKind, Level

LEVELS = tuple(Level)


@dataclass
class BornComponents:
    """Components born at one node: ``values`` [K, *out.shape] (or MHA's (tensor, None))."""

    values: torch.Tensor | tuple
    heads: list[int | None]
    tokens: list[int | None]
    offsets: list[Offset]


def split_birth(gm: fx.GraphModule, birth: Birth, real: dict, level: Level | str,
                spec: Slice | None = None, batch_size: int | None = None) -> BornComponents:
    """Components born at ``birth.node``; ``spec``: only these positions of its value are needed.

    batch_size: images in the batch; the attention's rows per image hold its windows and heads
    as ``birth.axes`` (``tracer.head_axes``) planned them.
    """
    node, level = birth.node, Level(level)
    if not isinstance(real[node], torch.Tensor) and not is_multihead_attention(node, gm):
        # an opaque op with several outputs, e.g. an LSTM's (out, (h, c)): one component
        return BornComponents(tree_map(lambda v: v.unsqueeze(0) if torch.is_tensor(v) and v.is_floating_point()
                                       else v, real[node]), [None], [None], [])
    split = attention_split(gm, birth, real, level, spec, batch_size)
    if split is not None and split.windows is not None:
        return _split_tokens(split.parts, split.value, split.heads, split.windows)
    if split is not None:
        return _split_heads(split.value, split.heads)
    if is_multihead_attention(node, gm):
        return _split_multihead(gm, node, real, level, spec)
    value = real[node] if spec is None else spec.take(real[node])
    return BornComponents(value.unsqueeze(0), [None], [None], [])


@dataclass
class AttentionSplit:
    """How an attention birth ``weights @ values`` splits: its value ``[rows, *middle, Nq, d]`` (``spec``
    taken), the head of each attention, and at level token the window of each and the weights and values."""

    value: torch.Tensor
    heads: Grouping
    windows: Grouping | None = None       # level token only
    parts: AttentionParts | None = None   # level token only


def attention_split(gm: fx.GraphModule, birth: Birth, real: dict, level: Level | str, spec: Slice | None = None,
                    batch_size: int | None = None) -> AttentionSplit | None:
    """The split of an attention birth at ``level`` (head or token), None where the birth is one component
    or an ``nn.MultiheadAttention``. Without weights and values the split is by head only."""
    node, level = birth.node, Level(level)
    if birth.kind is not ComponentKind.ATTENTION or level is Level.BRANCH or is_multihead_attention(node, gm) \
            or not isinstance(real[node], torch.Tensor):
        return None
    value = real[node] if spec is None else spec.take(real[node])
    axes = _planned_axes(birth, real[node].shape, batch_size)
    full = real[node].shape
    heads = Grouping(_sliced(axes.head_index(full, value.device), spec), axes.head_count(full),
                     axes.splits_heads(full))
    parts = attention_parts(node, real, spec) if level is Level.TOKEN else None
    if parts is None:
        return AttentionSplit(value, heads)
    windows = Grouping(_sliced(axes.window_index(full, value.device), spec), axes.window_count(full), True)
    return AttentionSplit(value, heads, windows, parts)


@dataclass
class Grouping:
    """Which group (head, or window) each attention of a birth value belongs to.

    index: long, broadcastable to the value [rows, *middle, Nq, d]; count: groups; named: whether the
    groups are named in labels (a birth without a head axis has ``head=None``).
    """

    index: torch.Tensor
    count: int
    named: bool

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """[count, *index.shape]: 1 where the attention belongs to the group."""
        groups = torch.arange(self.count, device=self.index.device).view(-1, *[1] * self.index.dim())
        return (self.index.unsqueeze(0) == groups).to(dtype)


def _planned_axes(birth: Birth, shape: torch.Size, batch_size: int | None) -> AttentionAxes:
    axes = birth.axes
    if axes is None:
        raise RuntimeError(f"internal: attention birth {birth.node.name} ({birth.name}) has no planned head axes")
    rows = len(axes.rows.heads)
    if batch_size is not None and shape[0] != batch_size * rows:
        raise ValueError(f"attention {birth.name} (node {birth.node.name}) has {shape[0]} rows for {batch_size} "
                         f"images, the plan found {rows} per image; its heads and windows cannot be told apart")
    return axes


def _sliced(index: torch.Tensor, spec: Slice | None) -> torch.Tensor:
    """``index`` (broadcastable to the full value) restricted to the positions ``spec`` keeps."""
    if spec is None or index.shape[spec.axis] == 1:
        return index
    return spec.take(index)


def attention_groups(rows: int, batch_size: int | None) -> int:
    """Attention groups per image: windows when the batch axis holds several rows per image."""
    return rows // batch_size if batch_size and rows % batch_size == 0 else 1


def attention_parts(node: fx.Node, real: dict, spec: Slice | None = None) -> AttentionParts | None:
    """Weights [..., Nq, Nk] and values [..., Nk, d] of an attention birth, None if it has none; with
    ``spec``, restricted to the positions it keeps of the output (an SDPA kept on a few query rows, e.g. a
    class token, computes only those rows' weights)."""
    args, kwargs = node_arguments(node, real)
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        bound = sdpa_arguments(args, kwargs)
        values = sdpa_values(bound["value"], bound["query"], bound.get("enable_gqa", False))
        if spec is not None and spec.axis - real[node].dim() == -2 and not bound.get("is_causal", False):
            index = index_tensor(spec.index, bound["query"].device)
            mask = bound.get("attn_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] == spec.full:
                bound["attn_mask"] = mask.index_select(-2, index)
            bound["query"] = bound["query"].index_select(-2, index)
            return AttentionParts(sdpa_weights(**bound), values)
        parts = AttentionParts(sdpa_weights(**bound), values)
    else:
        weights, values = args[0], args[1]
        if weights.dim() < 2 or values.dim() < 2:
            return None
        parts = AttentionParts(weights, values)
    return parts if spec is None else _slice_parts(parts, spec, real[node].dim())


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


def _split_heads(value: torch.Tensor, heads: Grouping) -> BornComponents:
    if not heads.named:
        return BornComponents(value.unsqueeze(0), [None], [None], [])
    components = value.unsqueeze(0) * heads.one_hot(value.dtype)
    return BornComponents(components, list(range(heads.count)), [None] * heads.count, [])


def _split_tokens(parts: AttentionParts, value: torch.Tensor, heads: Grouping, windows: Grouping
                  ) -> BornComponents:
    """[H*S, *out]: component (h, s) = weights[..., :, j] ⊗ values[..., j, :] on the attentions of head h
    and window w, for source ``s = w * Nk + j``.

    Windows (rows of one image, or a middle axis such as outlook attention's positions) are batches
    of attentions: source s lives in the attentions of its window only. Dense (memory ~ sources x
    value size): branches that early pooling plans are pooled straight from the weights and values
    instead (``pooling.gathering``).
    """
    weights, values = parts.weights, parts.values
    keys = weights.shape[-1]
    # [Nk, ..., Nq, d]: contribution of each key token through all heads
    per_token = torch.einsum("...qk,...kd->k...qd", weights, values).expand(keys, *value.shape)
    groups = Grouping(heads.index * windows.count + windows.index, heads.count * windows.count, True)
    components = (groups.one_hot(value.dtype).unsqueeze(1) * per_token.unsqueeze(0)).flatten(0, 1)
    sources = windows.count * keys
    head_of = [h if heads.named else None for h in range(heads.count) for _ in range(sources)]
    tokens = [s for _ in range(heads.count) for s in range(sources)]
    return BornComponents(components, head_of, tokens, [])


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
    if level is Level.BRANCH:
        values = mha_output_projection(mha, heads_out).unsqueeze(0)
        heads, tokens = [None], [None]
    else:
        mask = torch.eye(count, dtype=heads_out.dtype, device=heads_out.device).view(count, 1, count, 1, 1)
        if level is Level.HEAD:
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
    check(lambda: _check_multihead(real_out, values.sum(0), mha, node),
          "births: nn.MultiheadAttention's heads re-computed equal its output")
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


