"""A self-contained HTML page: sections of tables, inline SVG bar and line charts, PNG images and colour scales.

Everything is embedded (PNG as data URIs, charts as SVG), so the file opens anywhere offline. The section
builders of ``sections`` write into it; the toy-world demo and ``vit-decompose report`` both render one.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1.5em;color:#222;line-height:1.4}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em} h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0 1em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td.text,th.text{text-align:left} .scroll{overflow-x:auto}
.pass{color:#176b2c;font-weight:600} .fail{color:#a4161a;font-weight:600}
figure{display:inline-block;margin:.3em;vertical-align:top;text-align:center;font-size:.8em}
figure img{image-rendering:pixelated;border:1px solid #ccc}
nav a{margin-right:1em}
.scale{display:inline-block;width:8em;height:.8em;vertical-align:middle;border:1px solid #ccc;margin:0 .4em}
"""
TEXT_CLASS = " class='text'"     # a left-aligned cell


def rgb_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3] of an RGB image [H, W, 3] (uint8, or float in [0, 1])."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array


def thumbnail(image: np.ndarray | torch.Tensor, largest_side: int) -> np.ndarray:
    """uint8 [h, w, 3]: the image shrunk (bilinear) so that its larger side is at most ``largest_side``."""
    from PIL import Image

    array = rgb_array(image)
    height, width = array.shape[:2]
    factor = largest_side / max(height, width)
    if factor >= 1:
        return array
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))


def png_data_uri(image: np.ndarray | torch.Tensor) -> str:
    """``data:`` URI of an RGB image [H, W, 3] (uint8, or float in [0, 1])."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb_array(image)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Titled:
    """A table cell's text with a longer form shown on hover (e.g. a readable name over its exact key)."""

    text: str
    title: str


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating))


def _cell(value, numeric: bool) -> str:
    """One ``<td>``; ``numeric``: its column holds numbers (right-aligned), else text (left-aligned)."""
    align = "" if numeric else TEXT_CLASS
    if isinstance(value, Titled):
        return f"<td{align} title='{html.escape(value.title)}'>{html.escape(value.text)}</td>"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        text = f"{value:.3g}" if abs(value) < 1e-3 and value != 0 else f"{value:.3f}"
        return f"<td{align}>{text}</td>"
    return f"<td{align}>{html.escape(str(value))}</td>"


def numeric_columns(rows: Sequence[Sequence], columns: int) -> list[bool]:
    """Per column: does it hold numbers (every non-empty cell a number, at least one)?"""
    filled = [[row[k] for row in rows if k < len(row) and str(row[k]) != ""] for k in range(columns)]
    return [bool(cells) and all(_is_number(v) for v in cells) for cells in filled]


def nice_ticks(low: float, high: float, most: int = 6, whole: bool = False) -> list[float]:
    """At most ``most`` + 1 round values (steps of 1, 2 or 5 × 10^k; ``whole``: at least 1) from ``low`` to
    ``high``, both inside."""
    if high <= low:
        return [low]
    rough = max((high - low) / most, 1) if whole else (high - low) / most
    power = 10 ** math.floor(math.log10(rough))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= rough)
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]


