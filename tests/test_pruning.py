"""Pruning to what reaches the output changes nothing but the cost."""
import pytest
import timm
import torch

from decompose import trace_and_decompose
from tests.models import TIMM_MODELS, input_size

PRUNED_MODELS = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "vit_small_patch14_reg4_dinov2",
                 "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224", "beit_base_patch16_224"]


@pytest.mark.parametrize("name", PRUNED_MODELS)
def test_pruned_equals_unpruned(name):
    torch.manual_seed(0)
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().double()
    images = torch.randn(2, *input_size(model, kwargs), dtype=torch.float64)
    pruned = trace_and_decompose(model)(images, level="head")
    full = trace_and_decompose(model, prune=False)(images, level="head")
    assert pruned.keys == full.keys
    torch.testing.assert_close(pruned.components, full.components, rtol=1e-9, atol=1e-12)
    with torch.no_grad():  # both are sums of the model's real output
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    for dec in (pruned, full):
        if dec.stopped_before is None:
            torch.testing.assert_close(dec.representation, expected, rtol=0, atol=0)
        assert dec.relative_error() <= 1e-10


def test_class_token_model_prunes_to_the_class_row():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64).eval()
    decomposer = trace_and_decompose(model)
    plan = decomposer.plan(torch.randn(1, 3, 64, 64))
    attention_births = [n for n, b in plan.births.items() if b.kind == "attention"]
    assert attention_births
    for birth in attention_births:  # [B, heads, tokens, d]: only the class-token query row
        assert plan.compact.slices[birth].index == (0,)


@pytest.mark.parametrize("name", ["maxvit_tiny_tf_224", "vit_tiny_patch16_224"])
def test_a_whole_real_input_gives_its_op_result_without_a_second_evaluation(name, monkeypatch):
    """The image, or a branch born whole, is one component equal to its node's real value: the next op's
    linear part of it is that op's real value less its offsets (``propagate._follows_real``); the same
    as evaluating the op on it."""
    from decompose import propagate

    torch.manual_seed(0)
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().double()
    images = torch.randn(2, *input_size(model, kwargs), dtype=torch.float64)
    followed = []
    original = propagate._follows_real

    def spy(gm, plan, node, role, carried, real, compact):
        found = original(gm, plan, node, role, carried, real, compact)
        if found is not None and carried[found].chunks:
            followed.append(node)
        return found

    monkeypatch.setattr(propagate, "_follows_real", spy)
    fast = trace_and_decompose(model)(images, level="branch")
    assert followed
    def without_whole(gm, plan, node, role, carried, real, compact):  # inputs without components still follow
        found = original(gm, plan, node, role, carried, real, compact)
        return found if found is not None and not carried[found].chunks else None

    monkeypatch.setattr(propagate, "_follows_real", without_whole)
    evaluated = trace_and_decompose(model)(images, level="branch")
    assert fast.keys == evaluated.keys
    torch.testing.assert_close(fast.components, evaluated.components, rtol=1e-9, atol=1e-12)
    assert fast.relative_error() <= 1e-10


def test_drain_puts_rows_in_id_order_as_it_copies():
    from decompose.carried import Carried, Chunk

    carried = Carried([Chunk([3, 4, 5], torch.arange(6.0).reshape(3, 2)), Chunk([0], torch.tensor([[10.0, 11.0]])),
                       Chunk([2, 1], torch.tensor([[20.0, 21.0], [30.0, 31.0]]))])
    ids, rows = carried.drain()
    assert ids == [0, 1, 2, 3, 4, 5]
    assert rows.tolist() == [[10, 11], [30, 31], [20, 21], [0, 1], [2, 3], [4, 5]]
    assert not carried.chunks


def test_drain_sums_a_component_held_by_several_chunks():
    """Early pooling takes a component that reached several pooled nodes (a value split into three
    convolutions, then concatenated) to the output from each: one row per id, the parts summed, and
    no row left unwritten."""
    from decompose.carried import Carried, Chunk

    carried = Carried([Chunk([1, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]])), Chunk([0], torch.tensor([[10.0, 20.0]])),
                       Chunk([2, 0], torch.tensor([[5.0, 6.0], [100.0, 200.0]]))])
    ids, rows = carried.drain()
    assert ids == [0, 1, 2]
    assert rows.tolist() == [[113, 224], [1, 2], [5, 6]]
