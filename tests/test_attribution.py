"""``attribute``: class, text and vector targets score components exactly; tables, positions, plots; errors."""
from __future__ import annotations

import pytest
import timm
import torch

from align import load_clip
from align.attribution import AttributionTargetError, attribute
from align.compalign import CompAlign
from align.parent_maps import text_contributions
from align.text_bank import TextEmbeddingCache, encode_descriptions
from decompose import trace_and_decompose
from tests.test_align_clip import TINY_CLIP

KWARGS = dict(depth=2, embed_dim=48, num_heads=2, img_size=32, patch_size=8, num_classes=5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).double().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_a_class_target_sums_to_the_logit(model, images):
    decomposer = trace_and_decompose(model, output="logits")
    result = attribute(decomposer, images, target=3)
    with torch.no_grad():
        logits = model(images)
    assert torch.allclose(result.scores.sum(0), logits[:, 3], rtol=1e-9, atol=1e-12)
    top = result.top_components(4)
    assert [value for _, value in top] == sorted((value for _, value in top), reverse=True)
    assert "class 3" in result.table() and "source position" in result.table()
    positions = result.top_positions(3, image=1)
    assert len(positions) == 3 and all(isinstance(p, tuple) and len(p) == 2 for p, _ in positions)
    assert abs(sum(result.position_scores(image=0).values()) - float(
        result.scores[[i for i, label in enumerate(result.labels) if label.token is not None and
                       isinstance(label.position, tuple)], 0].sum())) < 1e-9
    assert result.heatmaps((32, 32)).shape == (3, 32, 32)
    assert result.plot().axes


def test_one_class_per_image(model, images):
    decomposer = trace_and_decompose(model, output="logits")
    classes = [4, 0, 4]
    result = attribute(decomposer, images, target=classes, level="head")
    full = decomposer(images, level="head")
    for b, c in enumerate(classes):
        assert torch.allclose(result.scores[:, b], full.components[:, b, c], rtol=1e-9, atol=1e-12)
    assert result.targets == ["class 4", "class 0", "class 4"]


def test_a_vector_target(model, images):
    decomposer = trace_and_decompose(model)
    vector = torch.randn(48, dtype=torch.float64)
    result = attribute(decomposer, images, target=vector, level="branch")
    full = decomposer(images, level="branch")
    assert torch.allclose(result.scores, full.components @ vector, rtol=1e-9, atol=1e-12)


def test_a_text_target_through_an_aligner(model, images):
    torch.manual_seed(2)
    clip = load_clip(config=TINY_CLIP)
    decomposer = trace_and_decompose(model)
    labels = decomposer(images[:1], level="head").labels
    aligner = CompAlign(labels, 48, clip.embed_dim, generator=torch.Generator().manual_seed(3))
    cache = TextEmbeddingCache(None)
    result = attribute(decomposer, images, target=["a red cube", "a dog", "a red cube"], aligner=aligner,
                       clip=clip, templates=("{}",))
    full = decomposer(images, level="token")
    texts = encode_descriptions(clip, ["a red cube", "a dog"], ("{}",), cache=cache)
    expected = torch.stack([text_contributions(aligner, full.components, full.labels, texts[t])[:, b]
                            for b, t in enumerate([0, 1, 0])], 1)
    assert torch.allclose(result.scores.float(), expected, rtol=1e-4, atol=1e-5)


def test_bad_targets_are_named(model, images):
    logits = trace_and_decompose(model, output="logits")
    features = trace_and_decompose(model)
    with pytest.raises(AttributionTargetError, match="output='logits'"):
        attribute(features, images, target=1)
    with pytest.raises(AttributionTargetError, match=r"\[7\] are outside the model's 5 classes"):
        attribute(logits, images, target=7)
    with pytest.raises(AttributionTargetError, match="2 targets for 3 images"):
        attribute(logits, images, target=[1, 2])
    with pytest.raises(AttributionTargetError, match="aligner="):
        attribute(features, images, target="a dog")
    with pytest.raises(ValueError, match="width 3"):
        attribute(features, images, target=torch.randn(3, dtype=torch.float64))
