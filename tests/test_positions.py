"""Source positions of token components, and that they are the true image positions."""
import copy
import math

import pytest
import timm
import torch

from decompose import trace_and_decompose
from tests.models import tiny_open_clip_vision


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreter", "compiled"])
def test_perturbing_one_patch_changes_only_its_own_token_components(compiled):
    """One attention layer: token j's component is A[cls, j] · V[j]. Changing the pixels of patch p
    changes V[p] and (through the softmax normaliser) rescales every A[cls, j] of a head by one
    common factor, so all other token components of that head are scaled copies of themselves.
    ``compiled``: both batches decomposed by one graph recorded on a third (``decomposer.compiled``)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, patch_size=8,
                              embed_dim=32, num_heads=2).eval().double()
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    perturbed = images.clone()
    perturbed[:, :, 8:16, 16:24] += torch.randn(1, 3, 8, 8, dtype=torch.float64)  # patch row 1, col 2
    decomposer = trace_and_decompose(model)
    decompose = decomposer.compiled("token", torch.randn_like(images)).decompose if compiled else \
        (lambda batch: decomposer(batch, level="token"))
    before, after = decompose(images), decompose(perturbed)
    assert before.keys == after.keys
    assert before.relative_error() < 1e-10 and after.relative_error() < 1e-10
    for head in (0, 1):
        rows = [i for i, label in enumerate(before.labels) if label.head == head and label.token is not None]
        positions = [before.labels[i].position for i in rows]
        assert sorted(p for p in positions if isinstance(p, tuple)) == [(r, c) for r in range(4) for c in range(4)]
        assert positions.count("cls_token") == 1
        old, new = before.components[rows, 0], after.components[rows, 0]
        factors = (new * old).sum(-1) / (old * old).sum(-1)
        changed = [p for p, f, o, n in zip(positions, factors, old, new)
                   if not torch.allclose(n, f * o, rtol=1e-9, atol=1e-12)]
        assert changed == [(1, 2)], changed
        unchanged = [f for p, f in zip(positions, factors) if p != (1, 2)]
        assert torch.allclose(torch.stack(unchanged), unchanged[0], rtol=1e-9)


@pytest.mark.parametrize("name, kwargs, size, roles", [
    ("vit_small_patch14_reg4_dinov2", {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 56}, 56,
     ["cls_token"] + ["reg_token"] * 4),
    ("deit_tiny_distilled_patch16_224", {"depth": 1, "img_size": 48}, 48, ["cls_token", "dist_token"]),
])
def test_special_tokens_are_named_by_their_parameter(name, kwargs, size, roles):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    dec = trace_and_decompose(model)(torch.randn(1, 3, size, size), level="token")
    assert dec.relative_error() <= 1e-4
    head0 = [label.position for label in dec.labels if label.head == 0 and label.token is not None]
    assert head0[:len(roles)] == roles
    grid = size // (14 if "patch14" in name else 16)
    assert head0[len(roles):] == [(r, c) for r in range(grid) for c in range(grid)]


def test_open_clip_token_positions():
    torch.manual_seed(0)
    dec = trace_and_decompose(tiny_open_clip_vision().eval())(torch.randn(1, 3, 64, 64), level="token")
    assert dec.relative_error() <= 1e-4
    head0 = [label.position for label in dec.labels if label.head == 0 and label.token is not None
             and label.layer == 0]
    assert head0 == ["class_embedding"] + [(r, c) for r in range(4) for c in range(4)]


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreter", "compiled"])
def test_windowed_attention_token_positions_are_image_positions(compiled):
    """Swin with padding (10×10 tokens, 4×4 windows): every real position once per head, padded keys
    named, and a perturbed patch leaves every token component of the other windows unchanged."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1,), num_heads=(2,),
                              embed_dim=16, window_size=4, img_size=40).eval().double()
    images = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    perturbed = images.clone()
    perturbed[:, :, 4:8, 24:28] += 1.0                       # token (1, 6): window (0, 1)
    decomposer = trace_and_decompose(model)
    decompose = decomposer.compiled("token", torch.randn_like(images)).decompose if compiled else \
        (lambda batch: decomposer(batch, level="token"))
    before, after = decompose(images), decompose(perturbed)
    assert before.relative_error() < 1e-10 and after.relative_error() < 1e-10
    rows = [i for i, label in enumerate(before.labels) if label.head == 0 and label.token is not None]
    positions = [before.labels[i].position for i in rows]
    assert sorted(p for p in positions if isinstance(p, tuple)) == [(r, c) for r in range(10) for c in range(10)]
    assert positions.count("padding") == 9 * 16 - 100
    for i, position in zip(rows, positions):
        if isinstance(position, tuple) and not (position[0] < 4 and 4 <= position[1] < 8):
            torch.testing.assert_close(after.components[i], before.components[i], rtol=1e-10, atol=1e-12)
    same_window = [i for i, p in zip(rows, positions) if isinstance(p, tuple) and p[0] < 4 and 4 <= p[1] < 8]
    assert not torch.allclose(after.components[same_window], before.components[same_window])


