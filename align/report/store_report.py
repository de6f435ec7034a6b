"""The report of any model's decomposition store (``vit-decompose report``): what was found (``StoreFindings``),
how the top components are described and which images they score highest on (``describe_components``), and the
page built from the shared section builders (``build_store_report``)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from decompose import DecompositionStore

from ..alignment_data import store_component_rows
from ..compalign import CompAlign
from ..scoring import RankedComponent
from ..textspan import text_span
from .page import Report, Titled
from .sections import (
    AblationRecord,
    AdditivityRow,
    DescribedComponent,
    HeatmapRow,
    TopImages,
    ablation_section,
    additivity_section,
    heatmap_rows,
    ranking_section,
    textspan_section,
    top_images_section,
)


@dataclass
class StoreFindings:
    """Everything ``build_store_report`` draws; a section without data says why (its ``*_note``)."""

    model: str
    level: str
    images: int
    components: int
    clip: str                                    # the CLIP model the aligner maps into (its exact identity)
    heldout_cosine: float | None                 # the aligner's, as recorded when it was trained
    sum_errors: torch.Tensor                     # [N] per-image relative error of Σ components
    rankings: dict[str, list[RankedComponent]]   # property -> components, most specific first
    constant: torch.Tensor                       # bool [C]
    descriptions: list[DescribedComponent]
    top_images: list[TopImages]
    heatmaps: list[HeatmapRow] = field(default_factory=list)
    heatmap_note: str = ""
    ablation: AblationRecord | None = None
    ablation_note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    clip_description: str = ""                   # that CLIP as a reader names it (``ClipModel.description``)


@torch.no_grad()
def describe_components(aligner: CompAlign, store: DecompositionStore, rankings: Mapping[str, Sequence[RankedComponent]],
                        constant: torch.Tensor, bank: torch.Tensor, texts: Sequence[str], top: int = 3,
                        with_images: int = 1, image_count: int = 6
                        ) -> tuple[list[DescribedComponent], list[tuple[str, str, str, list[int]]]]:
    """TextSpan of each property's ``top`` non-constant components, and for the first ``with_images`` of them the
    store rows of the ``image_count`` images scoring highest along the first TextSpan text.

    bank: [T, d_clip] embeddings of ``texts``. Returns (descriptions, [(key, property, text, rows)]).
    A component leading several properties is described (and shown) once, under the first.
    """
    aligner.check_matches(store.manifest.get("model", ""), store.level, store.labels)
    device = aligner.weights.device
    chosen = [(name, c, rank) for name, ranking in rankings.items()
              for rank, c in enumerate([c for c in ranking if not bool(constant[c.index])][:top])]
    described, shown, seen = [], [], set()
    for name, component, rank in tqdm(chosen, desc="describe", unit="component"):
        if component.key in seen:
            continue
        seen.add(component.key)
        aligned = aligner.map_component(component.index, store_component_rows(store, component.index).to(device))
        span = text_span(aligned.cpu(), bank, list(texts), count=3)                      # aligned: [N, d_clip]
        described.append(DescribedComponent(aligner.model_name or "model", name, component.key,
                                            list(zip(span.texts, span.variance_explained))))
        if rank < with_images:
            direction = torch.nn.functional.normalize(bank[span.indices[0]].float(), dim=0)
            along = aligned.cpu().float() @ direction                                     # [N]
            rows = along.argsort(descending=True)[:image_count].tolist()
            shown.append((component.key, name, span.texts[0], rows))
    return described, shown


def build_store_report(findings: StoreFindings, title: str | None = None) -> Report:
    f = findings
    report = Report(title or f"What the parts of {f.model} do")
    report.section("overview", "Overview")
    cosine = "not recorded" if f.heldout_cosine is None else f"{f.heldout_cosine:.3f}"
    report.table(["", "value"], [["model", f.model], ["level", f.level], ["images", f.images],
                                 ["components", f.components], ["CLIP model of the aligner", Titled(f.clip_description or f.clip, f.clip)],
                                 ["aligner held-out cosine", cosine]])
    if f.seconds:
        report.table(["step", "seconds"], [[step, seconds] for step, seconds in f.seconds.items()])
    errors = f.sum_errors
    additivity_section(report, [AdditivityRow(f.model, f.components, {f.level: float(errors.max())})],
                       note=f"Per image, ‖Σ components − representation‖ / ‖representation‖ over the store's "
                            f"{len(errors)} images (mean {float(errors.mean()):.1e}, median "
                            f"{float(errors.median()):.1e}).", precision="as stored")
    ranking_section(report, {f.model: f.rankings}, {f.model: f.constant})
    textspan_section(report, f.descriptions)
    top_images_section(report, f.top_images)
    report.section("heatmaps", "Token heatmaps")
    report.paragraph(f.heatmap_note)
    heatmap_rows(report, f.heatmaps, scale=2, largest_side=112,
                 meaning="high = tokens whose contributions point most along the text, low = most against it")
    if f.ablation is not None:
        ablation_section(report, [f.ablation], f.ablation_note)
    else:
        report.section("ablation", "Component ablation curves")
        report.paragraph(f.ablation_note)
    return report


def top_image_records(shown: Sequence[tuple[str, str, str, list[int]]], image_ids: Sequence[str],
                      read_image: Callable[[str], torch.Tensor]) -> list[TopImages]:
    """``TopImages`` from ``describe_components``' rows; read_image: image id -> [3, H, W] in [0, 1]."""
    return [TopImages(key, name, text, [(read_image(image_ids[row]).permute(1, 2, 0), image_ids[row])
                                        for row in rows])
            for key, name, text, rows in shown]
