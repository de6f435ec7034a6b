"""Scoring components for a property described by texts (the paper's scoring function).

For a property with k description embeddings, ``B`` is an orthonormal basis of their span
(QR). Component i's score is the mean over basis vectors b_j of the Pearson correlation,
over images, between ⟨a_i(x), b_j⟩ and ⟨Σ_c a_c(x), b_j⟩: how much of what the whole
representation does along the property, this component does too. Variance explained is
tr Cov(P_B a_i) / tr Cov(a_i): the share of the component's own variation inside the span.

``PropertyScorer`` accumulates sufficient statistics batch by batch (float64, shifted by
the first batch's mean for stability), so the aligned outputs [C, N, d_clip] of a whole
dataset never have to be in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch


def property_basis(text_embeddings: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows [r, d_clip] spanning text_embeddings [k, d_clip] (r = numerical rank <= k)."""
    q, r = torch.linalg.qr(text_embeddings.double().T)  # q: [d_clip, min(k, d_clip)]
    diagonal = torch.diagonal(r).abs()
    keep = diagonal > tolerance * diagonal.max().clamp_min(torch.finfo(torch.float64).tiny)
    return q[:, keep].T.float()


class PropertyScorer:
    """Streams aligned components and returns per-property scores.

    bases: property name -> orthonormal basis [k_p, d_clip] (see ``property_basis``)
    """

    def __init__(self, bases: Mapping[str, torch.Tensor]):
        self.names = list(bases)
        self.sizes = [len(bases[name]) for name in self.names]
        self.basis = torch.cat([bases[name] for name in self.names]).double()  # [K, d_clip]
        self.count = 0

    def update(self, aligned: torch.Tensor) -> None:
        """aligned: [C, B, d_clip] component outputs a_i(x) for a batch of images."""
        aligned = aligned.detach().double()
        basis = self.basis.to(aligned.device)
        total = aligned.sum(0)                                      # [B, d_clip] Σ_c a_c(x)
        if self.count == 0:                                         # shifts keep the sums well conditioned
            self.shift = aligned.mean(1, keepdim=True)              # [C, 1, d_clip]
            self._zero_sums(aligned.shape[0], aligned.shape[2], aligned.device)
        centred = aligned - self.shift                              # [C, B, d_clip]
        centred_total = total - self.shift.sum(0)                   # [B, d_clip]
        component_along = centred @ basis.T                         # [C, B, K]
        total_along = centred_total @ basis.T                       # [B, K]
        self.sum_x += component_along.sum(1)
        self.sum_xx += component_along.pow(2).sum(1)
        self.sum_xy += (component_along * total_along).sum(1)
        self.sum_y += total_along.sum(0)
        self.sum_yy += total_along.pow(2).sum(0)
        self.sum_a += centred.sum(1)
        self.sum_aa += centred.pow(2).sum((1, 2))
        self.count += aligned.shape[1]

    def _zero_sums(self, components: int, d_clip: int, device: torch.device) -> None:
        K = len(self.basis)
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sum_x, self.sum_xx, self.sum_xy = zeros(components, K), zeros(components, K), zeros(components, K)
        self.sum_y, self.sum_yy = zeros(K), zeros(K)
        self.sum_a, self.sum_aa = zeros(components, d_clip), zeros(components)

    def _per_property(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split [C, K] along K by property and average each part to [C]."""
        return {name: part.mean(1).float().cpu() for name, part in zip(self.names, values.split(self.sizes, dim=1))}

    def _variance_along(self) -> torch.Tensor:
        """[C, K] Var over images of ⟨a_i, b_j⟩."""
        mean_x = self.sum_x / self.count
        return (self.sum_xx / self.count - mean_x.pow(2)).clamp_min(0)

    def _total_variance(self) -> torch.Tensor:
        """[C] tr Cov(a_i)."""
        mean_a = self.sum_a / self.count
        return (self.sum_aa / self.count - mean_a.pow(2).sum(1)).clamp_min(0)

    def _variance_floor(self) -> float:
        """Variances below this count as zero (constant components: biases, class tokens)."""
        return 1e-10 * float(self._total_variance().max()) + 1e-300

    def constant(self) -> torch.Tensor:
        """Bool [C]: components that do not vary over the images (their scores are 0 by convention)."""
        return (self._total_variance() <= self._variance_floor()).cpu()

    def scores(self) -> dict[str, torch.Tensor]:
        """property -> [C] mean over basis vectors of Pearson(⟨a_i, b_j⟩, ⟨Σ a, b_j⟩); 0 where constant."""
        if self.count < 2:
            raise ValueError("scores need at least two images")
        mean_x, mean_y = self.sum_x / self.count, self.sum_y / self.count
        covariance = self.sum_xy / self.count - mean_x * mean_y                    # [C, K]
        variance_x = self._variance_along()                                        # [C, K]
        variance_y = (self.sum_yy / self.count - mean_y.pow(2)).clamp_min(0)       # [K]
        floor = self._variance_floor()
        defined = (variance_x > floor) & (variance_y > floor)
        correlation = torch.where(defined, covariance / (variance_x * variance_y).sqrt().clamp_min(1e-300),
                                  torch.zeros_like(covariance))
        return self._per_property(correlation.clamp(-1, 1))

    def variance_explained(self) -> dict[str, torch.Tensor]:
        """property -> [C] tr Cov(P_B a_i) / tr Cov(a_i); 0 for constant components."""
        total_variance = self._total_variance()                                    # [C]
        along = self._variance_along().split(self.sizes, dim=1)
        defined = total_variance > self._variance_floor()
        return {name: torch.where(defined, part.sum(1) / total_variance.clamp_min(1e-300),
                                  torch.zeros_like(total_variance)).float().cpu()
                for name, part in zip(self.names, along)}


def property_scores(aligned: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """[C] scores of aligned [C, N, d_clip] for one property given by text_embeddings [k, d_clip]."""
    scorer = PropertyScorer({"property": property_basis(text_embeddings)})
    scorer.update(aligned)
    return scorer.scores()["property"]


def variance_explained(aligned: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """[C] tr Cov(P_B a_i) / tr Cov(a_i) for aligned [C, N, d_clip]."""
    scorer = PropertyScorer({"property": property_basis(text_embeddings)})
    scorer.update(aligned)
    return scorer.variance_explained()["property"]


def specific_scores(scores: Mapping[str, torch.Tensor], target: str) -> torch.Tensor:
    """[C] score_p − max(0, max_{q ≠ p} score_q): high only for components tied to ``target`` alone."""
    if target not in scores:
        raise KeyError(f"no scores for property {target!r}; known: {sorted(scores)}")
    others = [value for name, value in scores.items() if name != target]
    if not others:
        return scores[target].clone()
    return scores[target] - torch.stack(others).max(0).values.clamp_min(0)


@dataclass
class RankedComponent:
    index: int                  # row in the decomposition
    key: str                    # label key, e.g. blocks.10.attn.h3
    score: float                # score for the property
    specific_score: float       # score − max(0, best other property's score)
    rival: str | None           # the other property with the highest score
    variance_explained: float | None = None


class Ranking(list):
    """A list of ``RankedComponent`` for one property, shown in a notebook as a table and a bar plot."""

    def __init__(self, rows=(), target: str = "", specific: bool = True):
        super().__init__(rows)
        self.target, self.specific = target, specific

    def _repr_html_(self, top: int = 15) -> str:
        from decompose.display import bar_figure, figure_svg, html_table

        shown = self[:top]
        rows = [[position, c.key, c.score, c.specific_score, c.rival or "",
                 "" if c.variance_explained is None else c.variance_explained]
                for position, c in enumerate(shown, 1)]
        table = html_table(["#", "component", "score", "specific", "rival", "var. expl."], rows)
        values = [c.specific_score if self.specific else c.score for c in shown]
        figure = bar_figure([c.key for c in shown], values, f"{self.target!r}: top {len(shown)} of {len(self)}",
                            "specific score" if self.specific else "score")
        return (f"<div><b>Ranking</b> for {self.target!r}<div style='display:flex;gap:1em;align-items:flex-start'>"
                f"{table}<div style='max-width:520px'>{figure_svg(figure)}</div></div></div>")


def rank_components(scores: Mapping[str, torch.Tensor], keys: Sequence[str], target: str, specific: bool = True,
                    variance: Mapping[str, torch.Tensor] | None = None, top: int | None = None,
                    constant: torch.Tensor | None = None) -> Ranking:
    """Components sorted for ``target``: by specific score (default) or by the plain score.

    constant: bool [C] (``PropertyScorer.constant()``): components ranked last, whatever their score
    """
    specific_values = specific_scores(scores, target)
    others = [name for name in scores if name != target]
    rival_index = torch.stack([scores[name] for name in others]).argmax(0) if others else None
    ranking = (specific_values if specific else scores[target]).double()
    if constant is not None:
        ranking = torch.where(constant, torch.tensor(-torch.inf, dtype=ranking.dtype), ranking)
    order = ranking.argsort(descending=True, stable=True).tolist()
    return Ranking((RankedComponent(index=i, key=keys[i], score=float(scores[target][i]),
                                    specific_score=float(specific_values[i]),
                                    rival=others[int(rival_index[i])] if others else None,
                                    variance_explained=float(variance[target][i]) if variance is not None else None)
                    for i in order[:top]), target, specific)