class Report:
    """Append sections, then ``render()``. Section ids are stable (tests look for them)."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, str, list[str]]] = []

    def section(self, section_id: str, title: str) -> None:
        self.sections.append((section_id, title, []))

    def _add(self, fragment: str) -> None:
        if not self.sections:
            raise RuntimeError("start a section first")
        self.sections[-1][2].append(fragment)

    def heading(self, text: str) -> None:
        self._add(f"<h3>{html.escape(text)}</h3>")

    def paragraph(self, text: str) -> None:
        self._add(f"<p>{html.escape(text)}</p>")

    def verdict(self, claim: str, holds: bool, detail: str = "") -> None:
        """One claim checked against ground truth, stated plainly either way."""
        word, style = ("holds", "pass") if holds else ("does NOT hold", "fail")
        self._add(f"<p><span class='{style}'>{word}</span>: {html.escape(claim)}"
                  f"{' (' + html.escape(detail) + ')' if detail else ''}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        """A table whose columns of numbers are right-aligned (header included) and all others left-aligned; it
        scrolls sideways inside its own box when wider than the page. A ``Titled`` cell shows its title on hover."""
        numeric = numeric_columns(rows, max([len(header), *(len(row) for row in rows)]))
        head = "".join(f"<th{'' if numeric[k] else TEXT_CLASS}>{html.escape(str(h))}</th>"
                       for k, h in enumerate(header))
        body = "".join("<tr>" + "".join(_cell(v, numeric[k]) for k, v in enumerate(row)) + "</tr>" for row in rows)
        self._add(f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>")

    def colour_scale(self, colours: Sequence[Sequence[int]], low: str, high: str, note: str = "") -> None:
        """A one-line legend: ``low`` [colour bar through ``colours`` (RGB 0-255, evenly spaced)] ``high``, note."""
        stops = ",".join(f"rgb({r},{g},{b})" for r, g, b in colours)
        self._add(f"<p class='legend'>{html.escape(low)}<span class='scale' role='img' aria-label='colour scale' "
                  f"style='background:linear-gradient(to right,{stops})'></span>{html.escape(high)}"
                  f"{' — ' + html.escape(note) if note else ''}</p>")

    def bar_chart(self, title: str, names: Sequence[str], values: Sequence[float], width: int = 520) -> None:
        """Horizontal bars (SVG); negative values extend left of the axis."""
        bar, gap, label_width = 16, 4, 200
        low, high = min(0.0, *values), max(0.0, *values)
        span = (high - low) or 1.0
        scale = (width - label_width - 60) / span
        axis = label_width + (-low) * scale
        height = len(values) * (bar + gap) + 24
        parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
                 f"<title>{html.escape(title)}</title>",
                 f"<text x='0' y='12' font-size='12' font-weight='600'>{html.escape(title)}</text>"]
        for i, (name, value) in enumerate(zip(names, values)):
            y = 20 + i * (bar + gap)
            x0, x1 = sorted((axis, axis + value * scale))
            colour = "#3a6ea5" if value >= 0 else "#c05746"
            parts += [(f"<text x='{label_width - 6}' y='{y + 12}' font-size='11' text-anchor='end'>"
                      f"{html.escape(name)}</text>"),
                      f"<rect x='{x0:.1f}' y='{y}' width='{max(x1 - x0, 0.5):.1f}' height='{bar}' fill='{colour}'/>",
                      f"<text x='{x1 + 4:.1f}' y='{y + 12}' font-size='10'>{value:.3f}</text>"]
        parts.append(f"<line x1='{axis:.1f}' y1='18' x2='{axis:.1f}' y2='{height}' stroke='#444'/></svg>")
        self._add("".join(parts))

    def line_chart(self, title: str, xs: Sequence[float], series: dict[str, Sequence[float]], x_label: str,
                   y_label: str, width: int = 520, height: int = 260, y_max: float | None = None) -> None:
        """Lines (SVG) sharing one x axis, with round-valued ticks on both axes and each series named at its last
        point; y from 0 to ``y_max`` (default: the largest value)."""
        names = list(series)
        left, bottom, top = 58, 44, 30
        right = 14 + 7 * max((len(name) for name in names), default=0)
        x_low, x_high = min(xs), max(xs)
        y_high = y_max or max(max(v) for v in series.values()) or 1.0
        px = lambda x: left + (x - x_low) / ((x_high - x_low) or 1) * (width - left - right)
        py = lambda y: height - bottom - y / y_high * (height - bottom - top)
        base, middle = height - bottom, (top + height - bottom) / 2
        colours = ["#3a6ea5", "#c05746", "#4f9d69", "#8c6bb1", "#d9a21b"]
        parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
                 f"<title>{html.escape(title)}</title>",
                 f"<text x='0' y='14' font-size='12' font-weight='600'>{html.escape(title)}</text>",
                 f"<line x1='{left}' y1='{base}' x2='{width - right}' y2='{base}' stroke='#444'/>",
                 f"<line x1='{left}' y1='{top}' x2='{left}' y2='{base}' stroke='#444'/>",
                 (f"<text x='{(width - right + left) / 2}' y='{height - 6}' font-size='11' text-anchor='middle'>"
                  f"{html.escape(x_label)}</text>"),
                 (f"<text x='12' y='{middle}' font-size='11' text-anchor='middle' "
                  f"transform='rotate(-90 12 {middle})'>{html.escape(y_label)}</text>")]
        for x in nice_ticks(x_low, x_high, whole=all(float(x).is_integer() for x in xs)):
            parts += [f"<line x1='{px(x):.1f}' y1='{base}' x2='{px(x):.1f}' y2='{base + 4}' stroke='#444'/>",
                      (f"<text class='tick' x='{px(x):.1f}' y='{base + 16}' font-size='10' text-anchor='middle'>"
                       f"{x:g}</text>")]
        for y in nice_ticks(0.0, y_high, most=4):
            parts += [f"<line x1='{left - 4}' y1='{py(y):.1f}' x2='{left}' y2='{py(y):.1f}' stroke='#444'/>",
                      f"<line x1='{left}' y1='{py(y):.1f}' x2='{width - right}' y2='{py(y):.1f}' stroke='#eee'/>",
                      (f"<text class='tick' x='{left - 6}' y='{py(y) + 3.5:.1f}' font-size='10' text-anchor='end'>"
                       f"{y:g}</text>")]
        label_ys: list[float] = []
        for i, (name, values) in enumerate(series.items()):
            colour = colours[i % len(colours)]
            points = [(px(x), py(y)) for x, y in zip(xs, values)]
            label_ys.append(points[-1][1] + 4 if points else top)
            parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' "
                         f"points='{' '.join(f'{a:.1f},{b:.1f}' for a, b in points)}'/>")
        order = sorted(range(len(names)), key=label_ys.__getitem__)
        for above, below in pairwise(order):                         # names at least 12 px apart
            label_ys[below] = max(label_ys[below], label_ys[above] + 12)
        for i, name in enumerate(names):
            parts.append(f"<text class='series' x='{width - right + 6}' y='{label_ys[i]:.1f}' font-size='11' "
                         f"fill='{colours[i % len(colours)]}'>{html.escape(name)}</text>")
        self._add("".join(parts) + "</svg>")

    def figures(self, items: Sequence[tuple[np.ndarray | torch.Tensor, str]], scale: int = 2,
                largest_side: int | None = None) -> None:
        """A row of PNG images with captions (shown ``scale`` times their pixel size; ``largest_side``: images
        are first shrunk to at most that many pixels)."""
        parts = []
        for image, caption in items:
            if largest_side is not None:
                image = thumbnail(image, largest_side)
            height, width = image.shape[:2]
            parts.append(f"<figure><img src='{png_data_uri(image)}' width='{width * scale}' "
                         f"height='{height * scale}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        self._add("<div>" + "".join(parts) + "</div>")

    def render(self) -> str:
        nav = "".join(f"<a href='#{sid}'>{html.escape(title)}</a>" for sid, title, _ in self.sections)
        body = "".join(f"<section id='{sid}'><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"
                       for sid, title, parts in self.sections)
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1><nav>{nav}</nav>{body}"
                "</body></html>")
