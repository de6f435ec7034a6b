"""Properties as lists of text descriptions (colour, texture, animal, ... as shipped; or your own).

Shipped lists live in ``align/data/properties.json``: short noun phrases that read well
inside CLIP's ImageNet templates ("a photo of a {}."). Your own come as a mapping
``{property: [descriptions]}`` or a JSON file of that shape; they extend or replace the
shipped ones with the same name.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

DATA = Path(__file__).parent / "data"


@lru_cache(maxsize=None)
def _shipped() -> dict[str, tuple[str, ...]]:
    return {name: tuple(texts) for name, texts in json.loads((DATA / "properties.json").read_text()).items()}


def shipped_properties() -> dict[str, list[str]]:
    """The shipped property -> descriptions lists (colour, texture, animal, person, location,
    pattern, shape, fabric, vehicle)."""
    return {name: list(texts) for name, texts in _shipped().items()}


def read_properties(source: str | Path | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Validate user properties given as a mapping or a JSON file ``{name: [descriptions]}``."""
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"properties file {path} does not exist")
        try:
            source = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"properties file {path} is not valid JSON: {error}") from error
    if not isinstance(source, Mapping):
        raise ValueError('properties must be a JSON object {"property": ["description", ...]}')
    properties: dict[str, list[str]] = {}
    for name, texts in source.items():
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"property {name!r} needs a non-empty list of description strings")
        properties[str(name)] = list(texts)
    return properties


def property_descriptions(extra: str | Path | Mapping[str, Sequence[str]] | None = None,
                          include_shipped: bool = True) -> dict[str, list[str]]:
    """Shipped properties (unless ``include_shipped=False``) updated with ``extra``."""
    properties = shipped_properties() if include_shipped else {}
    if extra is not None:
        properties.update(read_properties(extra))
    if not properties:
        raise ValueError("no properties: pass your own or keep the shipped ones")
    return properties
