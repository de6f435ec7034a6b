"""Scores along directions equal ⟨full components, u⟩, on the model matrix, both pull-back paths, and
Hypothesis configs; bad directions get clear errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from decompose import trace_and_decompose
from decompose.decomposition import VectorsNotComputed
from decompose.directions import DirectionError, per_component
from tests.models import TIMM_MODELS, matrix_decomposer, matrix_model
from tests.test_properties import FAMILIES, PROPERTY_SETTINGS, build, images_for

LEVELS = ("branch", "head", "token")


def assert_scores_match(decomposer, images, level, k=3, rel=1e-10, compiled=False):
    """Scores along k random directions equal the components projected; ``compiled``: scored by a graph
    recorded on another batch of the same shape (``decomposer.compiled``)."""
    full = decomposer(images, level=level)
    width = full.representation[0].numel()
    generator = torch.Generator().manual_seed(7)
    directions = torch.randn(k, width, generator=generator, dtype=torch.float64).to(images.dtype)
    if compiled:
        example = torch.randn(images.shape, generator=generator, dtype=images.dtype)
        scored = decomposer.compiled(level, example, directions=directions).decompose(images)
    else:
        scored = decomposer(images, level=level, directions=directions)
    assert [label.key for label in scored.labels] == [label.key for label in full.labels]
    expected = torch.einsum("cbd,kd->cbk", full.components.flatten(2), directions)
    scale = full.representation.flatten(1).norm(dim=1).max() * directions.norm(dim=1).max()
    error = float((scored.scores - expected).abs().max() / scale)
    assert error <= rel, f"{level}: scores differ from ⟨components, u⟩ by {error:.1e}"
    total = scored.sum()                                                         # [B, k]
    assert total.shape == (images.shape[0], k)
    projected = full.representation.flatten(1) @ directions.T
    assert float((total - projected).abs().max() / scale) <= rel
    return scored


@pytest.mark.parametrize("name", sorted(TIMM_MODELS) + ["open_clip"])
def test_scores_equal_projected_components_on_the_model_matrix(name):
    decomposer, size = matrix_decomposer(name)
    images = torch.randn(2, *size, dtype=torch.float64)
    for level in LEVELS:
        assert_scores_match(decomposer, images, level)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_float32_scores(name):
    torch.manual_seed(1)
    model, size = matrix_model(name)
    decomposer = trace_and_decompose(model.float())
    images = torch.randn(2, *size)
    for level in LEVELS:
        full = decomposer(images, level=level)
        directions = torch.randn(4, full.representation.shape[-1])
        scored = decomposer(images, level=level, directions=directions)
        expected = torch.einsum("cbd,kd->cbk", full.components.double(), directions.double())
        scale = float(full.representation.norm(dim=-1).max() * directions.norm(dim=-1).max())
        assert float((scored.scores.double() - expected).abs().max()) <= 1e-5 * scale


def test_without_early_pooling_the_adjoint_path_serves_an_averaged_model():
    """Swin with prune=False: no early pooling, every birth scored through its adjoint at full size."""
    torch.manual_seed(2)
    model, size = matrix_model("swin_tiny_patch4_window7_224")
    decomposer = trace_and_decompose(model, prune=False)
    images = torch.randn(1, *size, dtype=torch.float64)
    for level in LEVELS:
        assert_scores_match(decomposer, images, level)


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_scores_on_random_configs(configs, data):
    case = data.draw(configs)
    model = build(case)
    decomposer = trace_and_decompose(model, output=data.draw(st.sampled_from(["pre_logits", "logits"])))
    images = images_for(model, case)
    assert_scores_match(decomposer, images, data.draw(st.sampled_from(LEVELS)), k=data.draw(st.integers(1, 4)))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
@pytest.mark.parametrize("by_token", [False, True], ids=["by-head", "by-token"])
def test_per_component_directions_use_each_components_row(name, by_token):
    """Rows by head (a head's tokens share one row: early pooling folds it into the head's matrix) or by
    token parity (rows differ inside a head: each piece is projected)."""
    torch.manual_seed(3)
    model, size = matrix_model(name)
    decomposer = trace_and_decompose(model)
    images = torch.randn(2, *size, dtype=torch.float64)
    full = decomposer(images, level="token")
    width = full.representation.shape[-1]

    def key(label):
        return (label.name, label.head, (label.token or 0) % 2 if by_token else None)

    keys = sorted({key(label) for label in full.labels}, key=str)
    row = {k: i for i, k in enumerate(keys)}
    table = torch.randn(len(keys), 2, width, dtype=torch.float64)
    directions = per_component(table, lambda label: row[key(label)])
    scored = decomposer(images, level="token", directions=directions)
    rows = torch.tensor([row[key(label)] for label in full.labels])
    expected = torch.einsum("cbd,ckd->cbk", full.components, table[rows])
    assert float((scored.scores - expected).abs().max()) <= 1e-10 * float(full.representation.norm() * table.norm())


def test_vectors_are_not_built_and_say_so():
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    images = torch.randn(1, *size, dtype=torch.float64)
    scored = decomposer(images, level="head", directions=torch.randn(192, dtype=torch.float64))
    assert scored.scores.shape[-1] == 1 and scored.vectors is None
    with pytest.raises(VectorsNotComputed, match="directions"):
        _ = scored.components
    assert "mean |score|" in scored.table(top=3)


@pytest.mark.parametrize("directions, message", [
    (torch.randn(2, 5, dtype=torch.float64), "width 5"),
    (torch.full((1, 192), float("nan"), dtype=torch.float64), "NaN"),
    (torch.ones(2, 192, dtype=torch.long), "floating point"),
    (torch.randn(2, 2, 192, dtype=torch.float64), r"\[k, D\]"),
])
def test_bad_directions_are_named(directions, message):
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    with pytest.raises(DirectionError, match=message):
        decomposer(torch.randn(1, *size, dtype=torch.float64), level="head", directions=directions)


def test_a_component_without_a_row_is_named():
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    table = torch.randn(1, 192, dtype=torch.float64)
    directions = per_component(table, lambda label: 0 if label.head is None else 5)
    with pytest.raises(DirectionError, match="no direction row for component blocks.0.attn"):
        decomposer(torch.randn(1, *size, dtype=torch.float64), level="head", directions=directions)


def test_aligner_directions_equal_text_contributions():
    """Per-component directions from a CompAlign (each component along its own or its head's map) give
    today's ``text_contributions`` on the full components."""
    from align.compalign import AlignerMismatch, CompAlign
    from align.parent_maps import aligner_directions, text_contributions

    torch.manual_seed(4)
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    images = torch.randn(2, *size, dtype=torch.float64)
    heads = decomposer(images[:1], level="head").labels
    aligner = CompAlign(heads, 192, 24, generator=torch.Generator().manual_seed(0))
    texts = torch.randn(2, 24)
    full = decomposer(images, level="token")
    scored = decomposer(images, level="token", directions=aligner_directions(aligner, texts))
    for j in range(2):
        expected = text_contributions(aligner, full.components, full.labels, texts[j]).double()
        assert float((scored.scores[..., j] - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    partial = CompAlign(heads[:3], 192, 24)
    with pytest.raises(AlignerMismatch, match="has no map in the aligner"):
        decomposer(images, level="head", directions=aligner_directions(partial, texts))
    with pytest.raises(AlignerMismatch, match=r"\[k, 24\]"):
        aligner_directions(aligner, torch.randn(2, 7))


def test_directions_split_over_several_backward_passes(monkeypatch):
    """Groups of one direction (columns of a row split, rows apart) give the same scores."""
    from decompose import scoring

    torch.manual_seed(5)
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    images = torch.randn(2, *size, dtype=torch.float64)
    table = torch.randn(3, 2, 192, dtype=torch.float64)
    directions = per_component(table, lambda label: (label.layer or 0) % 3)
    together = decomposer(images, level="token", directions=directions).scores
    monkeypatch.setattr(scoring, "BATCHED_DIRECTIONS", 1)
    apart = decomposer(images, level="token", directions=directions).scores
    assert torch.allclose(together, apart, rtol=1e-12, atol=1e-14)
    assert_scores_match(decomposer, images, "head", k=5)
