"""Section builders shared by every report (the toy-world demo and ``vit-decompose report``): each writes one
kind of finding into a ``Report`` from plain records, so both pages draw rankings, TextSpan descriptions,
top images, heatmaps, additivity and ablation curves the same way."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..ablation import AblationCurve
from ..drawing import RAMP, heatmap_overlay
from ..scoring import RankedComponent
from .page import Report

Picture = np.ndarray | torch.Tensor   # [H, W, 3] uint8, or float in [0, 1]


@dataclass
class AdditivityRow:
    model: str
    components: int                 # at the level of the head-level (or coarsest) decomposition
    errors: dict[str, float]        # level -> largest per-image relative error ‖Σ c − r‖ / ‖r‖


@dataclass
class DescribedComponent:
    model: str
    property: str
    key: str
    texts: list[tuple[str, float]]  # TextSpan picks: (text, share of the component's variance)


@dataclass
class TopImages:
    key: str                        # the component
    property: str                   # the property it ranks high for
    along: str                      # the text direction the images are scored along
    images: list[tuple[Picture, str]]


@dataclass
class HeatmapRow:
    image: torch.Tensor                                             # [3, H, W] in [0, 1]
    caption: str
    maps: list[tuple[torch.Tensor, str]]                            # ([H, W] heatmap, caption) overlays
    extras: list[tuple[Picture, str]] = field(default_factory=list)  # shown after the image (e.g. a mask)


@dataclass
class AblationRecord:
    model: str
    curve: AblationCurve
    classifier: str                 # what classifies the (ablated) representation


def overlay(image: torch.Tensor, heatmap: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3]: the min-max scaled heatmap [H, W] over the image [3, H, W]."""
    return np.asarray(heatmap_overlay(image, heatmap))


def additivity_section(report: Report, rows: Sequence[AdditivityRow], precision: str = "float32",
                       tolerance: float = 1e-4, note: str = "") -> None:
    report.section("additivity", "Additivity: Σ components = representation")
    if note:
        report.paragraph(note)
    levels = list(dict.fromkeys(level for row in rows for level in row.errors))
    report.table(["model", "components", *(f"{level}: max relative error" for level in levels)],
                 [[row.model, row.components, *(row.errors.get(level, float("nan")) for level in levels)]
                  for row in rows])
    worst = max(max(row.errors.values()) for row in rows)
    report.verdict(f"the components sum to the model's representation ({precision})", worst < tolerance,
                   f"largest relative error {worst:.1e}")


def ranking_section(report: Report, models: Mapping[str, Mapping[str, Sequence[RankedComponent]]],
                    constant: Mapping[str, torch.Tensor], top: int = 8, title: str = "Components ranked per property"
                    ) -> None:
    """One bar chart per (model, property): the specific scores of its top non-constant components.

    models: model -> property -> ranking; constant: model -> bool [C] (components that never vary)
    """
    report.section("rankings", title)
    report.paragraph("Specific score: the component's score for the property minus its best score for any other "
                     "property (higher = tied to this property alone). Constant components are left out.")
    for model, rankings in models.items():
        if len(models) > 1:
            report.heading(model)
        for name, ranking in rankings.items():
            shown = [c for c in ranking if not bool(constant[model][c.index])][:top]
            if shown:
                report.bar_chart(f"{model}: {name}", [c.key for c in shown], [c.specific_score for c in shown])


def textspan_section(report: Report, rows: Sequence[DescribedComponent],
                     title: str = "TextSpan descriptions of each property's top components") -> None:
    report.section("textspan", title)
    report.paragraph("TextSpan picks, one after the other, the texts whose directions carry most of the component's "
                     "variation over the images (share of its variance in brackets).")
    report.table(["model", "property", "component", "TextSpan texts (share of variance)"],
                 [[row.model, row.property, row.key, "; ".join(f"{text} ({share:.2f})" for text, share in row.texts)]
                  for row in rows])


def top_images_section(report: Report, rows: Sequence[TopImages], largest_side: int = 112) -> None:
    report.section("top-images", "Images that score highest along the top components")
    report.paragraph("For each property's top components: the images whose aligned contribution ⟨a_i(x), t⟩ is "
                     "largest, with t the unit direction of the component's first TextSpan text.")
    for row in rows:
        report.heading(f"{row.key} ({row.property}) along '{row.along}'")
        report.figures(row.images, scale=1, largest_side=largest_side)


def heatmap_rows(report: Report, rows: Sequence[HeatmapRow], scale: int = 2, largest_side: int | None = None,
                 meaning: str = "high = the map's largest values") -> None:
    """A colour-scale legend (``meaning``: what high and low stand for), then one row of figures per image: the
    image, its extras, then each heatmap over it."""
    report.colour_scale(RAMP.round().int().tolist(), "low", "high",
                        f"{meaning}; each overlay is scaled to its own minimum and maximum, so colours compare within "
                        "a panel, not across panels")
    for row in rows:
        items = [(row.image.permute(1, 2, 0), row.caption), *row.extras]
        items += [(overlay(row.image, heatmap), caption) for heatmap, caption in row.maps]
        report.figures(items, scale=scale, largest_side=largest_side)


def ablation_section(report: Report, records: Sequence[AblationRecord], explanation: str,
                     x_label: str = "blocks ablated (last first)") -> None:
    report.section("ablation", "Component ablation curves")
    report.paragraph(explanation)
    for record in records:
        curve = record.curve
        report.heading(f"{record.model} (classifier: {record.classifier})")
        report.line_chart(f"{record.model}: accuracy vs {x_label.split(' (')[0]}", list(range(len(curve.accuracy))),
                          {"accuracy": curve.accuracy}, x_label, "accuracy", y_max=1.0)
        report.table(["step", "components ablated", "accuracy"],
                     [[step, count, accuracy] for step, count, accuracy in zip(curve.steps, curve.ablated,
                                                                               curve.accuracy)])
