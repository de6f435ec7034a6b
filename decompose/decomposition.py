"""The result of decomposing one batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .labels import ComponentLabel


@dataclass
class Decomposition:
    """``representation ≈ components.sum(0)``.

    components:     [C, B, *D] one row per component (D: the representation's shape)
    labels:         C ComponentLabels, same order
    representation: [B, *D] the model's real value at the decomposed node
    level:          ``branch`` | ``head`` | ``token``
    target:         fx node that was decomposed
    stopped_before: the nonlinear op after it, e.g. a ``tanh`` pre-logits head (None if the
                    representation is the model's output itself)
    sum_error:      the largest per-image relative error of the sum, checked when the decomposer made
                    it (None: not made by a decomposer)
    """

    components: torch.Tensor
    labels: list[ComponentLabel]
    representation: torch.Tensor
    level: str
    target: str = ""
    stopped_before: str | None = None
    sum_error: float | None = None

    def sum(self) -> torch.Tensor:
        """[B, *D] sum of all components."""
        return self.components.sum(0)

    def relative_error(self) -> float:
        """‖Σ components − representation‖ / ‖representation‖."""
        difference = (self.sum() - self.representation).norm()
        return float(difference / self.representation.norm().clamp_min(torch.finfo(self.representation.dtype).tiny))

    @property
    def keys(self) -> list[str]:
        return [label.key for label in self.labels]

    def index(self, key: str) -> int:
        return self.keys.index(key)

    def select(self, keep: Callable[[ComponentLabel], bool]) -> "Decomposition":
        """Subset of components (their sum is no longer the representation)."""
        rows = [i for i, label in enumerate(self.labels) if keep(label)]
        return Decomposition(self.components[rows], [self.labels[i] for i in rows], self.representation,
                             self.level, self.target, self.stopped_before)

    def grouped(self, group: Callable[[ComponentLabel], str]) -> tuple[torch.Tensor, list[str]]:
        """Sum components by ``group(label)``: ([G, B, *D], G group names in first-seen order)."""
        names: list[str] = []
        index = []
        for label in self.labels:
            name = group(label)
            if name not in names:
                names.append(name)
            index.append(names.index(name))
        out = self.components.new_zeros((len(names),) + self.components.shape[1:])
        out.index_add_(0, torch.tensor(index, device=out.device), self.components)
        return out, names

    def table(self, top: int | None = None) -> str:
        """Text table of components by mean norm over the batch (largest first)."""
        norms = self.components.flatten(2).norm(dim=-1).mean(1)
        order = norms.argsort(descending=True).tolist()[:top]
        lines = [f"{'component':40s} {'kind':10s} {'layer':>5s} {'mean norm':>10s}"]
        for i in order:
            label = self.labels[i]
            layer = "" if label.layer is None else str(label.layer)
            lines.append(f"{label.key:40s} {label.kind:10s} {layer:>5s} {float(norms[i]):10.4f}")
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
