"""Retrieval with respect to a property, from selected components.

* Text-based: images ranked by ⟨Σ_{i∈S} a_i(x), t⟩ with a_i the CompAlign-mapped components
  and t a text embedding; S the components selected for a property (e.g. its top-3 by
  score) or all of them (the full representation, up to the aligner's constant bias).
* Image-based: candidates ranked by the cosine between the summed selected components
  (mapped or raw) of the query image and of each candidate: images that share the
  property's factor with the query rank first, whatever else they share. Optionally the sums
  are compared inside the property's text subspace only (``subspace``): a property spread over
  many components has no small set of components to itself, but each component's part along
  the property's texts does.
* ``choose_retrieval`` picks, on labelled validation images, how many of the top components
  to sum and whether to compare inside the subspace.

Shapes: components / aligned [C, N, D]; scores [N] or [Q, N]; relevance bool like scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def selected_sum(components: torch.Tensor, selected: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] Σ_{i∈S} components[i] over components [C, N, *D] (S = all when ``selected`` is None)."""
    if selected is None:
        return components.flatten(2).sum(0)
    index = torch.as_tensor(list(selected) if not torch.is_tensor(selected) else selected, dtype=torch.long)
    if index.numel() == 0:
        raise ValueError("no component selected")
    return components.flatten(2).index_select(0, index.to(components.device)).sum(0)


def top_components(scores: torch.Tensor, count: int, constant: torch.Tensor | None = None) -> list[int]:
    """The ``count`` components with the highest ``scores`` [C] (``constant`` bool [C] ones excluded)."""
    ranking = scores.double().clone()
    if constant is not None:
        ranking[constant.bool()] = -torch.inf
    return ranking.argsort(descending=True, stable=True)[:count].tolist()


def text_retrieval_scores(aligned: torch.Tensor, text: torch.Tensor,
                          selected: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """⟨Σ_{i∈S} a_i(x), t⟩: [N] for one text [d_clip], [T, N] for texts [T, d_clip]."""
    summed = selected_sum(aligned, selected)                             # [N, d_clip]
    scores = text.to(summed) @ summed.T if text.dim() == 2 else summed @ text.to(summed)
    return scores


def image_retrieval_scores(features: torch.Tensor, queries: Sequence[int] | torch.Tensor,
                           selected: Sequence[int] | torch.Tensor | None = None,
                           exclude_queries: bool = True, centre: bool = True,
                           subspace: torch.Tensor | None = None) -> torch.Tensor:
    """[Q, N] cosine between Σ_{i∈S} features_i of each query image and of every image.

    features: [C, N, D] components (raw or mapped); queries: Q image indices; the other
    options as in ``summed_retrieval_scores``.
    """
    return summed_retrieval_scores(selected_sum(features, selected), queries, exclude_queries, centre, subspace)


def summed_retrieval_scores(summed: torch.Tensor, queries: Sequence[int] | torch.Tensor,
                            exclude_queries: bool = True, centre: bool = True,
                            subspace: torch.Tensor | None = None) -> torch.Tensor:
    """[Q, N] cosine between the summed features [N, D] of each query image and of every image.

    A query's own column is set to -inf (``exclude_queries``), so it never retrieves itself.
    ``centre`` subtracts the mean over the N images first: what every image shares (biases, a
    component's average) would otherwise dominate the cosine. subspace: orthonormal rows
    [r, D] (``property_basis`` of a property's text embeddings): the sums are compared by
    their coordinates in that span only, so variation outside the property does not count.
    """
    summed = summed.double()                                                                  # [N, D]
    if subspace is not None:
        summed = summed @ subspace.to(summed).T                                               # [N, r]
    if centre:
        summed = summed - summed.mean(0)
    summed = torch.nn.functional.normalize(summed, dim=-1)
    query_index = torch.as_tensor(list(queries) if not torch.is_tensor(queries) else queries, dtype=torch.long)
    similarity = summed[query_index.to(summed.device)] @ summed.T                             # [Q, N]
    if exclude_queries:
        similarity[torch.arange(len(query_index)), query_index] = -torch.inf
    return similarity


@dataclass
class RetrievalChoice:
    count: int                  # the top ``count`` components of the order are summed
    projected: bool             # compared inside the property's subspace
    precision: float            # precision@k on the validation images


def choose_retrieval(features: torch.Tensor, order: Sequence[int], relevant: torch.Tensor,
                     subspace: torch.Tensor | None = None, k: int = 10) -> RetrievalChoice:
    """The selection (top-``count`` of ``order``, with or without ``subspace``) whose image retrieval
    has the highest precision@k on labelled validation images, every image querying the others.

    features: [C, N, D] of the validation images only (never the test images); order: eligible
    component rows, most tied to the property first; relevant: bool [N, N], image m shares the
    property's value with query n (the diagonal is ignored); subspace: orthonormal rows [r, D].
    Ties go to fewer components, then to the whole space.
    """
    if len(order) == 0:
        raise ValueError("no component to choose from")
    features = features.flatten(2)                                                            # [C, N, D]
    queries = list(range(features.shape[1]))
    spaces = [None] if subspace is None else [None, subspace]
    summed = torch.zeros(features.shape[1:], dtype=torch.float64, device=features.device)    # [N, D]
    best = None
    for count, row in enumerate(order, start=1):
        summed += features[row].double()                                                      # the top ``count``
        for space in spaces:
            precision = precision_at_k(summed_retrieval_scores(summed, queries, subspace=space), relevant, k)
            if best is None or precision > best.precision:
                best = RetrievalChoice(count, space is not None, precision)
    return best


def ranked(scores: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Indices of the highest ``scores`` first ([N] -> [k], [Q, N] -> [Q, k])."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    return order if count is None else order[..., :count]


def precision_at_k(scores: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Mean over queries of the fraction of relevant items among the top ``k`` of ``scores`` ([N] or [Q, N])."""
    if scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevance {tuple(relevant.shape)} differ in shape")
    scores, relevant = scores.reshape(-1, scores.shape[-1]), relevant.reshape(-1, relevant.shape[-1]).bool()
    k = min(k, scores.shape[-1])
    top = ranked(scores, k)                                                                    # [Q, k]
    return float(relevant.gather(1, top.to(relevant.device)).double().mean())


def shares_value(values: Sequence, queries: Sequence[int]) -> torch.Tensor:
    """bool [Q, N]: image n has the same factor value as query q (ground-truth relevance)."""
    codes = {v: i for i, v in enumerate(dict.fromkeys(values))}
    encoded = torch.tensor([codes[v] for v in values])
    return encoded[list(queries)].unsqueeze(1) == encoded.unsqueeze(0)
