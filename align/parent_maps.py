"""Components of a finer level through the CompAlign maps of a coarser one.

A token-level component ``blocks.3.attn.h5.t17`` is one source token's share of head
``blocks.3.attn.h5``; the paper maps it with that head's map. ``aligner_rows`` finds, from
label keys only, the map each component uses: its own key if the aligner has it, else its
head's (token dropped), else its branch's (head dropped). Since every map is linear,
⟨a_i(x), t⟩ = ⟨c_i(x), W_i t⟩: text contributions need one pulled-back direction per map,
never the aligned components themselves; each image may have its own text
(``per_image_aligner_directions``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from decompose import ComponentLabel
from decompose.directions import Directions, per_component, per_component_per_image

from .compalign import AlignerMismatch, CompAlign

TOKEN_KEY = re.compile(r"\.t\d+$")  # a token component's key ends so (``ComponentLabel.key``)


def coarser_keys(label: ComponentLabel) -> list[str]:
    """The label's own key, then its head's (no token), then its branch's (no head)."""
    keys = [label.key]
    if label.token is not None:
        keys.append(ComponentLabel(label.name, label.kind, label.layer, label.head).key)
    if label.head is not None:
        keys.append(label.name)
    return list(dict.fromkeys(keys))


def aligner_rows(aligner: CompAlign, labels: Sequence[ComponentLabel]) -> torch.Tensor:
    """Long [C]: the aligner map used by each component (see module doc); refuses unknown components."""
    index = {key: i for i, key in enumerate(aligner.keys)}
    rows, missing = [], []
    for label in labels:
        row = next((index[k] for k in coarser_keys(label) if k in index), None)
        if row is None:
            missing.append(label.key)
        rows.append(-1 if row is None else row)
    if missing:
        raise AlignerMismatch(f"{len(missing)} components have no map in the aligner, not even their head's "
                              f"(first: {missing[:3]}); train an aligner for this model")
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def map_components_by_parent(aligner: CompAlign, components: torch.Tensor, labels: Sequence[ComponentLabel],
                             chunk: int = 256) -> torch.Tensor:
    """a_i = c_i W_{row(i)}: components [C, B, d_model] -> [C, B, d_clip] (no bias), ``chunk`` rows at a time."""
    rows = aligner_rows(aligner, labels).to(aligner.weights.device)
    _check_width(aligner, components, labels)
    components = components.flatten(2)
    return torch.cat([torch.einsum("cbd,cde->cbe", components[s:s + chunk].to(aligner.weights),
                                   aligner.weights[rows[s:s + chunk]]) for s in range(0, len(labels), chunk)])


@torch.no_grad()
def pulled_back_directions(aligner: CompAlign, labels: Sequence[ComponentLabel],
                           direction: torch.Tensor) -> torch.Tensor:
    """[C, d_model]: W_{row(i)} t for a CLIP-space direction ``direction`` [d_clip]."""
    rows = aligner_rows(aligner, labels).to(aligner.weights.device)
    per_map = aligner.weights @ direction.to(aligner.weights)          # [C_aligner, d_model]
    return per_map[rows]


def aligner_directions(aligner: CompAlign, directions: torch.Tensor) -> Directions:
    """Per-component directions for a decomposer (``decomposer(images, level, directions=...)``): component i
    is scored along W_{row(i)} t for each CLIP-space direction t of ``directions`` [k, d_clip] (or [d_clip]),
    so its scores are ⟨a_i(x), t⟩ without building the components. A component the aligner has no map for
    (not even its head's or branch's) raises ``AlignerMismatch`` naming it."""
    directions = directions.unsqueeze(0) if directions.dim() == 1 else directions
    if directions.dim() != 2 or directions.shape[-1] != aligner.weights.shape[-1]:
        raise AlignerMismatch(f"CLIP directions must be [k, {aligner.weights.shape[-1]}] for this aligner, "
                              f"got {tuple(directions.shape)}")
    with torch.no_grad():
        table = torch.einsum("cde,ke->ckd", aligner.weights, directions.to(aligner.weights))   # [C_aligner, k, d]
    return per_component(table, _map_of(aligner))


def per_image_aligner_directions(aligner: CompAlign, directions: torch.Tensor) -> Directions:
    """``aligner_directions`` with each image's own CLIP directions: ``directions`` [B, d_clip] (or [B, k,
    d_clip]), image b's component i scored along W_{row(i)} t_b, so its score is ⟨a_i(x_b), t_b⟩ (each image's
    class text, its object's caption). Costs what one shared text costs; the batch must have B images."""
    directions = directions.unsqueeze(1) if directions.dim() == 2 else directions
    if directions.dim() != 3 or directions.shape[-1] != aligner.weights.shape[-1]:
        raise AlignerMismatch(f"CLIP directions per image must be [B, {aligner.weights.shape[-1]}] or [B, k, "
                              f"{aligner.weights.shape[-1]}] for this aligner, got {tuple(directions.shape)}")
    with torch.no_grad():
        table = torch.einsum("cde,bke->cbkd", aligner.weights, directions.to(aligner.weights))  # [C_aligner, B, k, d]
    return per_component_per_image(table, _map_of(aligner))


def _map_of(aligner: CompAlign):
    """label -> the row of the aligner's map it uses (``coarser_keys``); ``AlignerMismatch`` for none.

    An aligner without token maps (no key ending in ``.t<number>``) maps every token of a head alike: the row
    is looked up once per head, not once per token component (tens of thousands per call)."""
    index = {key: i for i, key in enumerate(aligner.keys)}
    by_head: dict[tuple[str, int | None], int] | None = \
        None if any(TOKEN_KEY.search(key) for key in index) else {}

    def looked_up(label: ComponentLabel) -> int:
        row = next((index[key] for key in coarser_keys(label) if key in index), None)
        if row is None:
            raise AlignerMismatch(f"component {label.key} has no map in the aligner, not even its head's or "
                                  "branch's; train an aligner for this model and level")
        return row

    def row_of(label: ComponentLabel) -> int:
        if by_head is None or label.token is None:
            return looked_up(label)
        head = (label.name, label.head)
        if head not in by_head:
            by_head[head] = looked_up(label)
        return by_head[head]

    return row_of


@torch.no_grad()
def text_contributions(aligner: CompAlign, components: torch.Tensor, labels: Sequence[ComponentLabel],
                       direction: torch.Tensor) -> torch.Tensor:
    """[C, B] ⟨a_i(x), t⟩ for components [C, B, d_model] and a CLIP direction ``direction`` [d_clip]."""
    _check_width(aligner, components, labels)
    pulled = pulled_back_directions(aligner, labels, direction)       # [C, d_model]
    return torch.einsum("cbd,cd->cb", components.flatten(2).to(pulled), pulled)


def _check_width(aligner: CompAlign, components: torch.Tensor, labels: Sequence[ComponentLabel]) -> None:
    if components.shape[0] != len(labels) or components.flatten(2).shape[2] != aligner.d_model:
        raise AlignerMismatch(f"components of shape {tuple(components.shape)} with {len(labels)} labels do not fit "
                              f"an aligner of d_model={aligner.d_model}")
