"""Directions per image (each image its own class row or text) score each image along its own directions,
at the cost of shared ones: the scores equal ⟨full components, u_b⟩ on both pull-back paths, an aligner's
per-image directions equal ``text_contributions``, the pulled-back directions do not grow with the batch,
and a table for another batch size is refused."""
from __future__ import annotations

import pytest
import torch

from decompose import scoring, trace_and_decompose
from decompose.directions import DirectionError, per_component_per_image, per_image
from tests.models import TIMM_MODELS, matrix_decomposer, matrix_model

PATHS = [("vit_tiny_patch16_224", True), ("swin_tiny_patch4_window7_224", True),
         ("swin_tiny_patch4_window7_224", False)]
PATH_IDS = ["vit-adjoints", "swin-early-pooling", "swin-adjoints"]


def decomposer_for(name: str, prune: bool, seed: int = 0):
    """The matrix model; without pruning (every birth at full size through its adjoint) at 56 pixels."""
    torch.manual_seed(seed)
    if prune:
        model, size = matrix_model(name)
    else:
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=0, **{**TIMM_MODELS[name], "img_size": 56})
        model, size = model.double().eval(), (3, 56, 56)
    return trace_and_decompose(model, prune=prune), size


def relative(scores: torch.Tensor, expected: torch.Tensor, representation: torch.Tensor, table: torch.Tensor
             ) -> float:
    """max |scores − expected| / (‖representation‖ ‖u‖), the largest of each over images and directions."""
    scale = representation.flatten(1).norm(dim=1).max() * table.norm(dim=-1).max()
    return float((scores - expected).abs().max() / scale)


