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

from tracer.attention import own_storage
from tracer.ops import is_multihead_attention
from tracer.recording import structural
from tracer.relevance import Slice
from tracer.roles import Birth
from tracer.vocabulary import Level

from .births import AttentionSplit, attention_split, split_birth


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
        if self.split is not None and self.split.parts is not None:  # kept until the backward pass: not as
            parts = self.split.parts                                   # views of the whole qkv projection
            self.split.parts = type(parts)(own_storage(parts.weights), own_storage(parts.values))
        if self.split is not None:
            self.split.value = own_storage(self.split.value)
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

    def scores(self, adjoint: torch.Tensor, needed: list[bool] | None = None) -> torch.Tensor:
        """[K, B, k] for ``adjoint`` [k, *value shape] (the birth's value as the pass carried it); with
        ``needed`` (K flags, from the labels) only those components are computed (the others are 0)."""
        if needed is not None:
            needed = torch.tensor(needed, dtype=torch.bool, device=adjoint.device)
        if self.split is None:
            scores = self._contracted(adjoint)
            return scores if needed is None else scores * needed.view(-1, 1, 1).to(scores)
        split = self.split
        value = split.value
        if split.windows is None and not split.heads.named:
            return self._contracted(adjoint, value.unsqueeze(0))
        windows = split.windows.count if split.windows is not None else 1
        groups = split.heads.index[..., 0, 0] * windows
        if split.windows is not None:
            groups = groups + split.windows.index[..., 0, 0]
        lead = value.shape[:-2]
        count = split.heads.count * windows
        group_of = groups.expand(lead).reshape(-1)                                    # [E] attentions
        image_of = (torch.arange(lead[0], device=group_of.device) // (lead[0] // self.batch)) \
            .view(-1, *[1] * (len(lead) - 1)).expand(lead).reshape(-1)
        chosen = None
        if needed is not None:
            sources = len(self.heads) // count
            wanted = needed.to(group_of.device).view(count, sources).any(1)
            chosen = structural(lambda: wanted[group_of].nonzero().flatten(),
                                "birth_scores: the attentions a row of per-component directions needs")
            group_of, image_of = group_of[chosen], image_of[chosen]
        g = _elements(adjoint, lead, chosen, leading=1)            # [k, E', Nq, d]
        if split.windows is None:  # by head: Σ value·G over each head's elements
            per_attention = (g * _elements(value.to(g.dtype), lead, chosen)).sum((-2, -1))       # [k, E']
        else:  # Σ_q A ⊙ (G Vᵀ): [k, E', Nk]
            weights = _elements(split.parts.weights.to(g.dtype), lead, chosen)
            values = _elements(split.parts.values.to(g.dtype), lead, chosen)
            per_attention = (torch.einsum("jeqd,ekd->jeqk", g, values) * weights).sum(-2)
        tail = per_attention.shape[2:]
        out = per_attention.new_zeros(per_attention.shape[0], count * self.batch, *tail)
        out.index_add_(1, group_of * self.batch + image_of, per_attention)
        out = out.view(-1, count, self.batch, *tail)                                   # [k, G, B, (Nk)]
        if split.windows is None:
            scores = out.permute(1, 2, 0)
        else:
            directions, keys = out.shape[0], tail[0]
            scores = out.view(directions, split.heads.count, windows, self.batch, keys) \
                .permute(1, 2, 4, 3, 0).reshape(-1, self.batch, directions)
        # a chosen attention computes all its sources: keep the needed ones
        return scores if needed is None else scores * needed.view(-1, 1, 1).to(scores)

    def _contracted(self, adjoint: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """Components ``values`` [K, *value] (default: the split's) against ``adjoint``, per image."""
        values = self.values if values is None else values
        values = values.movedim(1 + self.batch_axis, 1).reshape(values.shape[0], self.batch, -1)
        adjoint = adjoint.movedim(1 + self.batch_axis, 1).reshape(adjoint.shape[0], self.batch, -1)
        return torch.einsum("cbe,jbe->cbj", values.to(adjoint.dtype), adjoint)


def _elements(tensor: torch.Tensor, lead: torch.Size, chosen: torch.Tensor | None, leading: int = 0
              ) -> torch.Tensor:
    """``tensor`` [*leading axes, *broadcastable to lead, a, b] -> [*leading axes, E (or the chosen), a, b]."""
    shape = tensor.shape[:leading] + lead + tensor.shape[-2:]
    flat = tensor.expand(shape).reshape(*tensor.shape[:leading], -1, *tensor.shape[-2:])
    return flat if chosen is None else flat.index_select(leading, chosen)
