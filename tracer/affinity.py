"""Numerical test that an opaque operation is affine in one of its inputs.

Used for operations the op tables do not know (timm leaves such as
``AvgPool2dSame``, autowrapped helpers such as ``window_reverse``): the
operation is affine in ``x`` iff f(a+b) - f(0) = (f(a)-f(0)) + (f(b)-f(0)) and
f(s·a) - f(0) = s·(f(a)-f(0)) on random tensors of the real shape.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves


def _max_abs(values: list[torch.Tensor]) -> float:
    return max((float(v.abs().max()) for v in values if v.numel()), default=0.0)


def _difference(left: Any, right: Any) -> list[torch.Tensor]:
    return [a - b for a, b in zip(tree_leaves(left), tree_leaves(right))
            if isinstance(a, torch.Tensor) and a.is_floating_point()]


def is_affine_in(fn: Callable[[Any], Any], example: Any, seed: int = 0) -> bool:
    """Whether ``fn`` is affine in its argument, probed around tensors shaped like ``example``.

    ``example`` is a tensor or a tuple of tensors (joint affinity in all of them).
    """
    examples = example if isinstance(example, tuple) else (example,)
    if not all(isinstance(e, torch.Tensor) and e.is_floating_point() for e in examples):
        return False
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def random_like(e: torch.Tensor) -> torch.Tensor:
        scale = float(e.detach().abs().mean()) or 1.0
        noise = torch.randn(e.shape, generator=generator, dtype=torch.float64)
        return (noise * scale).to(dtype=e.dtype, device=e.device)

    def call(xs):
        return fn(xs if isinstance(example, tuple) else xs[0])

    a = tuple(random_like(e) for e in examples)
    b = tuple(random_like(e) for e in examples)
    zero = tuple(torch.zeros_like(e) for e in examples)
    try:
        with torch.no_grad():
            f0, fa, fb = call(zero), call(a), call(b)
            fab = call(tuple(x + y for x, y in zip(a, b)))
            f3a = call(tuple(-3.0 * x for x in a))
    except Exception:
        return False
    la, lb = _difference(fa, f0), _difference(fb, f0)
    if not la:
        return False
    additivity = [x - y - z for x, y, z in zip(_difference(fab, f0), la, lb)]
    homogeneity = [x + 3.0 * y for x, y in zip(_difference(f3a, f0), la)]
    scale = max(_max_abs(la), _max_abs(lb), 1e-30)
    tolerance = 1e-9 if examples[0].dtype == torch.float64 else 1e-4
    return max(_max_abs(additivity), _max_abs(homogeneity)) <= tolerance * 3 * scale