@pytest.mark.parametrize("name, prune", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("level", ["head", "token"])
def test_per_image_scores_equal_projected_components(name, prune, level):
    decomposer, size = decomposer_for(name, prune)
    images = torch.randn(3, *size, dtype=torch.float64)
    full = decomposer(images, level=level)
    components = full.components.flatten(2)                                      # [C, B, D]
    table = torch.randn(3, 2, components.shape[-1], dtype=torch.float64)         # [B, k, D]
    scored = decomposer(images, level=level, directions=per_image(table))
    assert [label.key for label in scored.labels] == full.keys
    expected = torch.einsum("cbd,bkd->cbk", components, table)
    assert relative(scored.scores, expected, full.representation, table) <= 1e-10
    projected = torch.einsum("bd,bkd->bk", full.representation.flatten(1), table)
    assert relative(scored.sum(), projected, full.representation, table) <= 1e-10
    assert relative(scored.projected_representation(), projected, full.representation, table) <= 1e-12


@pytest.mark.parametrize("name, prune", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("by_token", [False, True], ids=["by-head", "by-token"])
def test_per_component_per_image_scores(name, prune, by_token):
    """Component c of image b along table[row(c), b]: rows by head (early pooling folds each head's rows
    into its token matrix, per image) or by token parity (rows differ inside a head: projected piece by piece)."""
    decomposer, size = decomposer_for(name, prune, seed=1)
    images = torch.randn(2, *size, dtype=torch.float64)
    full = decomposer(images, level="token")

    def key(label):
        return (label.name, label.head, (label.token or 0) % 2 if by_token else None)

    keys = sorted({key(label) for label in full.labels}, key=str)
    row = {k: i for i, k in enumerate(keys)}
    table = torch.randn(len(keys), 2, 2, full.representation.shape[-1], dtype=torch.float64)   # [M, B, k, D]
    scored = decomposer(images, level="token", directions=per_component_per_image(table, lambda label: row[key(label)]))
    rows = torch.tensor([row[key(label)] for label in full.labels])
    expected = torch.einsum("cbd,cbkd->cbk", full.components, table[rows])
    assert relative(scored.scores, expected, full.representation, table) <= 1e-10


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_aligner_directions_per_image_equal_text_contributions(name):
    """Each image along its own text through a CompAlign equals ``text_contributions`` of that image's full
    token components; ``text_heatmaps`` equals ``token_heatmaps`` of them."""
    from align.compalign import AlignerMismatch, CompAlign
    from align.heatmaps import text_heatmaps, token_heatmaps
    from align.parent_maps import per_image_aligner_directions, text_contributions

    decomposer, size = matrix_decomposer(name, seed=2)
    images = torch.randn(3, *size, dtype=torch.float64)
    heads = decomposer(images[:1], level="head").labels
    width = decomposer.output_width(images)
    aligner = CompAlign(heads, width, 24, generator=torch.Generator().manual_seed(0)).double()
    texts = torch.randn(3, 24, dtype=torch.float64)                              # [B, d_clip]
    full = decomposer(images, level="token")
    expected = torch.stack([text_contributions(aligner, full.components[:, b:b + 1], full.labels, texts[b])[:, 0]
                            for b in range(3)], 1)                               # [C, B]
    scored = decomposer(images, level="token", directions=per_image_aligner_directions(aligner, texts))
    scale = float(expected.abs().max())
    assert float((scored.scores[..., 0] - expected).abs().max()) <= 1e-10 * scale
    maps = text_heatmaps(decomposer, aligner, images, texts)
    assert maps.shape == (3, *size[1:])
    assert torch.allclose(maps, token_heatmaps(expected, full.labels, size[1:]), rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(AlignerMismatch, match=r"\[B, 24\]"):
        per_image_aligner_directions(aligner, torch.randn(3, 7))


class PulledBack:
    """Counts the directions pulled back through the trunk (``torch.autograd.grad`` calls of ``_adjoints``:
    each batched cotangent's leading size)."""

    def __init__(self, monkeypatch):
        self.directions, original = 0, torch.autograd.grad

        def counted(outputs, inputs, grad_outputs=None, is_grads_batched=False, **kwargs):
            if is_grads_batched:
                self.directions += grad_outputs.shape[0]
            return original(outputs, inputs, grad_outputs, is_grads_batched=is_grads_batched, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counted)

    def during(self, decomposer, images: torch.Tensor, directions) -> int:
        """Directions pulled back by one call at level token."""
        before = self.directions
        decomposer(images, level="token", directions=directions)
        return self.directions - before


def test_directions_pulled_back_do_not_grow_with_the_batch(monkeypatch):
    """One direction per image pulls back as many directions as one shared direction, for 1 or 4 images
    (k = B shared directions would pull back B)."""
    decomposer, size = matrix_decomposer("vit_tiny_patch16_224", seed=3)
    width = 192
    counter = PulledBack(monkeypatch)
    counts = {}
    for batch in (1, 4):
        images = torch.randn(batch, *size, dtype=torch.float64)
        decomposer(images, level="token")                                        # plans, key positions
        table = torch.randn(batch, width, dtype=torch.float64)
        counts[batch] = counter.during(decomposer, images, per_image(table))
        shared = counter.during(decomposer, images, table[0])
        assert counts[batch] == shared > 0
    assert counts[1] == counts[4]


def test_early_pooling_folds_per_image_directions_into_the_token_matrices(monkeypatch):
    """On Swin, the token components of a head with one row per image reach their scores through the
    head's matrix times each image's directions: the projection at the output sees as many components as
    with shared directions (the embedding, constants and branches), never the token pieces."""
    decomposer, size = matrix_decomposer("swin_tiny_patch4_window7_224", seed=4)
    images = torch.randn(2, *size, dtype=torch.float64)
    full = decomposer(images, level="token")
    projected = []
    original = scoring.Projection.__call__

    def counted(self, ids, values):
        projected.append(len(ids))
        return original(self, ids, values)

    monkeypatch.setattr(scoring.Projection, "__call__", counted)
    table = torch.randn(2, 1, full.representation.shape[-1], dtype=torch.float64)
    decomposer(images, level="token", directions=table[0])
    shared = sum(projected)
    projected.clear()
    decomposer(images, level="token", directions=per_image(table))
    assert sum(projected) == shared < len(full.labels) // 4


def test_per_image_directions_on_a_compiled_graph():
    """Recorded with directions per image, a graph scores image b of every batch along the b-th directions."""
    decomposer, size = matrix_decomposer("swin_tiny_patch4_window7_224", seed=5)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *size, generator=generator, dtype=torch.float64)
    images = torch.randn(2, *size, generator=generator, dtype=torch.float64)
    directions = per_image(torch.randn(2, 3, decomposer.output_width(example), dtype=torch.float64))
    for level in ("head", "token"):
        got = decomposer.compiled(level, example, directions=directions).decompose(images)
        expected = decomposer(images, level=level, directions=directions)
        assert got.keys == expected.keys
        assert torch.allclose(got.scores, expected.scores, rtol=1e-12, atol=1e-12 * float(expected.scores.abs().max()))


@pytest.mark.parametrize("directions, message", [
    (per_image(torch.randn(3, 192, dtype=torch.float64)), "given for 3 images but the batch has 2"),
    (per_image(torch.randn(2, 1, 5, dtype=torch.float64)), r"width 5 .* \[2, k, 192\]"),
    (per_component_per_image(torch.randn(4, 1, 192, dtype=torch.float64), lambda label: 0),
     "given for 1 images but the batch has 2"),
])
def test_per_image_directions_for_another_batch_are_named(directions, message):
    decomposer, size = matrix_decomposer("vit_tiny_patch16_224")
    with pytest.raises(DirectionError, match=message):
        decomposer(torch.randn(2, *size, dtype=torch.float64), level="head", directions=directions)


@pytest.mark.parametrize("make, table, message", [
    (per_image, torch.full((2, 192), float("inf"), dtype=torch.float64), "NaN or inf"),
    (per_image, torch.randn(2, 2, 2, 192, dtype=torch.float64), r"\[B, k, D\]"),
    (lambda t: per_component_per_image(t, lambda label: 0), torch.randn(192, dtype=torch.float64), r"\[M, B, k, D\]"),
])
def test_bad_per_image_tables_are_named(make, table, message):
    with pytest.raises(DirectionError, match=message):
        make(table)
