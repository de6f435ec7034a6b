"""Running our own copy of a model in float64 for a while: exact integer codes, planning checks and the
diagnosis of a sum that breaks need float64 gradients and values."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class Float64Values(dict):
    """Probe values with floating tensors read as float64."""

    def __init__(self, values: dict):
        super().__init__()
        self.values = values

    def __missing__(self, key):
        value = self.values[key]
        converted = value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        self[key] = converted
        return converted

    def get(self, key, default=None):
        return self[key] if key in self.values else default


@contextlib.contextmanager
def restored(pairs: list):
    """Temporarily ``tensor.data = data`` for each (tensor, data) pair; yields the data they had,
    as pairs, which come back at the end."""
    current = [(tensor, tensor.data) for tensor, _ in pairs]
    try:
        for tensor, data in pairs:
            tensor.data = data
        yield current
    finally:
        for tensor, data in current:
            tensor.data = data


def in_float64(module: nn.Module):
    """Temporarily run ``module`` (our own copy) in float64; the original tensors come back.
    Yields them as (tensor, original data) pairs (``restored(pairs)`` brings them back for a while)."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return restored([(t, t.data.double()) for t in tensors])
