"""Pictures: heatmap overlays and line plots as PNG files (Pillow), and heatmap overlays as a matplotlib figure
for notebooks (``heatmap_figure``)."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

# a perceptual blue -> yellow ramp (viridis' end and middle points), interpolated linearly
RAMP = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32)
LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def colourise(values: torch.Tensor) -> torch.Tensor:
    """[H, W] in [0, 1] -> uint8 RGB [H, W, 3] along ``RAMP``."""
    position = values.clamp(0, 1) * (len(RAMP) - 1)
    low = position.floor().long().clamp(max=len(RAMP) - 2)
    fraction = (position - low).unsqueeze(-1)
    return (RAMP[low] * (1 - fraction) + RAMP[low + 1] * fraction).round().to(torch.uint8)


def heatmap_overlay(image: torch.Tensor | None, heatmap: torch.Tensor, alpha: float = 0.5):
    """PIL RGB image: ``heatmap`` [H, W] (min-max scaled) over ``image`` [3, H, W] in [0, 1] (None: heatmap alone)."""
    from PIL import Image

    heatmap = heatmap.detach().float().cpu()
    span = (heatmap.max() - heatmap.min()).clamp_min(1e-12)
    colours = colourise((heatmap - heatmap.min()) / span).float()
    if image is not None:
        picture = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0) * 255
        if picture.shape[:2] != colours.shape[:2]:
            raise ValueError(f"image {tuple(picture.shape[:2])} and heatmap {tuple(colours.shape[:2])} differ in size")
        colours = (1 - alpha) * picture + alpha * colours
    return Image.fromarray(colours.round().clamp(0, 255).to(torch.uint8).numpy(), "RGB")


def line_plot(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path, x_label: str = "",
              y_label: str = "", size: tuple[int, int] = (640, 420)) -> Path:
    """A small line plot PNG (axes with min / max ticks, one coloured line per series, a legend)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 20, 50
    picture = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(picture)
    values = [v for ys in series.values() for v in ys if not math.isnan(v)]
    x_low, x_high = min(x), max(x)
    y_low, y_high = (min(values), max(values)) if values else (0.0, 1.0)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    x_span = x_high - x_low if x_high > x_low else 1.0

    def point(a: float, b: float) -> tuple[float, float]:
        return (left + (a - x_low) / x_span * (width - left - right),
                height - bottom - (b - y_low) / (y_high - y_low) * (height - top - bottom))

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for value, anchor in ((y_low, height - bottom), (y_high, top)):
        draw.text((4, anchor - 6), f"{value:.3g}", fill="black")
    for value in (x_low, x_high):
        draw.text((point(value, y_low)[0] - 8, height - bottom + 6), f"{value:g}", fill="black")
    draw.text((width // 2 - 3 * len(x_label), height - 20), x_label, fill="black")
    draw.text((4, 4), y_label, fill="black")
    for number, (name, ys) in enumerate(series.items()):
        colour = LINE_COLOURS[number % len(LINE_COLOURS)]
        points = [point(a, b) for a, b in zip(x, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((width - right - 160, top + 14 * number), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def heatmap_figure(images: torch.Tensor | None, heatmaps: torch.Tensor, titles: Sequence[str] | None = None,
                   alpha: float = 0.5, cmap: str = "viridis", columns: int = 4):
    """matplotlib Figure: each heatmap [B, H, W] over its image [B, 3, H, W] in [0, 1] (None: heatmaps alone),
    one panel per image, with a colour bar of the heatmap's own values."""
    from matplotlib.figure import Figure

    heatmaps = heatmaps.detach().float().cpu()
    if heatmaps.dim() == 2:
        heatmaps = heatmaps.unsqueeze(0)
    if images is not None:
        images = images.detach().float().cpu()
        images = images.unsqueeze(0) if images.dim() == 3 else images
        if images.shape[0] != heatmaps.shape[0] or images.shape[-2:] != heatmaps.shape[-2:]:
            raise ValueError(f"images {tuple(images.shape)} and heatmaps {tuple(heatmaps.shape)} do not match "
                             "([B, 3, H, W] and [B, H, W])")
    count = heatmaps.shape[0]
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(3 * columns, 3 * rows), layout="constrained")
    for k in range(count):
        ax = figure.add_subplot(rows, columns, k + 1)
        if images is not None:
            ax.imshow(images[k].clamp(0, 1).permute(1, 2, 0).numpy())
        shown = ax.imshow(heatmaps[k].numpy(), cmap=cmap, alpha=alpha if images is not None else 1.0)
        figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    return figure
