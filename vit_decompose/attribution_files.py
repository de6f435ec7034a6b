"""``attribute``'s result files, grown batch by batch so that a killed run keeps every image already written:
``attribution.json`` is valid JSON after every batch (the closing ``]}`` is rewritten after the new records) and
``attribution.csv`` is appended to."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CSV_COLUMNS = ["image", "target", "kind", "rank", "item", "score"]   # kind: total | component | rest | position


class GrowingJson:
    """``{**header, "images": [record, ...]}`` at ``path``, one record a line; ``finish`` adds the summary's keys
    after the list."""

    def __init__(self, path: Path, header: dict):
        if not header:
            raise ValueError("the header of a growing JSON file must not be empty")
        self.path, self.count = path, 0
        self.end = self._write(json.dumps(header)[:-1] + ', "images": [', 0)

    def add(self, records: list[dict]) -> None:
        if records:
            text = ("," if self.count else "") + ",".join("\n " + json.dumps(r) for r in records)
            self.end = self._write(text, self.end)
            self.count += len(records)

    def finish(self, summary: dict) -> None:
        self._write("\n]" + (", " + json.dumps(summary)[1:-1] if summary else "") + "}\n", self.end, closing="")

    def _write(self, text: str, at: int, closing: str = "\n]}\n") -> int:
        """Write ``text`` at byte ``at``, then ``closing``; the end of ``text`` (where the next text goes)."""
        with open(self.path, "r+b" if at else "wb") as handle:
            handle.seek(at)
            handle.write(text.encode())
            end = handle.tell()
            handle.write(closing.encode())
            handle.truncate()
        return end


class AttributionFiles:
    """``attribution.json`` and ``attribution.csv`` in ``out``, started empty (an existing pair is replaced)."""

    def __init__(self, out: Path, header: dict):
        self.json = GrowingJson(out / "attribution.json", header)
        self.csv = out / "attribution.csv"
        with open(self.csv, "w", newline="") as handle:
            csv.writer(handle).writerow(CSV_COLUMNS)

    def add(self, records: list[dict]) -> None:
        """Per-image records: id, target, total, top_components, rest[, top_positions]."""
        self.json.add(records)
        with open(self.csv, "a", newline="") as handle:
            writer = csv.writer(handle)
            for record in records:
                writer.writerows(_csv_rows(record))

    def finish(self, summary: dict) -> None:
        self.json.finish(summary)


def target_text(target: dict) -> str:
    """A target record ({"class", "key", "name"} | {"text"} | {"vector"}) as one short text."""
    if "class" in target:
        return f"class {target['class']}" + (f" ({target['name']})" if "name" in target else "")
    return target["text"] if "text" in target else f"vector {target['vector']}"


def _csv_rows(record: dict) -> list[list]:
    image, target = record["id"], target_text(record["target"])
    rows = [[image, target, "total", "", "", record["total"]]]
    rows += [[image, target, "component", rank, c["component"], c["score"]]
             for rank, c in enumerate(record["top_components"], start=1)]
    rows.append([image, target, "rest", "", "", record["rest"]])
    rows += [[image, target, "position", rank, f"{p['row']},{p['col']}", p["score"]]
             for rank, p in enumerate(record.get("top_positions", []), start=1)]
    return rows