@pytest.mark.parametrize("compiled", [False, True], ids=["interpreter", "compiled"])
def test_later_stage_token_positions_are_image_positions(compiled):
    """Two-stage Swin (64 px, patch 8: an 8×8 grid in four 4×4 windows, then a 4×4 grid). Perturbing
    pixels of the top-right window changes only that window's stage-0 values, hence only the stage-1
    tokens merged from it (rows 0-1, cols 2-3 of the 4×4 grid): every other stage-1 token component is a
    scaled copy of itself (the attention weights and norm scales change, its value does not)."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(1, 1), num_heads=(2, 2),
                              embed_dim=16, window_size=4, img_size=64, patch_size=8).eval().double()
    images = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    perturbed = images.clone()
    perturbed[:, :, 8:16, 40:48] += 1.0                       # stage-0 token (1, 5): window (0, 1)
    decomposer = trace_and_decompose(model)
    decompose = decomposer.compiled("token", torch.randn_like(images)).decompose if compiled else \
        (lambda batch: decomposer(batch, level="token"))
    before, after = decompose(images), decompose(perturbed)
    assert before.relative_error() < 1e-10 and after.relative_error() < 1e-10
    stage1 = [i for i, label in enumerate(before.labels) if label.token is not None and label.layer == 1]
    assert {before.labels[i].head for i in stage1} == {0, 1}
    positions = [before.labels[i].position for i in stage1]
    assert sorted(set(positions)) == [(r, c) for r in range(4) for c in range(4)]
    old, new = before.components[stage1, 0], after.components[stage1, 0]
    factors = (new * old).sum(-1) / (old * old).sum(-1)
    changed = {p for p, f, o, n in zip(positions, factors, old, new)
               if not torch.allclose(n, f * o, rtol=1e-8, atol=1e-12)}
    assert changed == {(r, c) for r in (0, 1) for c in (2, 3)}, changed


def test_overlapping_receptive_field_positions_are_the_same_in_float32_and_float64():
    """MaxViT's convolutional stem and pooled shortcuts make receptive fields overlap, so positions come
    from support centroids, found in the model's own dtype: a float32 and a float64 copy give the same
    labels, and every attention's keys of one head cover its whole grid once per window."""
    torch.manual_seed(0)
    model = timm.create_model("maxvit_tiny_tf_224", pretrained=False, depths=(1, 1), embed_dim=(32, 64),
                              img_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    single = trace_and_decompose(model)(images, level="token")
    double = trace_and_decompose(copy.deepcopy(model).double())(images.double(), level="token")
    assert single.relative_error() <= 1e-4 and double.relative_error() <= 1e-10
    assert single.keys == double.keys
    assert [label.position for label in single.labels] == [label.position for label in double.labels]
    layers = {label.layer for label in single.labels if label.token is not None}
    assert len(layers) == 4  # block and grid attention in each of two stages
    for layer in layers:
        positions = [label.position for label in single.labels
                     if label.token is not None and label.layer == layer and label.head == 0]
        side = math.isqrt(len(positions))
        assert sorted(positions) == [(r, c) for r in range(side) for c in range(side)]


def test_forks_with_the_same_elements_per_key_share_supports_key_by_key():
    from tracer.positions import _same_groups

    block = torch.tensor([[1, 1, 2, 2], [3, 3, 4, 4]])        # keys = rows of 2 elements, numbered one way
    grid = torch.tensor([[2, 2, 4, 4], [1, 1, 3, 3]])         # the same element sets, numbered another way
    assert _same_groups(grid, block, 4) == [2, 0, 3, 1]       # grid key 1 holds block key 3's elements ...
    assert _same_groups(block, block, 4) == [0, 1, 2, 3]
    split = torch.tensor([[1, 2, 3, 3], [4, 4, 4, 4]])        # other element sets: no sharing
    assert _same_groups(split, block, 4) is None
    assert _same_groups(torch.tensor([[1, 1, 0, 0], [2, 2, 3, 3]]), block, 4) is None   # an element without a key


@pytest.mark.parametrize("kernel, stride, dtype", [
    (4, 2, torch.float32),    # neighbours share cells, none reaches a cell alone everywhere (MaxViT's pooled shortcut)
    (3, 2, torch.float64),    # some cells reached by one key only
    (3, 1, torch.float32),    # 1,600 keys; some are tested again in a second round
    (17, 2, torch.float32),   # every key reaches a large part of the grid: one pass per key
])
def test_receptive_fields_found_in_shared_passes_are_each_keys_own(kernel, stride, dtype):
    """Planted truth: a strided convolution from a 40×40 grid to tokens, one key per token numbered in a
    shuffled order (as windows number them), plus key numbers no element has. The supports found with
    keys sharing backward passes are the cells each key's own backward pass reaches."""
    from tracer.receptive_fields import key_supports

    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(1, 1, 3, 40, 40, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = torch.randn(8, 3, kernel, kernel, generator=generator, dtype=torch.float64).to(dtype)
    with torch.enable_grad():
        embedding = torch.nn.functional.conv2d(grid[0], weight, stride=stride, padding=kernel // 2
                                               ).permute(0, 2, 3, 1)                    # [1, h, w, 8] tokens
    tokens = embedding.shape[1] * embedding.shape[2]
    keys = tokens + 3
    numbers = torch.randperm(keys, generator=generator)[:tokens]               # three keys without elements
    element_keys = (numbers + 1).view(1, *embedding.shape[1:3], 1).expand(embedding.shape)
    found = key_supports(grid, embedding, element_keys, keys)
    direction = torch.rand(embedding.shape, generator=generator, dtype=torch.float64).to(dtype) + 0.5
    for key in range(keys):
        own, = torch.autograd.grad(embedding, grid, direction * (element_keys == key + 1), retain_graph=True)
        expected = (own.abs().flatten(0, -3).amax(0).flatten() > 0).nonzero().flatten()
        assert torch.equal(found[key], expected), key


def test_keys_read_from_a_tuple_valued_trunk_node_have_unknown_positions():
    """MViTv2's blocks return (tokens, size): an attention whose stream is such a node gets no positions
    (None) instead of an error; the level-token sum stays exact."""
    from timm.models import mvitv2

    torch.manual_seed(0)
    model = mvitv2.MultiScaleVit(cfg=mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=32, num_heads=1),
                                 img_size=64).eval()
    dec = trace_and_decompose(model)(torch.randn(2, 3, 64, 64), level="token")
    assert dec.relative_error() <= 1e-5
    positions = [label.position for label in dec.labels if label.token is not None]
    assert None in positions and all(p is None or isinstance(p, tuple) for p in positions)


class _ConvolvedTrunk(torch.nn.Module):
    """A strided convolutional stem (overlapping receptive fields), then blocks whose trunk adds a depthwise
    convolution of itself (``x + dwconv(x)``, as DaViT's position encodings: every block widens the receptive
    fields) before an attention branch over the tokens."""

    def __init__(self, dim: int = 16, depth: int = 3, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.stem = torch.nn.Conv2d(3, dim, 5, stride=2, padding=2)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(depth))
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(dim) for _ in range(depth))
        self.qkvs = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth))
        self.projs = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))

    def forward(self, x):
        x = self.stem(x)                                                    # [B, C, H, W]
        batch, channels, height, width = x.shape
        for conv, norm, qkv, proj in zip(self.convs, self.norms, self.qkvs, self.projs):
            x = x + conv(x)
            tokens = x.flatten(2).transpose(1, 2)                           # [B, N, C]
            q, k, v = qkv(norm(tokens)).reshape(batch, -1, 3, self.heads, channels // self.heads
                                                ).permute(2, 0, 3, 1, 4)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            tokens = tokens + proj(attended.transpose(1, 2).reshape(batch, -1, channels))
            x = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return x.mean((2, 3))


