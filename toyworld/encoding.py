"""Which factors a model encodes: a held-out linear probe on its full representation, against a gate.

A factor with K values counts as **encoded** when the probe's held-out accuracy reaches chance
plus ``ENCODED_MARGIN`` of the headroom above it: ``1/K + margin * (1 - 1/K)`` (0.5625 for 8
values, 0.625 for 4, 0.6 for 5, 0.75 for 2). The paper's claims are only checked on encoded
factors: a factor the representation does not carry cannot be found in its components.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from decompose import trace_and_decompose

from .generator import FACTORS
from .validation import linear_probe_accuracy

ENCODED_MARGIN = 0.5  # fraction of the headroom above chance a probe must reach


def encoded_threshold(values: int, margin: float = ENCODED_MARGIN) -> float:
    """The probe accuracy at which a factor of ``values`` values counts as encoded."""
    chance = 1 / values
    return chance + margin * (1 - chance)


def factor_probe(features: torch.Tensor, labels: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                 values: int, margin: float = ENCODED_MARGIN) -> dict[str, float | bool]:
    """{"probe", "chance", "threshold", "encoded"} of one factor.

    features: [N, D] full representation; labels: [N] value indices; train / test: row indices
    (the probe is fit on ``train`` only, scored on ``test``).
    """
    accuracy = linear_probe_accuracy(features[train], labels[train], features[test], labels[test], values)
    threshold = encoded_threshold(values, margin)
    return {"probe": accuracy, "chance": 1 / values, "threshold": threshold, "encoded": accuracy >= threshold}


def factor_probes(features: torch.Tensor, factors: Mapping[str, torch.Tensor], train: torch.Tensor,
                  test: torch.Tensor, margin: float = ENCODED_MARGIN) -> dict[str, dict[str, float | bool]]:
    """``factor_probe`` of every factor: factors maps a factor name to its [N] value indices."""
    return {name: factor_probe(features, labels, train, test, len(FACTORS[name]), margin)
            for name, labels in factors.items()}


def encoded_factors(probes: Mapping[str, Mapping[str, float | bool]]) -> list[str]:
    """The factors ``factor_probes`` found encoded, in ``FACTORS`` order."""
    return [name for name in FACTORS if name in probes and probes[name]["encoded"]]


@torch.no_grad()
def representation(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """[N, D] the representation the decomposition sums to, of a timm model on preprocessed images
    [N, 3, H, W]: timm's pre-logits features, or the node before a nonlinear pre-logits head (MaxViT's
    tanh: ``Decomposition.stopped_before``). A probe on the tanh's output read scene at 0.43 where the
    decomposed node reads it at 0.97 (the tiny MaxViT's saturated tanh, 2026-12-05)."""
    decomposer = trace_and_decompose(model)  # an eval-mode copy: the model itself is left as it is
    return torch.cat([decomposer(images[i:i + batch_size], level="branch").representation
                      for i in range(0, len(images), batch_size)])
