"""Classifiers on a (possibly ablated) representation [B, D]: callables returning logits [B, K].

Any callable works where one is asked for (a timm model's own ``head``, a probe, a lambda);
these two cover what needs no model: zero-shot CLIP texts on CompAlign's aligned
representation, and a linear probe fitted on features.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Classifier = Callable[[torch.Tensor], torch.Tensor]


def zero_shot_classifier(class_embeddings: torch.Tensor, bias: torch.Tensor | None = None) -> Classifier:
    """Cosine of ``Σ a_i + bias`` (aligned representation [B, d_clip]) with class texts [K, d_clip]."""
    classes = torch.nn.functional.normalize(class_embeddings.float(), dim=-1)

    def classify(aligned: torch.Tensor) -> torch.Tensor:
        total = aligned.float() + (bias.to(aligned.device).float() if bias is not None else 0)
        return torch.nn.functional.normalize(total, dim=-1) @ classes.to(total.device).T

    return classify


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, classes: int | None = None,
                     weight_decay: float = 1e-4, steps: int = 100, seed: int = 0) -> Classifier:
    """Multinomial logistic regression on standardised features [N, D] (full-batch L-BFGS)."""
    features = features.flatten(1).double()
    targets = targets.long()
    classes = int(targets.max()) + 1 if classes is None else classes
    mean, std = features.mean(0), features.std(0).clamp_min(1e-8)
    x = (features - mean) / std
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], classes, generator=generator, dtype=torch.float64) * 1e-3).requires_grad_()
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, targets) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def classify(representation: torch.Tensor) -> torch.Tensor:
        x = (representation.flatten(1).double() - mean.to(representation.device)) / std.to(representation.device)
        return (x @ weight.to(x.device) + bias.to(x.device)).float()

    return classify


def predict(classifier: Classifier, representation: torch.Tensor) -> torch.Tensor:
    """Long [B]: argmax of the classifier's logits [B, K] (or its output if it is already [B] labels)."""
    with torch.no_grad():
        output = classifier(representation)
    return output.argmax(-1) if output.dim() == 2 else output.long()
