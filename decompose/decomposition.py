"""The result of decomposing one batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .labels import ComponentLabel


class VectorsNotComputed(AttributeError):
    """A decomposition made with directions holds scores, not the component vectors."""


@dataclass
class Decomposition:
    """``representation ≈ components.sum(0)``; with directions, ``⟨representation, u⟩ ≈ scores.sum(0)``.

    vectors:        [C, B, *D] one row per component (D: the representation's shape), read as
                    ``components``; None when the decomposer was given directions
    scores:         [C, B, k] ⟨component c of image b, u_j⟩ (None without directions)
    directions:     the ``decompose.directions.Directions`` the scores are along
    labels:         C ComponentLabels, same order
    representation: [B, *D] the model's real value at the decomposed node
    level:          ``branch`` | ``head`` | ``token``
    target:         fx node that was decomposed
    stopped_before: the nonlinear op after it, e.g. a ``tanh`` pre-logits head (None if the
                    representation is the model's output itself)
    sum_error:      the largest per-image relative error of the sum, checked when the decomposer made
                    it (None: not made by a decomposer)
    """

    vectors: torch.Tensor | None
    labels: list[ComponentLabel]
    representation: torch.Tensor
    level: str
    target: str = ""
    stopped_before: str | None = None
    sum_error: float | None = None
    scores: torch.Tensor | None = None
    directions: Any = None

    @property
    def components(self) -> torch.Tensor:
        """[C, B, *D] the component vectors."""
        if self.vectors is None:
            raise VectorsNotComputed(
                "this decomposition was made with directions: it holds dec.scores [C, B, k] = ⟨component, u⟩, "
                "and the component vectors were not computed; call the decomposer without directions= for them")
        return self.vectors

    @property
    def values(self) -> torch.Tensor:
        """What this decomposition holds per component: ``scores`` [C, B, k] or ``components`` [C, B, *D]."""
        return self.scores if self.vectors is None else self.vectors

    def sum(self) -> torch.Tensor:
        """[B, *D] sum of all components; with directions [B, k] = ⟨representation, u_j⟩ (directions shared by
        every component)."""
        return self.values.sum(0)

    def projected_representation(self) -> torch.Tensor:
        """[B, k] ⟨representation_b, u_j⟩ for directions shared by every component (per image: image b's u_j)."""
        table = self.directions.table
        if table.shape[0] != 1:
            raise ValueError("per-component directions: the scores do not sum to one projection of the "
                             "representation")
        flat = self.representation.reshape(self.representation.shape[0], -1).to(table)
        return flat @ table[0].T if table.dim() == 3 else torch.einsum("bd,bkd->bk", flat, table[0])

    def relative_error(self) -> float:
        """‖Σ components − representation‖ / ‖representation‖ (with shared directions:
        ‖Σ scores − ⟨representation, U⟩‖ / (‖representation‖ ‖U‖))."""
        tiny = torch.finfo(self.representation.dtype).tiny
        if self.vectors is None:
            difference = (self.sum() - self.projected_representation()).norm()
            return float(difference / (self.representation.norm() * self.directions.table.norm()).clamp_min(tiny))
        difference = (self.sum() - self.representation).norm()
        return float(difference / self.representation.norm().clamp_min(tiny))

    @property
    def keys(self) -> list[str]:
        return [label.key for label in self.labels]

    def index(self, key: str) -> int:
        return self.keys.index(key)

    def select(self, keep: Callable[[ComponentLabel], bool]) -> "Decomposition":
        """Subset of components (their sum is no longer the representation)."""
        rows = [i for i, label in enumerate(self.labels) if keep(label)]
        return Decomposition(None if self.vectors is None else self.vectors[rows], [self.labels[i] for i in rows],
                             self.representation, self.level, self.target, self.stopped_before,
                             scores=None if self.scores is None else self.scores[rows], directions=self.directions)

    def grouped(self, group: Callable[[ComponentLabel], str]) -> tuple[torch.Tensor, list[str]]:
        """Sum components (or their scores) by ``group(label)``: ([G, B, *D] (or [G, B, k]), G group names in
        first-seen order)."""
        names: list[str] = []
        index = []
        for label in self.labels:
            name = group(label)
            if name not in names:
                names.append(name)
            index.append(names.index(name))
        values = self.values
        out = values.new_zeros((len(names),) + values.shape[1:])
        out.index_add_(0, torch.tensor(index, device=out.device), values)
        return out, names

    def table(self, top: int | None = None) -> str:
        """Text table of components by mean norm over the batch (largest first); with directions, by the
        mean |score| (summed over the directions)."""
        norms = self.values.flatten(2).norm(dim=-1).mean(1) if self.vectors is not None else \
            self.scores.abs().sum(-1).mean(1)
        order = norms.argsort(descending=True).tolist()[:top]
        heading = "mean norm" if self.vectors is not None else "mean |score|"
        lines = [f"{'component':40s} {'kind':10s} {'layer':>5s} {heading:>12s}"]
        for i in order:
            label = self.labels[i]
            layer = "" if label.layer is None else str(label.layer)
            lines.append(f"{label.key:40s} {label.kind:10s} {layer:>5s} {float(norms[i]):12.4f}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """Notebook display: the top components by mean norm, as a table and a bar plot."""
        from .display import decomposition_html

        return decomposition_html(self)

    def plot(self, top: int = 15, image: int | None = None, direction: torch.Tensor | None = None, ax=None):
        """matplotlib Figure: bars of the ``top`` components by norm, or by ⟨c_i, direction⟩ for a ``direction``
        [D] (a class's classifier row: each component's share of that logit); mean over the batch, or one
        ``image``. ``ax``: draw into that Axes."""
        from .display import plot_components

        return plot_components(self, top, image, direction, ax)


def components_by(labels: Iterable[ComponentLabel], **fields) -> list[int]:
    """Row indices whose labels match all ``fields`` (e.g. ``layer=3, kind='attention'``)."""
    return [i for i, label in enumerate(labels) if all(getattr(label, k) == v for k, v in fields.items())]
