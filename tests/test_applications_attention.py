"""Attention maps of the output-reading queries equal attention computed by hand from the
model's own modules (the test knows the test models; the library code does not)."""
import timm
import torch
from models import tiny_open_clip_vision

from align import attention_heatmaps, token_heatmaps
from decompose import trace_and_decompose
from decompose.attention_maps import AttentionMapCapture, attention_maps


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                             img_size=32, patch_size=8, num_classes=0).eval()


def manual_vit_attention(model, images):
    """Per block: softmax(q kᵀ · scale) [B, heads, N, N], from the block's own qkv / norms."""
    weights = []
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block in model.blocks:
            attn, y = block.attn, block.norm1(x)
            B, N, C = y.shape
            qkv = attn.qkv(y).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k, _ = qkv.unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            weights.append((q * attn.scale @ k.transpose(-2, -1)).softmax(-1))
            x = block(x)
    return weights


def test_class_token_row_matches_manual_softmax_attention():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    maps = attention_maps(trace_and_decompose(model), images)
    expected = manual_vit_attention(model, images)
    assert [m.name for m in maps] == ["blocks.0.attn", "blocks.1.attn"] and [m.layer for m in maps] == [0, 1]
    for found, manual in zip(maps, expected):
        assert found.queries == 1                                   # a class-token model reads one row
        torch.testing.assert_close(found.weights, manual[:, :, 0], atol=1e-6, rtol=1e-5)
        assert found.positions[0] == "cls_token"
        assert found.positions[1:] == [(r, c) for r in range(4) for c in range(4)]


def test_pooled_windowed_model_averages_every_query_of_its_windows():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32, img_size=56, num_classes=0).eval()
    softmax_outputs = []
    hooks = [block.attn.softmax.register_forward_hook(lambda m, i, out: softmax_outputs.append(out))
             for stage in model.layers for block in stage.blocks]
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    capture = AttentionMapCapture(trace_and_decompose(model))
    maps = capture(images)
    assert len(maps) == len(softmax_outputs) == 4
    for found, attention in zip(maps, softmax_outputs):               # attention [B * windows, heads, N, N]
        windows, keys = attention.shape[0] // 2, attention.shape[-1]
        # source w * N + k of image b: mean over all queries of the image (every window) of attention to key k
        expected = attention.sum(-2).unflatten(0, (2, windows)).permute(0, 2, 1, 3).flatten(2) / (windows * keys)
        torch.testing.assert_close(found.weights, expected, atol=1e-6, rtol=1e-5)
        assert found.queries == windows * keys
        grid = {p for p in found.positions}
        side = int((windows * keys) ** 0.5)
        assert grid == {(r, c) for r in range(side) for c in range(side)}   # windows (shifted ones too) undone
    again = capture(images[:1])                                          # cached relevance, other batch size
    torch.testing.assert_close(again[-1].weights, maps[-1].weights[:1])


def test_open_clip_multihead_attention_matches_its_own_weights():
    torch.manual_seed(0)
    tower = tiny_open_clip_vision().eval()
    images = torch.randn(2, 3, 64, 64)
    inputs = {}
    block = tower.transformer.resblocks[-1]
    hook = block.register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        tower(images)
        hook.remove()
        x = block.ln_1(inputs["x"])
        _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=False)
    maps = attention_maps(trace_and_decompose(tower), images)
    torch.testing.assert_close(maps[-1].weights, weights[:, :, 0], atol=1e-6, rtol=1e-5)
    assert maps[-1].positions[0] == "class_embedding"


def test_baseline_and_token_heatmaps_from_a_real_decomposition():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    decomposer = trace_and_decompose(model)
    baseline = attention_heatmaps(attention_maps(decomposer, images), (32, 32))
    assert baseline.shape == (2, 32, 32) and bool((baseline >= 0).all())
    dec = decomposer(images, level="token")
    direction = torch.randn(dec.components.shape[-1])
    contributions = dec.components @ direction                             # [C, B]
    heatmaps = token_heatmaps(contributions, dec.labels, (32, 32))
    assert heatmaps.shape == (2, 32, 32)
    # the mean over pixels of a bilinear upsampling (cells of equal area) is the mean over cells, so the
    # heatmap's pixel sum / 64 is the sum of the patch tokens' contributions (class token left out)
    patch_rows = [i for i, l in enumerate(dec.labels) if l.token is not None and isinstance(l.position, tuple)]
    torch.testing.assert_close(heatmaps.sum((1, 2)) / 64, contributions[patch_rows].sum(0), atol=1e-4, rtol=1e-4)
