"""The Grad-CAM baseline from the graph equals Grad-CAM by hand, for fused and explicit attention."""
import pytest
import timm
import torch

from decompose import trace_and_decompose
from decompose.attention_maps import AttentionMapCapture
from toyworld.gradient_maps import gradient_attention_map


def tiny_vit(fused: bool):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=5).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def by_hand(model, images, directions):
    """ReLU(dscore/dA * A) of the last block's class-token row, with A read by a hook (explicit attention)."""
    captured = {}

    def keep(_, __, output):
        output.retain_grad()
        captured["attention"] = output

    hook = model.blocks[-1].attn.attn_drop.register_forward_hook(keep)
    try:
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        (features * directions).sum().backward()
    finally:
        hook.remove()
    attention = captured["attention"]                                    # [B, heads, N, N]
    return (attention.grad * attention).clamp_min(0)[:, :, 0].detach()  # the class token's row: [B, heads, N]


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_map_matches_grad_cam_by_hand(fused):
    images = torch.randn(3, 3, 32, 32)
    directions = torch.randn(3, 32)
    found = gradient_attention_map(AttentionMapCapture(trace_and_decompose(tiny_vit(fused))), images, directions)
    expected = by_hand(tiny_vit(False), images, directions)
    assert found.weights.shape == expected.shape and found.queries == 1
    torch.testing.assert_close(found.weights, expected, atol=1e-6, rtol=1e-4)
    assert found.positions[0] == "cls_token" and found.positions[1:] == [(r, c) for r in range(4) for c in range(4)]


def test_windowed_attention_maps_every_image_position():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    capture = AttentionMapCapture(trace_and_decompose(model))
    found = gradient_attention_map(capture, images, torch.randn(2, model.num_features))
    last = capture(images)[-1]
    assert found.name == last.name and found.weights.shape == last.weights.shape
    assert sorted(p for p in found.positions if isinstance(p, tuple)) == [(r, c) for r in range(4) for c in range(4)]
    assert bool((found.weights >= 0).all()) and bool(found.weights.sum() > 0)
