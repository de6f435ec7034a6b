"""``vit-decompose retrieve | heatmap | segment | ablate | debias``: the applications on a decomposition store.

    vit-decompose retrieve --store STORE --aligner ALIGNER --text "a red object" [--property colour --components 3]
    vit-decompose retrieve --store STORE --aligner ALIGNER --query IMAGE_ID --property colour --components 3
    vit-decompose retrieve --store STORE --aligner ALIGNER --query IMAGE_ID --property colour --components 99 --within-property
    vit-decompose heatmap  --store TOKEN_STORE --aligner ALIGNER --text "a dog" --images DIR --out DIR
    vit-decompose segment  --store TOKEN_STORE --aligner ALIGNER --text "a dog" --masks masks.json
    vit-decompose ablate   --store STORE --labels labels.csv --out DIR [--aligner ALIGNER --classes classes.json]
    vit-decompose debias   --store STORE --aligner ALIGNER --groups groups.csv --spurious "water" --core "a bird"

Files keyed by image id (the store's ids: paths relative to the image folder it was made from):

* labels / groups: CSV with a header (``id,label[,group][,split]``) or JSON
  ``{"id": {"label": ..., "group": ..., "split": ...}}`` (``{"id": "label"}`` for labels alone);
  ``split`` is ``train``, ``val`` or ``test``.
* masks: CSV ``id,mask`` or JSON ``{"id": "masks/x.png"}``; mask paths relative to the file's
  folder, nonzero pixels are the object. Masks (and images) are brought to what the model saw
  with the store's own resize / crop.
* classes: JSON ``{"label": ["a photo of a bird", ...]}`` for a zero-shot CLIP classifier on the
  aligned representation; without it a linear probe is fitted on the ``train`` split.

Heatmaps need token-level stores whose components know their grid positions. A store that
does not record them gets them from the model: ``--model NAME [--model-kwargs JSON]
[--checkpoint FILE]`` (one token-level decomposition of one image).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

APPLICATIONS_HELP = __doc__   # the description of every application command


def read_table(path: str | Path, value_field: str = "label") -> dict[str, dict[str, Any]]:
    """CSV (header with ``id``) or JSON ``{id: value | {field: value}}`` -> {id: {field: value}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by image id")
        return {str(k): (dict(v) if isinstance(v, dict) else {value_field: v}) for k, v in data.items()}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "id" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV header with an 'id' column (id,{value_field},...)")
    return {row["id"]: {k: v for k, v in row.items() if k != "id"} for row in rows}
