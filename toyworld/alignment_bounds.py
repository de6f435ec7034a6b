"""What bounds CompAlign's held-out cosine: linear fits of the tiny CLIP's embedding from what a target carries.

CompAlign maps each component linearly into CLIP space, so it can only point along what the
components carry. Closed-form ridge fits on CompAlign's own train / held-out rows locate that
bound from two sides:

* from the target's full representation [N, D] (what the components sum to);
* from the one-hot values of the factors, all six or only those the target encodes (what a
  representation holding exactly those factors, perfectly and linearly, would allow).

The tiny CLIP reads all six factors (zero-shot >= 0.96 each), so its embedding is close to a
linear function of their one-hots; a target that does not encode one of them (position, for
the class-trained targets) misses that part of every embedding, whatever the alignment does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .generator import FACTORS
from .sample import ToySample

ALIGNMENT_GOAL = 0.85  # the held-out cosine the toy-world issue asks of every target
FIT_RIDGE = 1e-2


def linear_fit_cosine(features: torch.Tensor, targets: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                      ridge: float = FIT_RIDGE) -> float:
    """Mean held-out cosine of a ridge regression from features [N, D] onto the unit targets [N, d].

    Fit on the ``train`` rows (features standardised with their statistics, a free bias), scored on ``test``.
    """
    x, y = features.double(), torch.nn.functional.normalize(targets.double(), dim=-1)
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-8)
    x = torch.nn.functional.pad((x - mean) / std, (0, 1), value=1.0)                      # [N, D + 1]
    penalty = ridge * torch.eye(x.shape[1], dtype=torch.float64)
    penalty[-1, -1] = 0
    weight = torch.linalg.solve(x[train].T @ x[train] + penalty, x[train].T @ y[train])   # [D + 1, d]
    return float(torch.nn.functional.cosine_similarity(x[test] @ weight, y[test], dim=-1).mean())


def one_hot_factors(sample: ToySample, factors: Sequence[str]) -> torch.Tensor:
    """[N, sum of the factors' value counts] one-hot ground truth of ``factors``."""
    return torch.cat([torch.nn.functional.one_hot(sample.factor(f), len(FACTORS[f])) for f in factors], 1).double()


def alignment_bounds(representation: torch.Tensor, clip_targets: torch.Tensor, sample: ToySample,
                     train: torch.Tensor, test: torch.Tensor, encoded: Sequence[str]) -> dict[str, float]:
    """{"representation", "encoded_factors", "all_factors"}: held-out cosines of the three linear fits.

    representation: [N, D] the target's; clip_targets: [N, d] CLIP image embeddings; train / test:
    CompAlign's own rows; encoded: the factors the target encodes (``toyworld.encoding``).
    """
    fits = {"representation": representation, "all_factors": one_hot_factors(sample, list(FACTORS))}
    if encoded:
        fits["encoded_factors"] = one_hot_factors(sample, encoded)
    bounds = {name: linear_fit_cosine(features, clip_targets, train, test) for name, features in fits.items()}
    return {name: bounds.get(name, float("nan")) for name in ("representation", "encoded_factors", "all_factors")}
