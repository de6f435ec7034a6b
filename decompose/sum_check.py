"""Every decomposition checks its own sum: components that do not add up to the model's output are an
error (or, on request, a warning), never a silent result.

The check is one pass over the result. Where it fails, one more pass on the worst image, in float64 and
without early pooling, compares every node's components with its real value and names the first node
where they stop adding up, or says that the pooling after the pass is where the sum breaks.
"""
from __future__ import annotations

import enum
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from tracer.tracing import describe

# default largest relative error ‖Σ components − output‖ / ‖output‖ of any image, by dtype
DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# a node's components "stop adding up" in the float64 diagnosis pass beyond this relative error
NODE_TOLERANCE = 1e-8


class InexactSum(str, enum.Enum):
    """What a decomposition whose components do not sum to the output does."""

    RAISE = "raise"
    WARN = "warn"


class InexactSumError(RuntimeError):
    """The components do not sum to the model's output within the tolerance."""


class InexactSumWarning(UserWarning):
    """Like ``InexactSumError``, for a decomposer built with ``on_inexact_sum="warn"``."""


def tolerance_for(dtype: torch.dtype, tolerance: float | None) -> float:
    return tolerance if tolerance is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)


def image_errors(total: torch.Tensor, representation: torch.Tensor) -> torch.Tensor:
    """[B] ‖total_b − representation_b‖ / ‖representation_b‖ (0 where both are zero; NaN stays NaN)."""
    difference = (total - representation).flatten(1).norm(dim=1)
    scale = representation.flatten(1).norm(dim=1)
    tiny = torch.finfo(representation.dtype).tiny if representation.is_floating_point() else 1e-30
    return difference / scale.clamp_min(tiny)


def direction_errors(total: torch.Tensor, representation: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """[B] |total_b − ⟨representation_b, u⟩| / (‖representation_b‖ ‖u‖) for scores ``total`` [B] along ``u``."""
    flat = representation.reshape(representation.shape[0], -1)
    scale = flat.norm(dim=1) * direction.norm()
    tiny = torch.finfo(representation.dtype).tiny if representation.is_floating_point() else 1e-30
    return (total - flat.to(direction) @ direction).abs() / scale.clamp_min(tiny)


def check_sum(total: torch.Tensor, representation: torch.Tensor, *, what: str, tolerance: float,
              on_inexact: InexactSum, diagnose: Callable[[int], str], errors: torch.Tensor | None = None) -> float:
    """The largest per-image relative error of ``total`` [B, *D] against ``representation`` [B, *D] (or the
    given ``errors`` [B]); above ``tolerance`` (or not finite) an ``InexactSumError`` (a warning with
    ``InexactSum.WARN``) that names ``what`` was decomposed, the error, and ``diagnose(worst image)``."""
    if not bool(torch.isfinite(representation).all()):
        bad = (~torch.isfinite(representation)).flatten(1).any(1).nonzero().flatten().tolist()
        raise InexactSumError(f"the model's {what} itself is not finite (NaN or inf for images {bad}); "
                              "nothing can sum to it. Check the model's weights and the input's normalisation.")
    errors = image_errors(total, representation) if errors is None else errors
    errors = torch.where(torch.isnan(errors), torch.full_like(errors, float("inf")), errors)
    worst = int(errors.argmax())
    error = float(errors[worst])
    if error <= tolerance:
        return error
    message = (f"the components do not sum to the model's {what}: relative error {error:.2e} on image {worst} "
               f"of the batch (tolerance {tolerance:.0e}). {diagnose(worst)} "
               "This is a bug of vit-decompose's rules for this model: please report it. "
               "trace_and_decompose(model, on_inexact_sum='warn') returns the inexact result with a warning; "
               "sum_tolerance=... sets the tolerance.")
    if InexactSum(on_inexact) is InexactSum.RAISE:
        raise InexactSumError(message)
    warnings.warn(message, InexactSumWarning, stacklevel=3)
    return error


def _floating_leaves(value: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


class FirstInexactNode:
    """An ``on_value`` hook for ``propagate``: records the first node whose components do not sum to its
    real value (the part of it the pass computes, where pruning slices it)."""

    def __init__(self, slices: dict):
        self.slices = slices
        self.found: tuple[fx.Node, float] | None = None

    def __call__(self, node: fx.Node, value: Any, carried) -> None:
        if self.found is not None or not carried.chunks:
            return
        spec = self.slices.get(node)
        values = _floating_leaves(value)
        parts = [_floating_leaves(chunk.values) for chunk in carried.chunks]
        for k, real in enumerate(values):
            real = spec.take(real) if spec is not None and isinstance(value, torch.Tensor) else real
            rows = [chunk[k] for chunk in parts if k < len(chunk)]
            total = sum(r.sum(0) for r in rows)
            scale = max([float(real.norm())] + [float(r.flatten(1).norm(dim=1).max()) for r in rows if r.numel()])
            error = float((total - real).norm()) / max(scale, 1e-300)
            if error > NODE_TOLERANCE:
                self.found = (node, error)
                return


def describe_first_inexact(found: tuple[fx.Node, float] | None, total_error: float, pooled: bool) -> str:
    """The diagnosis sentence for ``check_sum`` from a float64 pass without early pooling."""
    if found is not None:
        node, error = found
        return (f"The first node whose components stop summing to its real value is {describe(node)} "
                f"(relative error {error:.1e} in float64).")
    if pooled and total_error <= NODE_TOLERANCE:
        return ("Without early pooling every node's components sum to its value in float64: the early pooling "
                "(prune=True) is where the sum breaks; trace_and_decompose(model, prune=False) avoids it.")
    if total_error <= NODE_TOLERANCE:
        return ("In float64 every node's components sum to its value: the error is float32 rounding; "
                "decompose in float64 (model.double(), images.double()) or raise the tolerance.")
    return "No single node was found where the sum breaks."
