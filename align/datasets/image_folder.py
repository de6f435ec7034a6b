"""ImageNet-style ``ImageFolder`` layouts: ``ROOT/CLASS/IMAGE`` (or ``ROOT/SPLIT/CLASS/IMAGE``), the class being
the folder an image sits in, and the class names that go with the folders (WordNet ids such as ``n01440764`` are
named from timm's shipped ImageNet metadata unless a names file is given)."""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath

SPLITS = ("train", "val", "test")
WORDNET_ID = re.compile(r"n\d{8}")


def image_folder_labels(image_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """{id: {"label": class folder[, "split": train | val | test]}}: the class is the folder holding the image; a
    split folder above it (``train/n01440764/x.JPEG``) gives the split."""
    table = {}
    for image_id in image_ids:
        parts = PurePosixPath(image_id).parts
        if len(parts) < 2:
            raise ValueError(f"image {image_id!r} is not inside a class folder; the ImageFolder layout is "
                             "ROOT/CLASS/IMAGE (the store's ids are paths relative to ROOT)")
        record = {"label": parts[-2]}
        if len(parts) >= 3 and parts[-3] in SPLITS:
            record["split"] = parts[-3]
        table[image_id] = record
    return table


def read_class_names(path: str | Path) -> dict[str, list[str]]:
    """folder -> names, from JSON ``{"n01440764": "tench"}`` (or a list of names per folder), or from text lines
    ``n01440764 tench, Tinca tinca`` (ImageNet's ``LOC_synset_mapping.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f'{path}: expected a JSON object {{"folder": "name" | ["name", ...]}}')
        return {str(k): [v] if isinstance(v, str) else [str(n) for n in v] for k, v in data.items()}
    names = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        folder, _, rest = line.strip().partition(" ")
        if not rest.strip():
            raise ValueError(f"{path}, line {number}: expected 'FOLDER name[, synonym ...]', got {line!r}")
        names[folder] = [n.strip() for n in rest.split(",") if n.strip()]
    return names


@lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo()


@lru_cache(maxsize=1)
def _imagenet_names() -> frozenset[str]:
    return frozenset(_imagenet_info().label_names())


def class_texts(folders: Sequence[str], names: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """folder -> the texts naming its class: from ``names``, else timm's ImageNet description for a WordNet id
    (its first synonym), else the folder name with ``_`` as spaces."""
    texts = {}
    for folder in folders:
        if names and folder in names:
            texts[folder] = list(names[folder])
        elif WORDNET_ID.fullmatch(folder) and folder in _imagenet_names():
            texts[folder] = [_imagenet_info().label_name_to_description(folder).split(",")[0].strip()]
        else:
            texts[folder] = [folder.replace("_", " ")]
    return texts
