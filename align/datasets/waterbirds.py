"""Waterbirds (Sagawa et al.): ``ROOT/metadata.csv`` with one row per image.

Columns used: ``img_filename`` (path relative to ROOT), ``y`` (0 landbird, 1 waterbird), ``place`` (0 land,
1 water background) and ``split`` (0 train, 1 val, 2 test); the others (``img_id``, ``place_filename``) are
ignored. Groups are y × place: the spurious correlation makes "waterbird on land" and "landbird on water" rare.
"""
from __future__ import annotations

import csv
from pathlib import Path

WATERBIRDS_COLUMNS = ("img_filename", "y", "place", "split")
LABELS = {"0": "landbird", "1": "waterbird"}
PLACES = {"0": "land", "1": "water"}
SPLITS = {"0": "train", "1": "val", "2": "test"}


def _value(row: dict, column: str, names: dict[str, str], path: Path, line: int) -> str:
    raw = str(row[column]).strip()
    key = raw[:-2] if raw.endswith(".0") else raw        # pandas writes floats when a column had NaNs
    if key not in names:
        raise ValueError(f"{path}, line {line}: {column}={raw!r}; expected one of {sorted(names)}")
    return names[key]


def read_waterbirds(root: str | Path) -> dict[str, dict[str, str]]:
    """{img_filename: {"label": landbird | waterbird, "place": land | water, "group": "<label> on <place>",
    "split": train | val | test}} from ``root/metadata.csv`` (or the CSV file itself)."""
    root = Path(root)
    path = root / "metadata.csv" if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; --waterbirds takes the dataset folder holding metadata.csv "
                                "(e.g. waterbird_complete95_forest2water2/)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in WATERBIRDS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not Waterbirds metadata: it lacks the columns {missing} (found "
                             f"{reader.fieldnames}; expected {list(WATERBIRDS_COLUMNS)})")
        table = {}
        for line, row in enumerate(reader, start=2):
            label = _value(row, "y", LABELS, path, line)
            place = _value(row, "place", PLACES, path, line)
            table[row["img_filename"].strip()] = {"label": label, "place": place, "group": f"{label} on {place}",
                                                  "split": _value(row, "split", SPLITS, path, line)}
    if not table:
        raise ValueError(f"{path} has a header but no rows")
    return table
