"""Every call checks its own sum: a rule that lets a nonlinear op through gives an error naming the op,
never a silent result."""
import warnings

import pytest
import torch
from torch import nn

from decompose import InexactSumError, InexactSumWarning, trace_and_decompose


class Saturating(nn.Module):
    """Identity on small values, clamped on large ones. Its Python branch on a tensor value makes it
    opaque to torch.fx; on the small probe image it passes the numerical affinity test."""

    def forward(self, x):
        if x.abs().max() < 10:
            return x * 1.0
        return x.clamp(-10, 10)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class SaturatingTrunk(nn.Module):
    """Patch embedding, a residual block, the saturating op on the trunk, another block, mean pool."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, width, 4, stride=4)
        self.block1, self.saturate, self.block2 = Block(width), Saturating(), Block(width)

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)
        return self.block2(self.saturate(self.block1(x))).mean(1)


def _model():
    torch.manual_seed(0)
    return SaturatingTrunk().eval()


def test_a_nonlinear_op_that_passed_the_affinity_test_raises_naming_it():
    decomposer = trace_and_decompose(_model())
    small = 0.01 * torch.randn(2, 3, 16, 16)
    assert decomposer(small, level="branch").sum_error <= 1e-5  # planned on the small image: exact there
    with pytest.raises(InexactSumError) as raised:
        decomposer(100 * torch.randn(2, 3, 16, 16), level="head")
    message = str(raised.value)
    assert "relative error" in message and "pre_logits output" in message
    assert "saturate" in message  # the first node whose components stop summing


def test_warn_mode_returns_the_inexact_result_with_a_warning():
    decomposer = trace_and_decompose(_model(), on_inexact_sum="warn")
    decomposer(0.01 * torch.randn(1, 3, 16, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec = decomposer(100 * torch.randn(2, 3, 16, 16), level="branch")
    assert any(issubclass(w.category, InexactSumWarning) and "saturate" in str(w.message) for w in caught)
    assert dec.sum_error == pytest.approx(dec.relative_error(), rel=1.0)  # per image vs whole batch
    assert dec.sum_error > 1e-4


def test_tolerance_option_and_bad_options():
    decomposer = trace_and_decompose(_model(), sum_tolerance=10.0)
    decomposer(0.01 * torch.randn(1, 3, 16, 16))
    assert decomposer(100 * torch.randn(2, 3, 16, 16), level="branch").sum_error > 1e-4  # accepted
    with pytest.raises(ValueError, match="on_inexact_sum"):
        trace_and_decompose(_model(), on_inexact_sum="ignore")
    with pytest.raises(ValueError, match="sum_tolerance"):
        trace_and_decompose(_model(), sum_tolerance=-1.0)


def test_an_early_pooling_fault_is_named_as_such(monkeypatch):
    """A planted fault in the pooled part of the pass: the diagnosis pass (float64, no pooling) is exact,
    so the error says the early pooling breaks the sum."""
    import timm

    from decompose import decomposer as module

    model = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1), num_heads=(2, 4), embed_dim=32,
                              img_size=112).eval()
    decomposer = trace_and_decompose(model)
    images = torch.randn(2, 3, 112, 112)
    assert decomposer.plan(images).pooling is not None
    original = module.pooled_components

    def doubled_largest_chunk(*args):
        out = original(*args)
        largest = max(out.chunks, key=lambda chunk: float(chunk.values.norm()))
        largest.values = largest.values * 2
        return out

    monkeypatch.setattr(module, "pooled_components", doubled_largest_chunk)
    with pytest.raises(InexactSumError, match="early pooling"):
        decomposer(images, level="head")


def test_repeated_calls_give_bit_identical_components():
    decomposer = trace_and_decompose(_model())
    images = 0.01 * torch.randn(2, 3, 16, 16)
    first, second = decomposer(images, level="token"), decomposer(images, level="token")
    assert first.keys == second.keys
    assert torch.equal(first.components, second.components)
