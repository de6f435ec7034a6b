"""Ablating components: the representation with some components replaced by a reference.

Mean-ablation replaces component c_i(x) by its mean over a reference set m_i (zero-ablation
by 0), so the ablated representation is ``r(x) − Σ_{i∈S} (c_i(x) − m_i)``. Works on any
component tensor: model-space components [C, B, D] (then a model head or probe classifies
it) or CompAlign-mapped ones [C, B, d_clip] (then zero-shot CLIP texts do; the maps are
linear, so mapping the means is ablating the mapped components).

An ablation curve ablates cumulatively, step by step (a layer at a time, or one component
at a time in a score order), and records accuracy after each step.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from decompose import ComponentLabel, Decomposition, DecompositionStore

from .classifiers import Classifier, predict

MODES = ("mean", "zero")
Which = Sequence[int] | Sequence[str] | torch.Tensor


def component_indices(which: Which, labels: Sequence[ComponentLabel] | None = None) -> list[int]:
    """Row indices from indices or label keys (keys need ``labels``)."""
    items = which.tolist() if torch.is_tensor(which) else list(which)
    if all(isinstance(item, int) for item in items):
        return items
    if labels is None:
        raise ValueError("components given by key need their labels")
    keys = {label.key: i for i, label in enumerate(labels)}
    missing = [item for item in items if not isinstance(item, int) and item not in keys]
    if missing:
        raise ValueError(f"unknown components {missing[:3]}; keys look like {list(keys)[:3]}")
    return [item if isinstance(item, int) else keys[item] for item in items]


def component_means(components: torch.Tensor) -> torch.Tensor:
    """[C, *D] mean over the images of components [C, B, *D] (the reference for mean-ablation)."""
    return components.double().mean(1).to(components.dtype)


@torch.no_grad()
def store_component_means(store: DecompositionStore, rows: Sequence[int] | None = None) -> torch.Tensor:
    """[C, *D] (float32) mean over the store's images (or its images at positions ``rows``), one shard at a time."""
    wanted = None if rows is None else torch.zeros(len(store), dtype=torch.bool)
    if wanted is not None:
        wanted[list(rows)] = True
    total, count, offset = None, 0, 0
    for components, _, ids in store.iter_shards():
        batch = components.double()
        if wanted is not None:
            batch = batch[:, wanted[offset:offset + len(ids)]]
        offset += len(ids)
        part = batch.sum(1)
        total = part if total is None else total + part
        count += batch.shape[1]
    if total is None or count == 0:
        raise ValueError("no images to average over")
    return (total / count).float()


def source_parts(source: Decomposition | torch.Tensor, labels) -> tuple[torch.Tensor, torch.Tensor, list | None]:
    """(components [C, B, *D], representation [B, *D], labels) of a Decomposition or a component tensor."""
    if isinstance(source, Decomposition):
        return source.components, source.representation, source.labels
    return source, source.sum(0), labels


def ablation_delta(components: torch.Tensor, rows: list[int], mode: str,
                   reference: torch.Tensor | None) -> torch.Tensor:
    """[B, *D] Σ_{i∈rows} (c_i − m_i) (mode ``mean``) or Σ c_i (mode ``zero``): what ablation removes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not rows:
        return components.new_zeros(components.shape[1:])
    index = torch.tensor(rows, dtype=torch.long, device=components.device)
    removed = components.index_select(0, index).sum(0)
    if mode == "mean":
        if reference is None:
            raise ValueError("mean-ablation needs the reference means [C, *D] (component_means of a reference set)")
        removed = removed - reference.to(removed).index_select(0, index).sum(0)
    return removed


def ablate(source: Decomposition | torch.Tensor, which: Which, mode: str = "mean",
           reference: torch.Tensor | None = None, labels: Sequence[ComponentLabel] | None = None) -> torch.Tensor:
    """Representation [B, *D] with components ``which`` (indices or keys) ablated.

    source:    a Decomposition (its real representation is the base) or components [C, B, *D]
               (their sum is the base)
    mode:      ``mean`` (replace by ``reference`` [C, *D]; default: the mean over ``source``'s
               own images) or ``zero``
    """
    components, representation, labels = source_parts(source, labels)
    if mode == "mean" and reference is None:
        reference = component_means(components)
    rows = component_indices(which, labels)
    return representation - ablation_delta(components, rows, mode, reference).to(representation)


def accuracy(classifier: Classifier, representation: torch.Tensor, targets: torch.Tensor) -> float:
    return float((predict(classifier, representation).cpu() == targets.cpu().long()).double().mean())


def layer_steps(labels: Sequence[ComponentLabel], last_first: bool = False,
                keep: Callable[[ComponentLabel], bool] | None = None) -> list[tuple[str, list[int]]]:
    """[(``layer k``, rows)] grouping components by residual block (components outside blocks are not steps)."""
    keep = keep or (lambda label: True)
    layers: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        if label.layer is not None and keep(label):
            layers.setdefault(label.layer, []).append(row)
    order = sorted(layers, reverse=last_first)
    return [(f"layer {layer}", layers[layer]) for layer in order]


def ordered_steps(order: Sequence[int], labels: Sequence[ComponentLabel] | None = None) -> list[tuple[str, list[int]]]:
    """One step per component, in the given order (e.g. by a score, highest first)."""
    return [(labels[i].key if labels is not None else str(i), [int(i)]) for i in order]


@dataclass
class AblationCurve:
    steps: list[str]        # "none", then each step's name
    ablated: list[int]      # components ablated so far, per point
    accuracy: list[float]   # accuracy per point

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def ablation_curve(source: Decomposition | torch.Tensor, steps: Sequence[tuple[str, Sequence[int]]],
                   classifier: Classifier, targets: torch.Tensor, mode: str = "mean",
                   reference: torch.Tensor | None = None, labels: Sequence[ComponentLabel] | None = None,
                   progress: bool = False) -> AblationCurve:
    """Accuracy as ``steps`` [(name, rows)] are ablated cumulatively (first point: nothing ablated)."""
    components, representation, labels = source_parts(source, labels)
    if mode == "mean" and reference is None:
        reference = component_means(components)
    current = representation.clone()
    curve = AblationCurve(["none"], [0], [accuracy(classifier, current, targets)])
    done: set[int] = set()
    for name, rows in tqdm(steps, desc="ablate", disable=not progress):
        new = [r for r in component_indices(rows, labels) if r not in done]
        done.update(new)
        current = current - ablation_delta(components, new, mode, reference).to(current)
        curve.steps.append(name)
        curve.ablated.append(len(done))
        curve.accuracy.append(accuracy(classifier, current, targets))
    return curve
