"""What the decomposer plans for one input signature, on top of the tracer's graph facts.

``tracer.roles.TrunkPlan`` is the tracer's fixed answer (roles, births, joins). A ``RunPlan`` adds what
running the decomposition needs: the probe image, the compaction and the early pooling, made once when
planning; the token key positions, made at the first token-level call; and the component labels of each
birth, built once per level. It reads the trunk plan's facts through (``run_plan.births``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from tracer.relevance import CompactPlan
from tracer.roles import TrunkPlan

if TYPE_CHECKING:  # the pooling package runs on run plans
    from .pooling.layout import EarlyPooling


@dataclass
class RunPlan:
    """trunk:         the tracer's roles, births and joins
    probe_image:   the image [1, C, H, W] the plan was probed with (its values are not kept)
    compact:       slices of the carried values that reach the output (None: pruning off)
    pooling:       early pooling of an average-pooled output (None: not pooled)
    key_positions: attention birth -> image position of each source (filled at the first token call)
    labels:        (birth, level) -> its components' labels (built once, reused while the split is the same)
    rows:          early pooling's row maps of pooled branches by value shape (``pooling.Parking``)
    output_shape:  the decomposed output's shape for one image (without the batch axis)
    """

    trunk: TrunkPlan
    probe_image: torch.Tensor
    compact: CompactPlan | None = None
    pooling: EarlyPooling | None = None
    key_positions: dict[fx.Node, list] | None = None
    labels: dict[Any, Any] = field(default_factory=dict)
    rows: dict[Any, torch.Tensor] = field(default_factory=dict)
    output_shape: tuple[int, ...] = ()

    def __getattr__(self, name: str) -> Any:  # the trunk plan's facts: roles, births, target, layer() ...
        if name == "trunk":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.trunk, name)
