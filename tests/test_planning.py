"""Planning scales with the graph: the work of a plan grows at most linearly with depth.

Work is counted, never timed: the vector-Jacobian products (backward passes) and the floating-point
operations of matrix products and convolutions (``torch.utils.flop_counter``) that planning and
the token key positions run. A quadratic mechanism (every component carried through every later
check, one pass per earlier node) shows as a ratio near 4 when the depth doubles.
"""
from contextlib import contextmanager

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from decompose import trace_and_decompose
from decompose.pooling.pooled_nodes import token_classes

# work at twice the depth over work at the depth (linear growth with a fixed part: below 2)
LINEAR_RATIO = 2.2

DEPTHS = {
    "swin_tiny_patch4_window7_224": (dict(num_heads=(2, 4), embed_dim=32, img_size=112), "depths", (1, 1), (2, 2)),
    "vit_tiny_patch16_224": (dict(img_size=64), "depth", 2, 4),
}


@contextmanager
def counted_vjps():
    """Count the vector-Jacobian products run inside (one per cotangent row of a batched call)."""
    count = [0]
    grad, backward = torch.autograd.grad, torch.Tensor.backward

    def counted_grad(outputs, inputs, grad_outputs=None, **kwargs):
        count[0] += len(grad_outputs) if kwargs.get("is_grads_batched") else 1
        return grad(outputs, inputs, grad_outputs, **kwargs)

    def counted_backward(*args, **kwargs):
        count[0] += 1
        return backward(*args, **kwargs)

    torch.autograd.grad, torch.Tensor.backward = counted_grad, counted_backward
    try:
        yield count
    finally:
        torch.autograd.grad, torch.Tensor.backward = grad, backward


def planning_work(model, images) -> tuple[int, int]:
    """(vector-Jacobian products, FLOPs) of planning ``model`` for ``images`` and finding its token key
    positions."""
    decomposer = trace_and_decompose(model)
    with counted_vjps() as vjps, FlopCounterMode(display=False) as flops:
        plan = decomposer.plan(images)
        decomposer.key_positions(plan)
    return vjps[0], flops.get_total_flops()


@pytest.mark.parametrize("name", list(DEPTHS))
def test_planning_work_grows_linearly_with_depth(name):
    kwargs, key, shallow, deep = DEPTHS[name]
    size = kwargs["img_size"]
    work = []
    for depth in (shallow, deep):
        torch.manual_seed(0)
        model = timm.create_model(name, **{key: depth}, **kwargs).eval()
        work.append(planning_work(model, torch.randn(1, 3, size, size)))
    (calls, flops), (deep_calls, deep_flops) = work
    assert deep_calls <= LINEAR_RATIO * calls, (calls, deep_calls)
    assert deep_flops <= LINEAR_RATIO * flops, (flops, deep_flops)


def test_overlapping_receptive_fields_take_fewer_passes_than_keys():
    """MaxViT's pooled shortcuts make receptive fields overlap, so key positions come from each key's
    receptive field in the grid. Keys far apart share backward passes: twice the image side (four times
    the keys: 320 -> 1,280) takes well under twice the passes (one pass per key took 384 -> 1,344 VJPs
    before keys shared passes; now about 240 -> 360)."""
    work = []
    for size in (64, 128):
        torch.manual_seed(0)
        model = timm.create_model("maxvit_tiny_tf_224", pretrained=False, depths=(1, 1), embed_dim=(32, 64),
                                  img_size=size).eval()
        decomposer = trace_and_decompose(model)
        plan = decomposer.plan(torch.randn(1, 3, size, size))
        with counted_vjps() as vjps:
            decomposer.key_positions(plan)
        work.append(vjps[0])
    keys = 1024 + 256                                     # stage 0 and 1 tokens at 128 px
    assert work[1] <= 1.6 * work[0], work
    assert work[1] <= keys / 3, work


def test_token_classes_recover_planted_directions():
    """Rows that are multiples of one of K directions: one class per direction, numbered by first row,
    zero rows -1 (compared with the definition, pair by pair)."""
    generator = torch.Generator().manual_seed(0)
    for tokens, directions in ((1200, 1000), (1200, 7), (3, 3)):
        basis = torch.randn(directions, 16, generator=generator, dtype=torch.float64)
        which = torch.randint(0, directions, (tokens,), generator=generator)
        scale = torch.randn(tokens, generator=generator, dtype=torch.float64)
        scale[::11] = 0
        labels = token_classes(basis[which] * scale.unsqueeze(1))
        expected, first = [], {}
        for row in range(tokens):
            if scale[row] == 0:
                expected.append(-1)
                continue
            first.setdefault(int(which[row]), len(first))
            expected.append(first[int(which[row])])
        assert labels.tolist() == expected


def test_progress_bar_names_its_stage(monkeypatch, capsys):
    import tracer.progress as progress_module

    monkeypatch.setattr(progress_module, "PROGRESS_DELAY", 0.0)
    monkeypatch.delenv("VIT_DECOMPOSE_PROGRESS", raising=False)
    assert list(progress_module.progress(range(3), "early pooling: unit tail")) == [0, 1, 2]
    assert "early pooling: unit tail" in capsys.readouterr().err
    monkeypatch.setenv("VIT_DECOMPOSE_PROGRESS", "0")
    assert list(progress_module.progress(range(3), "early pooling: unit tail")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
