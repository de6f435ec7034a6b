"""A decomposition store seen through an aligner: property scores and TextSpan descriptions.

Glue between ``DecompositionStore`` (components on disk), ``CompAlign`` (maps into CLIP
space), ``text_bank`` (text embeddings), ``scoring`` and ``textspan``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from decompose import DecompositionStore

from .alignment_data import store_component_batches, store_component_rows
from .clip_models import ClipModel
from .compalign import CompAlign
from .scoring import PropertyScorer, property_basis
from .text_bank import TextEmbeddingCache, encode_descriptions
from .textspan import TextSpanResult, text_span


def property_bases(clip: ClipModel, properties: Mapping[str, Sequence[str]], templates=None,
                   cache: TextEmbeddingCache | None = None) -> dict[str, torch.Tensor]:
    """property -> orthonormal basis [k_p, d_clip] of its encoded descriptions."""
    return {name: property_basis(encode_descriptions(clip, list(texts), templates, cache))
            for name, texts in properties.items()}


@torch.no_grad()
def score_store(aligner: CompAlign, store: DecompositionStore, bases: Mapping[str, torch.Tensor],
                batch_size: int = 64, max_images: int | None = None,
                progress: bool = True) -> PropertyScorer:
    """A ``PropertyScorer`` fed with every image of the store (refuses a mismatching aligner).

    Its ``scores()`` / ``variance_explained()`` give property -> [C], ``constant()`` bool [C].
    """
    aligner.check_matches(store.manifest.get("model", ""), store.level, store.labels)
    scorer = PropertyScorer(bases)
    total = len(store) if max_images is None else min(max_images, len(store))
    with tqdm(total=total, desc="score", unit="img", disable=not progress) as bar:
        for components in store_component_batches(store, batch_size, max_images):
            scorer.update(aligner.map_components(components.to(aligner.weights.device)))  # [C, b, d_clip]
            bar.update(components.shape[1])
    return scorer


@torch.no_grad()
def describe_store_component(aligner: CompAlign, store: DecompositionStore, key: str, clip: ClipModel,
                             texts: Sequence[str], count: int = 5, rank: int | None = None, templates=None,
                             cache: TextEmbeddingCache | None = None) -> TextSpanResult:
    """TextSpan of component ``key`` over the store's images, choosing among ``texts``."""
    aligner.check_matches(store.manifest.get("model", ""), store.level, store.labels)
    if key not in aligner.keys:
        close = [k for k in aligner.keys if key in k or k in key][:5]
        raise ValueError(f"no component {key!r}; similar keys: {close or aligner.keys[:5]}")
    index = aligner.keys.index(key)
    device = aligner.weights.device
    aligned = aligner.map_component(index, store_component_rows(store, index).to(device))  # [N, d_clip]
    embeddings = encode_descriptions(clip, list(texts), templates, cache)                  # [T, d_clip]
    return text_span(aligned.cpu(), embeddings, list(texts), count=count, rank=rank)


@torch.no_grad()
def store_sum_errors(store: DecompositionStore, progress: bool = False) -> torch.Tensor:
    """[N] per image ‖Σ_i c_i − r‖ / ‖r‖ over the store's stored components (in their storage dtype)."""
    errors = []
    with tqdm(total=len(store), desc="additivity", unit="img", disable=not progress) as bar:
        for components, representation, _ in store.iter_shards():
            difference = (components.sum(0) - representation).flatten(1).double().norm(dim=1)
            errors.append(difference / representation.flatten(1).double().norm(dim=1).clamp_min(1e-300))
            bar.update(len(representation))
    return torch.cat(errors)


@torch.no_grad()
def store_scores_along(aligner: CompAlign, store: DecompositionStore, key: str, direction: torch.Tensor
                       ) -> torch.Tensor:
    """[N] ⟨a_i(x), t⟩ of component ``key`` over the store's images, for a CLIP direction ``direction`` [d_clip]."""
    aligner.check_matches(store.manifest.get("model", ""), store.level, store.labels)
    index = aligner.keys.index(key)
    device = aligner.weights.device
    aligned = aligner.map_component(index, store_component_rows(store, index).to(device))   # [N, d_clip]
    return (aligned @ direction.to(aligned)).cpu()
