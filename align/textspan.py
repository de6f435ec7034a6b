"""TextSpan (Gandelsman et al.): describe one component by the texts that span its variation.

On a component's aligned outputs over images, mean-centred:

1. keep the top-``rank`` right singular vectors (the span the component actually uses) and
   project every text embedding onto that span; mean-centre the texts (drops the direction
   all CLIP texts share);
2. pick the text whose direction carries the largest variance of the data projected on it;
3. deflate: remove that text's direction from the data and from every text; repeat.

The variance explained by a pick is the drop in the data's total variance when its direction
is removed, as a fraction of the component's total variance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TextSpanResult:
    texts: list[str]                 # chosen texts, in order
    indices: list[int]               # their rows in the text bank
    variance_explained: list[float]  # fraction of the component's variance removed by each pick
    rank: int                        # dimension of the span the texts were projected onto

    @property
    def cumulative(self) -> list[float]:
        total, values = 0.0, []
        for value in self.variance_explained:
            total += value
            values.append(total)
        return values


def component_span(data: torch.Tensor, rank: int | None = None, energy: float = 0.99) -> torch.Tensor:
    """[r, d_clip] orthonormal top right singular vectors of centred data [N, d_clip].

    rank: number to keep; None: the fewest whose squared singular values reach ``energy``.
    """
    _, singular, right = torch.linalg.svd(data, full_matrices=False)
    if rank is None:
        share = singular.pow(2).cumsum(0) / singular.pow(2).sum().clamp_min(1e-300)
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
    return right[: min(rank, len(singular))]


def text_span(aligned: torch.Tensor, text_embeddings: torch.Tensor, texts: Sequence[str], count: int = 5,
              rank: int | None = None, centre_texts: bool = True) -> TextSpanResult:
    """Greedy text description of one component.

    aligned:         [N, d_clip] the component's aligned outputs a_i(x) over N images
    text_embeddings: [T, d_clip] the text bank's embeddings (``text_bank.encode_descriptions``)
    texts:           T strings
    """
    if len(texts) != len(text_embeddings):
        raise ValueError(f"{len(texts)} texts for {len(text_embeddings)} embeddings")
    data = aligned.double() - aligned.double().mean(0)                     # [N, d_clip]
    total_variance = float(data.pow(2).sum()) / len(data)
    if total_variance <= 0:
        raise ValueError("the component does not vary over these images: nothing to describe")
    span = component_span(data, rank)                                      # [r, d_clip]
    bank = text_embeddings.double() @ span.T @ span                        # [T, d_clip] projected on the span
    if centre_texts:
        bank = bank - bank.mean(0)
    chosen: list[int] = []
    explained: list[float] = []
    for _ in range(min(count, len(texts))):
        projected_variance = (data @ bank.T).var(0, unbiased=False)        # [T]
        if chosen:
            projected_variance[chosen] = -1
        pick = int(projected_variance.argmax())
        direction = bank[pick] / bank[pick].norm().clamp_min(1e-300)       # [d_clip]
        before = float(data.pow(2).sum())
        data = data - torch.outer(data @ direction, direction)
        bank = bank - torch.outer(bank @ direction, direction)
        chosen.append(pick)
        explained.append((before - float(data.pow(2).sum())) / len(data) / total_variance)
    return TextSpanResult([texts[i] for i in chosen], chosen, explained, len(span))
