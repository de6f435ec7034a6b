"""Scores of a birth's components along pulled-back directions, without building the components.

At a birth the decomposition's map to the output is linear, so ⟨its component c at the output, u⟩ =
⟨c at the birth, G⟩ with G = the adjoint of that map for u (``decompose.scoring`` reads it off one
backward pass). For an attention birth ``A @ V`` [rows, *middle, Nq, d], source ``s`` of a head's
attention contributes A[..., q, s] · V[..., s, :] at query q, so

    score(head h, source s = w·Nk + j) = Σ_{attentions of h and window w} Σ_q A[..., q, j] · ⟨V[..., j, :], G[..., q, :]⟩

one product ``G Vᵀ`` of the attention's size per direction, never ``[H·S, *value]``. Heads: the
value times G summed per head. Anything else is split as ``births.split_birth`` does and contracted.
"""
from __future__ import annotations

import torch
from torch import fx

from tracer.ops import is_multihead_attention
from tracer.relevance import Slice
from tracer.roles import Birth
from tracer.vocabulary import Level

from .births import AttentionSplit, Grouping, attention_split, split_birth


class BirthScores:
    """The split of one birth at a level, kept until its adjoint is known.

    heads, tokens: of each component, as ``split_birth`` orders them
    """

    def __init__(self, gm: fx.GraphModule, birth: Birth, real: dict, level: Level, spec: Slice | None,
                 batch_size: int):
        self.batch = batch_size
        self.split: AttentionSplit | None = attention_split(gm, birth, real, level, spec, batch_size)
        self.values: torch.Tensor | None = None  # [K, *value] where the split is not an attention's
        self.batch_axis = 0
        if self.split is not None and not self._standard():
            self.split = None
        if self.split is None:
            born = split_birth(gm, birth, real, level, spec, batch_size)
            values = born.values[0] if isinstance(born.values, tuple) else born.values
            self.values, self.heads, self.tokens = values, list(born.heads), list(born.tokens)
            if is_multihead_attention(birth.node, gm) and not gm.get_submodule(birth.node.target).batch_first:
                self.batch_axis = 1  # [L, N, E]: the batch is axis 1
        elif self.split.windows is None:
            heads = self.split.heads
            self.heads = list(range(heads.count)) if heads.named else [None]
            self.tokens = [None] * len(self.heads)
        else:
            heads, windows = self.split.heads, self.split.windows
            sources = windows.count * self.split.parts.weights.shape[-1]
            self.heads = [h if heads.named else None for h in range(heads.count) for _ in range(sources)]
            self.tokens = [s for _ in range(heads.count) for s in range(sources)]

    def _standard(self) -> bool:
        """Whether the heads (and windows) are constant over the last two axes (query, feature) of the
        value, where the fast contractions apply."""
        split, dims = self.split, self.split.value.dim()
        groupings = [split.heads] + ([split.windows] if split.windows is not None else [])
        return all(g.index.dim() == dims and tuple(g.index.shape[-2:]) == (1, 1) for g in groupings)

    def scores(self, adjoint: torch.Tensor) -> torch.Tensor:
        """[K, B, k] for ``adjoint`` [k, *value shape] (the birth's value as the pass carried it)."""
        if self.split is None:
            return self._contracted(adjoint)
        split = self.split
        value = split.value
        if split.windows is None:  # by head: Σ value·G over each head's elements
            if not split.heads.named:
                return self._contracted(adjoint, value.unsqueeze(0))
            per_attention = (adjoint * value.to(adjoint.dtype)).sum((-2, -1))              # [k, rows, *middle]
            return self._grouped(per_attention, split.heads.index[..., 0, 0], split.heads.count)
        weights, values = split.parts.weights.to(adjoint.dtype), split.parts.values.to(adjoint.dtype)
        # [k, *lead, Nq, Nk] = G Vᵀ, then Σ_q A ⊙ (G Vᵀ) -> [k, *lead, Nk]
        lead = value.shape[:-2]
        products = torch.einsum("j...qd,...kd->j...qk", adjoint, values.expand(*lead, *values.shape[-2:]))
        per_source = (products * weights).sum(-2)
        groups = split.heads.index[..., 0, 0] * split.windows.count + split.windows.index[..., 0, 0]
        grouped = self._grouped(per_source, groups, split.heads.count * split.windows.count)  # [G, B, k, Nk]
        count, keys = split.heads.count, per_source.shape[-1]
        directions = adjoint.shape[0]
        return grouped.view(count, split.windows.count, self.batch, directions, keys) \
            .permute(0, 1, 4, 2, 3).reshape(-1, self.batch, directions)

    def _grouped(self, per_attention: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
        """``per_attention`` [k, rows, *middle, *tail] summed per (group, image): [count, B, k, *tail]
        (``index``: the group of each attention, broadcastable to [rows, *middle])."""
        directions, rows = per_attention.shape[0], per_attention.shape[1]
        lead = per_attention.shape[1: 1 + index.dim()]
        tail = per_attention.shape[1 + index.dim():]
        image = (torch.arange(rows, device=index.device) // (rows // self.batch)).view(-1, *[1] * (index.dim() - 1))
        target = (index * self.batch + image).expand(lead).reshape(-1)
        flat = per_attention.reshape(directions, -1, *tail)
        out = flat.new_zeros(directions, count * self.batch, *tail).index_add_(1, target.to(flat.device), flat)
        return out.view(directions, count, self.batch, *tail).movedim(0, 2)

    def _contracted(self, adjoint: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Components ``values`` [K, *value] (default: the split's) against ``adjoint``, per image."""
        values = self.values if values is None else values
        values = values.movedim(1 + self.batch_axis, 1).reshape(values.shape[0], self.batch, -1)
        adjoint = adjoint.movedim(1 + self.batch_axis, 1).reshape(adjoint.shape[0], self.batch, -1)
        return torch.einsum("cbe,jbe->cbj", values.to(adjoint.dtype), adjoint)
