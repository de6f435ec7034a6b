"""What the demo runs with (``DemoSettings``) and what it finds per target model (``TargetResult``): the
records ``demo`` fills and ``demo_report`` draws."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from align.ablation import AblationCurve

from .experiments import RetrievalResult, SegmentationResult, SpuriousResult
from .models import TARGET_NAMES


@dataclass
class DemoSettings:
    """Sizes of the demo run (the defaults fit in ~3 minutes on 2 CPU cores)."""

    fit_images: int = 2048     # CompAlign fit + scoring
    test_images: int = 1024    # probes and retrieval (never used for fitting)
    token_images: int = 48     # level token: heatmaps and segmentation (from the test images)
    spurious_images: int = 1024  # per balanced split (validation, test) of the spurious-split model
    k: int = 3                 # components per probe selection (and the fixed top-k retrieval column)
    seed: int = 9001           # toy-world seed of the demo images (training used worlds 1-103)
    batch_size: int = 64
    models: tuple[str, ...] = TARGET_NAMES
    spurious_models: tuple[str, ...] = ("spurious",)   # trained on the toy Waterbirds split
    threads: int | None = None
    weights: str | None = None  # folder of `vit-decompose toyworld train` output (default: the shipped weights)


@dataclass
class TargetResult:
    """What the demo found for one target model (the report and metrics.json are built from it)."""

    name: str
    labels: list
    encoded: dict[str, dict[str, float | bool]]   # factor -> full-representation probe (toyworld.encoding)
    level_errors: dict[str, float]
    alignment: dict[str, Any]
    scores: dict[str, torch.Tensor]
    constant: torch.Tensor
    rankings: dict[str, list]
    descriptions: dict[str, list[tuple[str, float]]]
    probe: dict[str, dict[str, float]]
    retrieval: RetrievalResult
    segmentation: SegmentationResult
    spurious: SpuriousResult | None = None
    ablation: AblationCurve | None = None   # accuracy on the model's task as blocks are mean-ablated
    ablation_classifier: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
