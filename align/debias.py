"""Removing a spurious correlation by mean-ablating the components tied to the spurious property.

As in the paper's Waterbirds experiment: components are ordered by
``score(spurious texts) − score(core texts)`` (``align.scoring``), the top k are
mean-ablated, and a classifier is evaluated per group (class × spurious attribute).
k is chosen on a validation split only (highest worst-group accuracy, then highest
average-group accuracy, then smallest k); the test split is touched once, with that k.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from decompose import ComponentLabel, Decomposition

from .ablation import ablation_delta, component_means, source_parts
from .classifiers import Classifier, predict


def spurious_scores(spurious: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """[C] score(spurious) − score(core): high for components tied to the spurious property only."""
    return spurious - core


def spurious_order(spurious: torch.Tensor, core: torch.Tensor, constant: torch.Tensor | None = None) -> list[int]:
    """Components by ``spurious_scores``, highest first; ``constant`` (bool [C]) ones last, since
    mean-ablating a constant changes nothing."""
    ranking = spurious_scores(spurious, core).double().clone()
    if constant is not None:
        ranking[constant.bool()] = -torch.inf
    return ranking.argsort(descending=True, stable=True).tolist()


@dataclass
class GroupAccuracy:
    per_group: dict[str, float]
    worst: float            # lowest accuracy of any group
    average: float          # mean of the group accuracies
    overall: float          # accuracy over all images

    def as_dict(self) -> dict:
        return asdict(self)


def group_accuracy(predictions: torch.Tensor, targets: torch.Tensor, groups: Sequence) -> GroupAccuracy:
    """Accuracy per group (``groups``: [B] ids, any hashable values) of predictions [B] vs targets [B]."""
    correct = (predictions.cpu().long() == targets.cpu().long()).double()
    values = groups.tolist() if torch.is_tensor(groups) else list(groups)
    per_group = {}
    for group in sorted(set(values), key=str):
        rows = torch.tensor([v == group for v in values])
        per_group[str(group)] = float(correct[rows].mean())
    return GroupAccuracy(per_group, min(per_group.values()), sum(per_group.values()) / len(per_group),
                         float(correct.mean()))


@dataclass
class LabelledSplit:
    """One split: components (a Decomposition or [C, B, *D]), class targets [B], group ids [B]."""

    components: Decomposition | torch.Tensor
    targets: torch.Tensor
    groups: Sequence


@dataclass
class DebiasResult:
    k: int                                    # components ablated (chosen on validation)
    ablated: list[int]                        # their indices
    before: GroupAccuracy                     # test, nothing ablated
    after: GroupAccuracy                      # test, top k ablated
    validation: list[GroupAccuracy] = field(default_factory=list)   # per k = 0 .. max_k

    def as_dict(self) -> dict:
        return {"k": self.k, "ablated": self.ablated, "before": self.before.as_dict(),
                "after": self.after.as_dict(), "validation": [v.as_dict() for v in self.validation]}


def _cumulative_group_accuracies(split: LabelledSplit, order: Sequence[int], ks: Sequence[int],
                                 classifier: Classifier, reference: torch.Tensor, mode: str,
                                 labels, progress: bool) -> list[GroupAccuracy]:
    components, representation, _ = source_parts(split.components, labels)
    current, done, results = representation.clone(), 0, []
    for k in tqdm(ks, desc="choose k", disable=not progress):
        current = current - ablation_delta(components, list(order[done:k]), mode, reference).to(current)
        done = k
        results.append(group_accuracy(predict(classifier, current), split.targets, split.groups))
    return results


@torch.no_grad()
def remove_spurious(order: Sequence[int], classifier: Classifier, validation: LabelledSplit, test: LabelledSplit,
                    max_k: int = 20, reference: torch.Tensor | None = None, mode: str = "mean",
                    labels: Sequence[ComponentLabel] | None = None, progress: bool = False) -> DebiasResult:
    """Mean-ablate the first k of ``order`` with k in 0..max_k chosen on ``validation``; report ``test``.

    reference: [C, *D] component means (default: over the validation images; never the test split's)
    """
    order = [int(i) for i in order]
    max_k = min(max_k, len(order))
    if reference is None and mode == "mean":
        reference = component_means(source_parts(validation.components, labels)[0])
    ks = list(range(max_k + 1))
    scores = _cumulative_group_accuracies(validation, order, ks, classifier, reference, mode, labels, progress)
    best = max(ks, key=lambda k: (scores[k].worst, scores[k].average, -k))
    test_components, test_representation, _ = source_parts(test.components, labels)
    before = group_accuracy(predict(classifier, test_representation), test.targets, test.groups)
    ablated = test_representation - ablation_delta(test_components, order[:best], mode, reference).to(
        test_representation)
    after = group_accuracy(predict(classifier, ablated), test.targets, test.groups)
    return DebiasResult(best, order[:best], before, after, scores)
