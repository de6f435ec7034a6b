"""Text banks: descriptions encoded with prompt templates, averaged and normalised, cached.

A description ``d`` is encoded as ``normalise(mean_t normalise(clip_text(t.format(d))))`` over
the templates ``t`` (CLIP's 80 ImageNet templates by default), as in CLIP's zero-shot
classifiers. Encodings are cached per (CLIP identity, templates, description): in memory,
and in a folder when one is given (one safetensors file per CLIP identity + templates).
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .clip_models import ClipModel

DATA = Path(__file__).parent / "data"
RAW = ("{}",)  # templates that leave a description as it is


@lru_cache(maxsize=None)
def imagenet_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompt templates, each with one ``{}``."""
    return tuple(json.loads((DATA / "imagenet_templates.json").read_text()))


def resolve_templates(templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"imagenet"`` / None -> the 80 templates; ``"raw"`` -> ``("{}",)``; else the given ones."""
    if templates is None or templates == "imagenet":
        return imagenet_templates()
    if templates == "raw":
        return RAW
    if isinstance(templates, str):
        raise ValueError(f"unknown template set {templates!r}: use 'imagenet', 'raw' or a list of strings with '{{}}'")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"every prompt template needs exactly one '{{}}' for the description; got {bad or 'none'}")
    return tuple(templates)


class TextEmbeddingCache:
    """Description embeddings [d_clip] keyed by (CLIP identity, templates, description).

    directory: where to persist them (None: this process only)
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._tables: dict[str, dict[str, torch.Tensor]] = {}  # table key -> description -> [d_clip]

    @staticmethod
    def table_key(identity: str, templates: Sequence[str]) -> str:
        return hashlib.sha1(json.dumps([identity, list(templates)]).encode()).hexdigest()[:20]

    def table(self, identity: str, templates: Sequence[str]) -> dict[str, torch.Tensor]:
        key = self.table_key(identity, templates)
        if key not in self._tables:
            self._tables[key] = self._read(key)
        return self._tables[key]

    def persist(self, identity: str, templates: Sequence[str]) -> None:
        if self.directory is None:
            return
        key = self.table_key(identity, templates)
        table = self.table(identity, templates)
        if not table:
            return
        texts = list(table)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{key}.safetensors"
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"embeddings": torch.stack([table[t] for t in texts]).contiguous()}, str(temporary),
                  metadata={"texts": json.dumps(texts), "identity": identity, "templates": json.dumps(list(templates))})
        os.replace(temporary, path)

    def _read(self, key: str) -> dict[str, torch.Tensor]:
        path = self.directory / f"{key}.safetensors" if self.directory is not None else None
        if path is None or not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as handle:
            texts = json.loads(handle.metadata()["texts"])
            embeddings = handle.get_tensor("embeddings")
        return dict(zip(texts, embeddings))


PROCESS_CACHE = TextEmbeddingCache()  # shared by calls that pass no cache


def encode_descriptions(clip: ClipModel, descriptions: Sequence[str], templates: str | Sequence[str] | None = None,
                        cache: TextEmbeddingCache | None = None, batch_size: int = 256) -> torch.Tensor:
    """Embeddings [T, d_clip] (float32, CPU, unit norm) of ``descriptions``, averaged over templates."""
    templates = resolve_templates(templates)
    cache = PROCESS_CACHE if cache is None else cache
    table = cache.table(clip.identity, templates)
    missing = list(dict.fromkeys(d for d in descriptions if d not in table))
    if missing:
        for description, embedding in zip(missing, _encode_with_templates(clip, missing, templates, batch_size)):
            table[description] = embedding
        cache.persist(clip.identity, templates)
    if not descriptions:
        return torch.zeros(0, clip.embed_dim)
    return torch.stack([table[d] for d in descriptions])


def _encode_with_templates(clip: ClipModel, descriptions: list[str], templates: tuple[str, ...],
                           batch_size: int) -> torch.Tensor:
    """[T, d_clip]: per description, the normalised mean of its normalised template encodings."""
    prompts = [template.format(d) for d in descriptions for template in templates]  # description-major
    encoded = torch.cat([clip.encode_texts(prompts[i:i + batch_size]).cpu()
                         for i in range(0, len(prompts), batch_size)])  # [T * templates, d_clip]
    per_description = encoded.view(len(descriptions), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(per_description, dim=-1)
