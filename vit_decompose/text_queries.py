"""What the application commands ask of CLIP's text side: a text direction (``--text``), class embeddings
(``--classes``), property bases (``--property``) and the components ordered for a property."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from align.clip_models import ClipModel
from align.compalign import CompAlign
from align.properties import property_descriptions
from align.scoring import rank_components
from align.store_analysis import property_bases, score_store
from align.text_bank import TextEmbeddingCache, encode_descriptions
from decompose import DecompositionStore

from .options import clip_for_aligner, templates, text_cache


def encode_texts(args, clip: ClipModel, texts: list[str], cache: TextEmbeddingCache) -> torch.Tensor:
    """[T, d_clip] embeddings of ``texts`` with the ``--templates``."""
    return encode_descriptions(clip, texts, templates(args.templates), cache)


def mean_direction(args, clip: ClipModel, texts: list[str], cache: TextEmbeddingCache) -> torch.Tensor:
    """Unit CLIP direction [d_clip]: the normalised mean of the embeddings of ``texts``."""
    return torch.nn.functional.normalize(encode_texts(args, clip, texts, cache).mean(0), dim=0)


def text_direction(args, aligner: CompAlign, device: torch.device) -> torch.Tensor:
    """Unit CLIP direction [d_clip] of the ``--text`` texts."""
    return mean_direction(args, clip_for_aligner(args, aligner, device), args.text, text_cache(args))


def class_embeddings(args, aligner: CompAlign, device: torch.device, classes: dict | None = None
                     ) -> tuple[list[str], torch.Tensor]:
    """Class names and unit CLIP directions [classes, d_clip] (the mean of each class's texts) of ``classes``
    {label: [text, ...]}, by default of the ``--classes`` file."""
    if classes is None:
        classes = json.loads(Path(args.classes).read_text())
        if not isinstance(classes, dict) or not classes:
            raise ValueError(f'{args.classes}: expected {{"label": ["text", ...]}}')
    clip = clip_for_aligner(args, aligner, device)
    cache = text_cache(args)
    rows = [mean_direction(args, clip, [texts] if isinstance(texts, str) else list(texts), cache)
            for texts in classes.values()]
    return [str(name) for name in classes], torch.stack(rows)


def chosen_properties(args, include_shipped: bool = True) -> dict[str, list[str]]:
    """property -> descriptions: the shipped ones (unless ``include_shipped=False``) and ``--properties``;
    ``--property`` must be one of them."""
    properties = property_descriptions(args.properties, include_shipped=include_shipped)
    if args.property not in properties:
        raise ValueError(f"unknown property {args.property!r}; known: {sorted(properties)} "
                         "(add your own with --properties FILE)")
    return properties


def property_bases_of(args, aligner: CompAlign, device: torch.device,
                      properties: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """property -> [r, d_clip] orthonormal basis of its description embeddings (CLIP is loaded once for all)."""
    clip = clip_for_aligner(args, aligner, device)
    return property_bases(clip, properties, templates(args.templates), text_cache(args))


def property_order(args, store: DecompositionStore, aligner: CompAlign, bases: dict[str, torch.Tensor]) -> list[int]:
    """Every component by its specific score for ``--property`` over the store (constants last)."""
    scorer = score_store(aligner, store, bases, batch_size=args.batch_size)
    ranking = rank_components(scorer.scores(), aligner.keys, args.property, constant=scorer.constant())
    return [row.index for row in ranking]
