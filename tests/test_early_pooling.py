"""Early pooling (decompose.pooling) changes nothing but the cost, and is used where it applies."""
import math

import pytest
import timm
import torch
from torch import nn

from decompose import births, trace_and_decompose
from decompose.pooling import branches_for_level, gathering
from decompose.pooling.norm_scales import fit_norm_scales
from decompose.pooling.pooled_nodes import class_period
from tests.models import TIMM_MODELS, input_size

POOLED_MODELS = ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "maxvit_tiny_tf_224", "convnext_atto"]


def _double(name):
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().double()
    return model, input_size(model, kwargs)


@pytest.mark.parametrize("name", POOLED_MODELS)
def test_average_pooled_models_pool_every_join_on_a_smaller_grid(name):
    model, size = _double(name)
    decomposer = trace_and_decompose(model)
    plan = decomposer.plan(torch.randn(1, *size, dtype=torch.float64))
    assert plan.pooling is not None
    assert set(plan.joins) <= set(plan.pooling.nodes)
    start_value = plan.pooling.nodes.get(plan.pooling.tail.start)
    tokens = math.prod(plan.pooling.start_shape)
    assert start_value is not None and tokens < math.prod(size) / 4


@pytest.mark.parametrize("level", ["branch", "head", "token"])
@pytest.mark.parametrize("name", POOLED_MODELS)
def test_pooled_equals_unpooled(name, level):
    torch.manual_seed(0)
    model, size = _double(name)
    images = torch.randn(2, *size, dtype=torch.float64)
    decomposer = trace_and_decompose(model)
    pooled = decomposer(images, level=level)
    full = trace_and_decompose(model, prune=False)(images, level=level)
    assert pooled.keys == full.keys
    torch.testing.assert_close(pooled.components, full.components, rtol=1e-9, atol=1e-12)
    assert pooled.relative_error() <= 1e-10
    again = decomposer(images.flip(0), level=level)  # cached row maps of this batch shape
    torch.testing.assert_close(again.components, pooled.components.flip(1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "maxvit_tiny_tf_224"])
def test_windowed_attention_is_pooled_by_token_without_the_dense_split(name, monkeypatch):
    """SwinV2's branches end in a norm (x + norm(attn(x))): its per-row scale joins the pooling weights."""
    torch.manual_seed(0)
    model, size = _double(name)
    images = torch.randn(2, *size, dtype=torch.float64)
    decomposer = trace_and_decompose(model)
    plan = decomposer.plan(images[:1])
    attention = [birth for birth, found in plan.births.items() if found.kind == "attention"]
    chosen = branches_for_level(plan.pooling.branches, "token")
    assert attention and all(chosen[birth][1] == "token" for birth in attention)

    def dense(*args, **kwargs):
        raise AssertionError("the dense token split ran for a pooled branch")

    monkeypatch.setattr(births, "_split_tokens", dense)
    pooled = []

    def recorded(pooling, run, *args):
        pooled.append((run.spec.birth, run.windows))
        return token_components(pooling, run, *args)

    token_components = gathering._token_components
    monkeypatch.setattr(gathering, "_token_components", recorded)
    out = decomposer(images, level="token")
    assert out.relative_error() <= 1e-10
    # (a decomposer that records graphs walks the pass twice on its first call: each birth is pooled twice)
    assert sorted({birth.name for birth, _ in pooled}) == sorted(birth.name for birth in attention)
    assert max(windows for _, windows in pooled) > 1  # attention within windows: sources are (window, key)
    monkeypatch.setattr(gathering, "PIECE_ELEMENTS", 1)  # one window per piece
    pieces = decomposer(images, level="token")
    assert pieces.keys == out.keys
    torch.testing.assert_close(pieces.components, out.components, rtol=1e-12, atol=1e-14)


def test_class_token_model_is_not_pooled():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    plan = trace_and_decompose(model).plan(torch.randn(1, 3, 64, 64))
    assert plan.pooling is None


