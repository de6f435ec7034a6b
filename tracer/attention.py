"""Attention primitives written out: weights, values and per-head outputs.

``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` hide the
attention weights; the decomposition needs them (to split by source token, and
to freeze them when attention sits on the trunk). Both are torch primitives
with documented semantics, reproduced here and checked against the real output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionParts:
    """``out = weights @ values``; shapes ``[..., heads, Nq, Nk]`` and ``[..., heads, Nk, d]``."""

    weights: torch.Tensor
    values: torch.Tensor


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when it is a view into a larger tensor (keeping a head's values as a view of the
    whole qkv projection keeps all of it alive)."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def sdpa_weights(query, key, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **_) -> torch.Tensor:
    """Softmax attention weights ``[..., Hq, Nq, Nk]`` exactly as SDPA defines them."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    logits = query @ key.transpose(-2, -1) * scale
    if is_causal:
        causal = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return torch.softmax(logits, dim=-1)


def sdpa_values(value, query, enable_gqa=False, **_) -> torch.Tensor:
    if enable_gqa and value.shape[-3] != query.shape[-3]:
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    return value


def mha_arguments(args: tuple, kwargs: dict) -> dict:
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class UnsupportedAttention(ValueError):
    pass


def mha_parts(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, attn_mask=None,
              is_causal=False, **_) -> AttentionParts:
    """Weights ``[N, H, L, S]`` and projected values ``[N, H, S, d]`` of an ``nn.MultiheadAttention``."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedAttention("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    (w_q, w_k, w_v), (b_q, b_k, b_v) = _in_projections(mha)
    q, k, v = (_split_heads(mha, x, w, b) for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    mask = _mha_mask(attn_mask, key_padding_mask, q)
    weights = sdpa_weights(q, k, attn_mask=mask, is_causal=is_causal)
    return AttentionParts(weights, v)


def mha_value_heads(mha: nn.MultiheadAttention, value: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
    """The value projection of ``value`` ``[..., N, S, E]`` (batch first) split into heads:
    ``[..., N, H, S, d]``; ``with_bias=False`` gives its linear part."""
    (_, _, w_v), (_, _, b_v) = _in_projections(mha)
    return _split_heads(mha, value, w_v, b_v if with_bias else None)


def _in_projections(mha: nn.MultiheadAttention) -> tuple[tuple, tuple]:
    """(w_q, w_k, w_v), (b_q, b_k, b_v) of an ``nn.MultiheadAttention`` (biases may be None)."""
    if mha._qkv_same_embed_dim:
        weights = tuple(mha.in_proj_weight.chunk(3))
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = tuple(mha.in_proj_bias.chunk(3)) if mha.in_proj_bias is not None else (None, None, None)
    return weights, biases


def _split_heads(mha: nn.MultiheadAttention, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """``[..., N, L, E]`` -> projected ``[..., N, H, L, d]``."""
    return F.linear(x, weight, bias).unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(-3, -2)


def _mha_mask(attn_mask, key_padding_mask, q):
    mask = None
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(q.shape[0], q.shape[1], *attn_mask.shape[-2:])
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(q.shape[0], 1, 1, -1)
        if padding.dtype == torch.bool:
            padding = torch.zeros(padding.shape, dtype=q.dtype, device=q.device).masked_fill(padding, float("-inf"))
        mask = padding if mask is None else mask + padding
    return mask


def mha_output_projection(mha: nn.MultiheadAttention, head_outputs: torch.Tensor) -> torch.Tensor:
    """Apply ``out_proj`` without its bias to ``[..., N, H, L, d]``; returns MHA's layout ``[..., N, L, E]``
    (``[..., L, N, E]`` unless ``batch_first``)."""
    merged = head_outputs.transpose(-3, -2).flatten(-2)          # [..., N, L, H*d]
    projected = F.linear(merged, mha.out_proj.weight)
    return projected if mha.batch_first else projected.transpose(-3, -2)
