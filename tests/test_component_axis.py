"""Per-call shortcuts: shape ops without vmap, ops that return their input, labels built once per plan."""
import operator

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

from decompose import trace_and_decompose
from tracer.component_axis import with_component_axis
from tracer.probe import run_probe


class _Op:
    """A stand-in graph node: ``op`` and ``target`` as in torch.fx."""

    def __init__(self, op, target):
        self.op, self.target = op, target


def _vmapped(op, rest, components):
    if op.op == "call_method":
        return torch.vmap(lambda c: getattr(c, op.target)(*rest))(components)
    return torch.vmap(lambda c: op.target(c, *rest))(components)


CASES = [
    (_Op("call_method", "transpose"), (1, 2)), (_Op("call_method", "transpose"), (-1, 0)),
    (_Op("call_function", torch.transpose), (0, -2)), (_Op("call_method", "swapaxes"), (0, 2)),
    (_Op("call_method", "permute"), (2, 0, 1)), (_Op("call_method", "permute"), ((-1, 1, 0),)),
    (_Op("call_function", torch.permute), ((1, 2, 0),)),
    (_Op("call_method", "flatten"), ()), (_Op("call_method", "flatten"), (1,)),
    (_Op("call_function", torch.flatten), (0, 1)), (_Op("call_method", "flatten"), (-2, -1)),
    (_Op("call_method", "unsqueeze"), (0,)), (_Op("call_method", "unsqueeze"), (-1,)),
    (_Op("call_function", torch.unsqueeze), (-2,)),
    (_Op("call_method", "reshape"), (-1, 6)), (_Op("call_method", "view"), ((2, 3, -1),)),
    (_Op("call_function", torch.reshape), ((6, -1),)),
    (_Op("call_function", operator.getitem), ((slice(None), 0),)),
    (_Op("call_function", operator.getitem), ((Ellipsis, slice(1, 3)),)),
    (_Op("call_function", operator.getitem), ((None, 1, slice(None, None, 2)),)),
    (_Op("call_function", operator.getitem), (-1,)),
    (_Op("call_method", "contiguous"), ()),
    (_Op("call_function", F.pad), ((0, 0, 1, 2),)), (_Op("call_function", F.pad), ((1, 0, 0, 2, 1, 1),)),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@given(count=st.integers(1, 4), seed=st.integers(0, 2**16))
@settings(max_examples=10, deadline=None)
def test_shape_ops_match_vmap(case, count, seed):
    op, rest = CASES[case]
    components = torch.randn(count, 2, 3, 4, generator=torch.Generator().manual_seed(seed))
    out = with_component_axis(op, (components, *rest), {}, components)
    assert out is not None
    assert torch.equal(out, _vmapped(op, rest, components))


def test_linear_matches_vmap_and_other_ops_are_left_to_vmap():
    components, weight = torch.randn(3, 2, 5, 4), torch.randn(6, 4)
    linear = _Op("call_function", F.linear)
    out = with_component_axis(linear, (components, weight), {}, components)
    assert torch.allclose(out, torch.vmap(lambda c: F.linear(c, weight))(components), atol=1e-6)
    index = torch.tensor([0, 1])
    assert with_component_axis(_Op("call_function", operator.getitem), (components, (index, 0)), {}, components) is None
    assert with_component_axis(_Op("call_method", "reshape"), (components, 2, 20), {"out": None}, components) is None
    assert with_component_axis(linear, (weight, components), {}, components) is None  # not the first argument
    assert with_component_axis(_Op("call_method", "sum"), (components, 1), {}, components) is None


def test_dropout_in_eval_is_passed_through_and_in_place_scaling_is_not():
    class Block(torch.nn.Module):
        def forward(self, x):
            y = F.dropout(x, 0.1, training=False)
            z = y.contiguous()
            return z.mul_(2.0) + 1

    gm = fx.symbolic_trace(Block())
    probe = run_probe(gm, torch.randn(2, 3))
    names = {n.name for n in probe.passthrough}
    assert names == {"dropout", "contiguous"}


def test_vit_dropouts_are_passed_through_and_the_sum_is_exact():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                              drop_rate=0.1, proj_drop_rate=0.1).eval()
    decomposer = trace_and_decompose(model)
    images = torch.randn(2, 3, 32, 32)
    plan = decomposer.plan(images)
    assert any("drop" in n.name for n in plan.passthrough)
    dec = decomposer(images, level="head")
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(dec.components.sum(0), expected, atol=1e-5 * float(expected.abs().max()))


def test_cached_labels_match_a_fresh_decomposer_across_levels_and_batch_sizes():
    """Labels built once per plan and level: a second call (another batch size, after another level)
    gives exactly the labels of a new decomposer, and the sum stays the model's output."""
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2, img_size=32).eval()
    decomposer = trace_and_decompose(model)
    for level, batch in (("token", 1), ("head", 2), ("token", 3)):
        images = torch.randn(batch, 3, 32, 32)
        dec = decomposer(images, level=level)
        assert dec.labels == trace_and_decompose(model)(images, level=level).labels
        assert dec.relative_error() <= 1e-5


class _Padded(torch.nn.Module):
    """Tokens padded on the trunk: with a constant (an offset component) or with zeros (none)."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.embed = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = F.pad(x, (0, 0, 1, 2), value=self.value) if self.value is not None else F.pad(x, (0, 0, 1, 2))
        x = x + self.mlp(x)
        return x.mean(1)


@pytest.mark.parametrize("value", [None, 0.0, 0.5])
def test_padding_with_a_constant_is_an_offset_and_zero_padding_is_not(value):
    torch.manual_seed(0)
    model = _Padded(value).eval().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    dec = trace_and_decompose(model)(images, level="branch")
    with torch.no_grad():
        expected = model(images)
    assert torch.allclose(dec.components.sum(0), expected, rtol=0, atol=1e-12)
    offsets = [label for label in dec.labels if label.name.endswith(".offset")]
    assert bool(offsets) == (value == 0.5)