def test_supports_composed_through_an_earlier_fork_give_the_direct_positions(monkeypatch):
    """Each block's keys reach the image only through the previous block's embedding, so their supports are
    composed from that block's tokens (passes ending there). Every key's support centroid equals the one
    found by passes to the image, and each attention's keys cover the 16×16 token grid once."""
    import tracer.composed_supports as composed

    torch.manual_seed(0)
    model = _ConvolvedTrunk().eval()
    images = torch.randn(1, 3, 32, 32)
    compositions, centroids = [], []
    compose, key_centroids = composed.SupportChain._composed, composed.SupportChain.key_centroids

    def counted(self, *args):
        result = compose(self, *args)
        compositions.append(result is not None)
        return result

    def recorded(self, *args):
        centroids.append(key_centroids(self, *args))
        return centroids[-1]

    monkeypatch.setattr(composed.SupportChain, "_composed", counted)
    monkeypatch.setattr(composed.SupportChain, "key_centroids", recorded)
    decomposer = trace_and_decompose(model)
    found = decomposer.key_positions(decomposer.plan(images))
    assert compositions == [True, True]                     # blocks 1 and 2, through blocks 0 and 1
    composed_centroids, centroids[:] = list(centroids), []
    monkeypatch.setattr(composed, "only_through", lambda *args: False)
    direct = trace_and_decompose(model)
    expected = direct.key_positions(direct.plan(images))
    assert len(centroids) == 3 and composed_centroids == centroids
    assert list(found.values()) == list(expected.values())
    for positions in found.values():
        assert sorted(positions) == [(r, c) for r in range(16) for c in range(16)]
