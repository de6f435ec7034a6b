"""The probe keeps every node's value as it was computed, without copying what nothing writes to."""
import torch
import torch.fx as fx
from torch import nn

from tracer.probe import run_probe


class _Sneaky(nn.Module):
    """Writes into its input without saying so (no ``inplace`` flag, not a ``*_`` method in the graph)."""

    def forward(self, x):
        x.mul_(3.0)
        return x + 0


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, module, qualname):
        return isinstance(module, _Sneaky) or super().is_leaf_module(module, qualname)


class _Writes(nn.Module):
    def __init__(self, announced: bool):
        super().__init__()
        self.announced, self.sneaky = announced, _Sneaky()

    def forward(self, x):
        y = x * 2.0
        flat = y.view(-1)
        z = y.add_(1.0) if self.announced else self.sneaky(y)
        return z + flat.sum()


def _probe(model: nn.Module, x: torch.Tensor):
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    return gm, run_probe(gm, x)


def test_values_written_in_place_later_are_kept_as_computed():
    x = torch.randn(2, 3)
    for announced in (True, False):
        gm, probe = _probe(_Writes(announced), x)
        values = {node.name: value for node, value in probe.values.items()}
        assert torch.equal(values["mul"], x * 2.0), announced
        assert torch.equal(values["view"], (x * 2.0).view(-1)), announced
        assert probe.copied_all is not announced  # an announced write copies only what it writes to


def test_views_share_the_storage_of_what_they_view():
    class Views(nn.Module):
        def forward(self, x):
            y = x * 2.0
            return y.view(-1).reshape(3, 2).permute(1, 0) + 1

    gm = fx.symbolic_trace(Views())
    probe = run_probe(gm, torch.randn(2, 3))
    values = {node.name: value for node, value in probe.values.items()}
    storages = {values[name].untyped_storage().data_ptr() for name in ("mul", "view", "reshape", "permute")}
    assert len(storages) == 1
