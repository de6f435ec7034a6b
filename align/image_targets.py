"""CLIP image embeddings of the images behind a decomposition store: CompAlign's targets.

A store keeps image ids (paths relative to the folder it was made from), not the images;
``clip_image_targets`` reads them again with CLIP's own preprocessing and caches the
embeddings [N, d_clip] in a safetensors file keyed by the CLIP identity and the id list.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .clip_models import ClipModel


def _cache_file(directory: Path, clip: ClipModel, image_ids: Sequence[str]) -> Path:
    key = hashlib.sha1(json.dumps([clip.identity, list(image_ids)]).encode()).hexdigest()[:20]
    return directory / f"clip-image-embeddings-{key}.safetensors"


def clip_image_targets(clip: ClipModel, image_root: str | Path, image_ids: Sequence[str], batch_size: int = 64,
                       cache_dir: str | Path | None = None, progress: bool = True) -> torch.Tensor:
    """Normalised CLIP embeddings [N, d_clip] (float32, CPU) of ``image_root / id`` for each id."""
    from PIL import Image

    root = Path(image_root)
    cache = _cache_file(Path(cache_dir), clip, image_ids) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with safe_open(str(cache), framework="pt") as handle:
            return handle.get_tensor("embeddings")
    missing = [i for i in image_ids if not (root / i).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the store are not under {root} (first: {missing[0]}); "
                                "pass the folder the store was decomposed from")
    embeddings = []
    for start in tqdm(range(0, len(image_ids), batch_size), desc="clip images", disable=not progress):
        batch = []
        for image_id in image_ids[start:start + batch_size]:
            with Image.open(root / image_id) as image:
                batch.append(clip.preprocess(image.convert("RGB")))
        embeddings.append(clip.encode_images(torch.stack(batch)).cpu())
    targets = torch.cat(embeddings) if embeddings else torch.zeros(0, clip.embed_dim)  # [N, d_clip]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        save_file({"embeddings": targets.contiguous()}, str(temporary))
        os.replace(temporary, cache)
    return targets
