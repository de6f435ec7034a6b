"""Σ components == representation for every architecture in the model matrix."""
import pytest
import timm
import torch

from decompose import trace_and_decompose
from decompose.compiled import CallPath
from tests.models import TIMM_MODELS, input_size, tiny_open_clip_vision

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _timm(name):
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model, input_size(model, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_components_sum_to_representation(name, dtype):
    torch.manual_seed(0)
    model, size = _timm(name)
    model = model.to(dtype)
    images = torch.randn(2, *size, dtype=dtype)
    decomposer = trace_and_decompose(model)
    for level in ("branch", "head"):
        dec = decomposer(images, level=level)
        assert dec.relative_error() <= TOLERANCE[dtype], (level, dec.relative_error())
        assert dec.components.shape == (len(dec.labels),) + tuple(dec.representation.shape)
    if dec.stopped_before is None:  # the decomposed value is the model's real pre-logits output
        with torch.no_grad():  # SDPA may pick another kernel under autograd
            expected = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(dec.representation, expected, rtol=0, atol=0)


def assert_is_the_models_output(decomposer, representation: torch.Tensor, output: torch.Tensor) -> None:
    """The interpreter calls the model's own ops: bit for bit; a recorded graph (``--graphs``), to rounding."""
    exact = decomposer.last_path is CallPath.INTERPRETER
    torch.testing.assert_close(representation, output, rtol=0 if exact else None, atol=0 if exact else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_open_clip_image_tower(dtype):
    torch.manual_seed(0)
    tower = tiny_open_clip_vision().eval().to(dtype)
    images = torch.randn(2, 3, 64, 64, dtype=dtype)
    decomposer = trace_and_decompose(tower)
    for level in ("branch", "head", "token"):
        dec = decomposer(images, level=level)
        assert dec.relative_error() <= TOLERANCE[dtype] * (10 if level == "token" else 1)
    with torch.no_grad():
        assert_is_the_models_output(decomposer, dec.representation, tower(images))
    assert any(label.name.endswith("resblocks.1.attn") and label.head == 1 for label in dec.labels)


def test_maxvit_stops_before_tanh_and_says_so():
    model, size = _timm("maxvit_tiny_tf_224")
    dec = trace_and_decompose(model)(torch.randn(1, *size), level="branch")
    assert dec.stopped_before is not None and "tanh" in dec.stopped_before
    assert "head.pre_logits" in dec.stopped_before
    assert dec.representation.shape[-1] == model.head.pre_logits.fc.out_features


def test_logits_option_decomposes_classifier_output():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32,
                              num_classes=7).eval()
    images = torch.randn(2, 3, 32, 32)
    dec = trace_and_decompose(model, output="logits")(images, level="head")
    assert dec.representation.shape == (2, 7)
    with torch.no_grad():
        torch.testing.assert_close(dec.representation, model(images), rtol=0, atol=0)
    assert dec.relative_error() <= 1e-5
    assert "head.bias" in dec.keys


TOKEN_MODELS = {
    "vit_tiny_patch16_224": dict(depth=2, img_size=32, embed_dim=32, num_heads=2),
    "deit_tiny_distilled_patch16_224": dict(depth=2, img_size=32, embed_dim=32, num_heads=2),
    "vit_small_patch14_reg4_dinov2": dict(depth=2, embed_dim=32, num_heads=2, img_size=28),
    "swin_tiny_patch4_window7_224": dict(depths=(2,), num_heads=(2,), embed_dim=16, window_size=4, img_size=40),
    "maxvit_tiny_tf_224": dict(depths=(1, 1), embed_dim=(32, 64), img_size=32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(TOKEN_MODELS))
def test_token_level_sums_to_heads_and_representation(name, dtype):
    torch.manual_seed(0)
    kwargs = TOKEN_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().to(dtype)
    images = torch.randn(2, *input_size(model, kwargs), dtype=dtype)
    decomposer = trace_and_decompose(model)
    heads, tokens = decomposer(images, level="head"), decomposer(images, level="token")
    assert tokens.relative_error() <= (1e-4 if dtype == torch.float32 else 1e-10)
    for i, label in enumerate(heads.labels):
        if label.head is None:
            continue
        rows = [k for k, t in enumerate(tokens.labels) if t.name == label.name and t.head == label.head]
        assert len(rows) > 1
        scale = heads.components[i].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(tokens.components[rows].sum(0) / scale, heads.components[i] / scale,
                                   rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-10)
    assert all(t.position is not None for t in tokens.labels if t.token is not None)


def test_open_clip_vit_b_32_image_tower_full_size():
    """The tower of ``open_clip.create_model('ViT-B-32')`` itself (ln_post and proj included)."""
    import open_clip

    torch.manual_seed(0)
    tower = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    images = torch.randn(1, 3, 224, 224)
    decomposer = trace_and_decompose(tower)
    for level in ("branch", "head"):
        dec = decomposer(images, level=level)
        assert dec.relative_error() <= 1e-5
    assert {label.name for label in dec.labels} >= {"class_embedding", "positional_embedding", "ln_post.bias",
                                                     "transformer.resblocks.11.attn", "conv1"}
    assert sum(label.head is not None for label in dec.labels) == 12 * 12
    with torch.no_grad():
        assert_is_the_models_output(decomposer, dec.representation, tower(images))