class _GroupNormTrunk(nn.Module):
    """Residual conv blocks, a group norm on the trunk (its frozen scale is per image and channel
    group, not per token), a 2x2 patch merge, and a mean over positions."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, stride=2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU()) for _ in range(2))
        self.group_norm = nn.GroupNorm(2, 8)
        self.merge = nn.Conv2d(8, 16, 2, stride=2)
        self.last = nn.Sequential(nn.Conv2d(16, 16, 1), nn.GELU())
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.blocks[0](x)
        x = self.group_norm(x)
        x = x + self.blocks[1](x)
        x = self.merge(x)
        x = x + self.last(x)
        return self.norm(x.permute(0, 2, 3, 1)).mean((1, 2))


def test_pooling_stays_exact_when_the_trunk_has_a_per_channel_frozen_scale():
    torch.manual_seed(0)
    model = _GroupNormTrunk().eval().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    pooled = trace_and_decompose(model)(images, level="branch")
    full = trace_and_decompose(model, prune=False)(images, level="branch")
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(pooled.representation, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled.components, full.components, rtol=1e-9, atol=1e-12)


def test_class_period_treats_unreached_tokens_as_wildcards():
    labels = torch.tensor([[0, 1, 0, 1], [2, 3, 2, 3], [0, -1, 0, 1], [2, 3, -1, 3]])
    assert class_period(labels) == (2, 2)
    assert class_period(torch.tensor([-1, 0, 0, 0])) == (1,)
    assert class_period(torch.tensor([0, 1, 2, 0, 1])) == (3,)


def test_post_norm_branches_are_pooled_in_float32_even_with_zero_norm_weights():
    """timm initialises SwinV2's post-norm weights to zero: the row scale is then any number (the
    branch adds nothing), and must not come out as 0/0 in float32."""
    kwargs = TIMM_MODELS["swinv2_tiny_window8_256"]
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **kwargs).eval()
    images = torch.randn(2, *input_size(model, kwargs))
    decomposer = trace_and_decompose(model)
    plan = decomposer.plan(images[:1])
    attention = [birth for birth, found in plan.births.items() if found.kind == "attention"]
    chosen = branches_for_level(plan.pooling.branches, "token")
    assert attention and all(chosen.get(birth, (None, None))[1] == "token" for birth in attention)
    assert decomposer(images, level="token").relative_error() <= 1e-4


@pytest.mark.parametrize("name", POOLED_MODELS)
def test_weights_from_norm_scales_equal_the_backward_pass(name):
    """Where the trunk's only data-dependent factors are the norms' per-row scales, each batch's γ comes
    from them (no probe, no backward pass), and gives the components the backward pass gives."""
    torch.manual_seed(0)
    model, size = _double(name)
    images = torch.randn(2, *size, dtype=torch.float64)
    decomposer = trace_and_decompose(model)
    plan = decomposer.plan(images[:1])
    assert plan.pooling.norm_scales is not None and plan.pooling.norm_scales.norms
    for level in ("head", "token"):
        closed = decomposer(images, level=level)
        kept, plan.pooling.norm_scales = plan.pooling.norm_scales, None
        backward = decomposer(images, level=level)
        plan.pooling.norm_scales = kept
        assert closed.keys == backward.keys
        torch.testing.assert_close(closed.components, backward.components, rtol=1e-9, atol=1e-12)
        assert closed.relative_error() <= 1e-10


def _merge_pairs_then_norm():
    """A token grid [1, images, 4, 2] whose token pairs merge into the rows of a norm [1, images, 2, 4]."""
    leaf = torch.zeros((), dtype=torch.float64, requires_grad=True)
    before = leaf.expand(1, 3, 4, 2)
    after = before.reshape(1, 3, 2, 4) * torch.arange(1.0, 5.0, dtype=torch.float64)
    return before, after


def test_norm_scales_find_the_row_each_token_feeds_and_check_another_image():
    before, after = _merge_pairs_then_norm()
    order = {"pooled": 0, "norm": 1}
    scales = {"norm": torch.tensor([[[2.0], [3.0]], [[2.0], [3.0]], [[5.0], [7.0]]], dtype=torch.float64)}
    factors = torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=torch.float64)   # token 2 reaches nothing
    rows = torch.tensor([0, 0, 1, 1])

    def gamma(truth_on_other):
        def of(node, image):
            scale = scales["norm"][image].flatten()[rows]
            return factors * (scale if image == 0 or truth_on_other else scale.flip(0))
        return of

    def tokens(node, values):                                             # [images, 4, 2] -> [images, T, F]
        return values

    fitted = fit_norm_scales(["pooled"], order, {"pooled": before, "norm": after}, scales, gamma(True), tokens, 1e-9)
    assert fitted is not None and fitted.norms == ["norm"]
    assert fitted.rows["pooled"][0][1].tolist() == [0, 0, 1, 1]
    batch = {"norm": torch.tensor([[[10.0], [100.0]]], dtype=torch.float64)}
    assert fitted.weights("pooled", batch, 1).tolist() == [[10.0, 20.0, 0.0, 400.0]]
    before, after = _merge_pairs_then_norm()
    assert fit_norm_scales(["pooled"], order, {"pooled": before, "norm": after}, scales, gamma(False), tokens,
                           1e-9) is None


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224"])
def test_heads_in_column_blocks_take_their_block_of_the_projection(name, monkeypatch):
    """A pooled head split whose first row map is a linear layer over equal head blocks uses each head's
    block of the weight; any layout falls back to one masked copy per head: the same components."""
    torch.manual_seed(0)
    model, size = _double(name)
    images = torch.randn(2, *size, dtype=torch.float64)
    blocks = trace_and_decompose(model)(images, level="head")
    monkeypatch.setattr(gathering, "_head_rows_mapped", gathering._masked_head_rows_mapped)
    masked = trace_and_decompose(model)(images, level="head")
    assert blocks.keys == masked.keys
    torch.testing.assert_close(blocks.components, masked.components, rtol=1e-9, atol=1e-12)
    assert blocks.relative_error() <= 1e-10


def test_a_batch_that_breaks_the_per_token_structure_raises():
    """Early pooling's weights hold where each token's adjoint is its weight times the unit tail's at its
    slot; a batch whose adjoints leave that line raises and names the way out (``prune=False``)."""
    from torch import fx

    from decompose.pooling.layout import _check_per_token_multiple

    node = fx.Graph().placeholder("trunk")
    unit = torch.randn(3, 5, dtype=torch.float64)                             # [K, F]
    slots = torch.tensor([0, 1, 2, 3])                                        # token 3: no slot (a zero row)
    gamma = torch.randn(2, 4, dtype=torch.float64)                            # [B, T]
    rows = torch.cat([unit, unit.new_zeros(1, 5)])[slots]                     # [T, F]
    real = gamma.unsqueeze(-1) * rows                                         # [B, T, F]
    _check_per_token_multiple(node, real, gamma, unit, slots)
    real[1, 2] += 1e-3 * real[1, 2].norm() * torch.randn(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="not a per-token multiple.*prune=False"):
        _check_per_token_multiple(node, real, gamma, unit, slots)
