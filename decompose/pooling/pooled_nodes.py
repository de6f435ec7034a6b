"""Finding where to pool: the unit tail's start and grid, and the trunk nodes whose real adjoints are a
per-token multiple of the unit tail's, verified on the probe image in float64 (``plan_early_pooling``;
``early_pooling_for`` runs it for a decomposer's plan)."""
from __future__ import annotations

import torch
from torch import fx

from tracer.linear_rules import ROW_SCALED_NORMS
from tracer.ops import OpKind, op_kind
from tracer.progress import progress
from tracer.roles import Role, TrunkPlan
from tracer.vocabulary import Level

from ..carried import ComponentRegistry
from ..precision import in_float64
from ..propagate import propagate
from ..run_plan import RunPlan
from .branches import plan_pooled_branch
from .layout import EarlyPooling, PooledNode, token_major
from .norm_scales import NormScales, fit_norm_scales
from .parking import Parking
from .unit_tail import TAIL_FAILURES, TailUnavailable, UnitTail

# tokens are grouped by adjoint direction to this (float64) precision (1 - |cos|) to find the grid's period
PARALLEL_TOLERANCE = 1e-12
# a real token plays a small-grid token when its adjoint is a multiple of the unit tail's to this
# (float64) relative residual
MATCH_TOLERANCE = 1e-9
# tokens compared at once with the classes found so far (``token_classes``)
CLASS_BLOCK = 512


def token_classes(vectors: torch.Tensor, tolerance: float = PARALLEL_TOLERANCE) -> torch.Tensor:
    """[T] class of each row of ``vectors`` [T, V]: rows parallel to each other share a class; -1 for
    zero rows.

    Classes are numbered in the order of their first row, and a row joins the class of the first
    earlier representative it is parallel to. Rows are compared with the representatives in blocks
    (one matrix product per block), so the cost is T × classes × V, not one pass per class."""
    norms = vectors.norm(dim=1)
    labels = torch.full((vectors.shape[0],), -1, dtype=torch.long, device=vectors.device)
    if not bool((norms > 0).any()):
        return labels
    unit = vectors / norms.clamp_min(torch.finfo(vectors.dtype).tiny).unsqueeze(1)
    remaining = (norms > norms.max() * 1e-12).nonzero().flatten()
    representatives = unit.new_zeros((0, unit.shape[1]))                                  # [R, V]
    for block in remaining.split(CLASS_BLOCK):
        rows = unit[block]                                                                 # [b, V]
        alike = (rows @ representatives.T).abs() >= 1 - tolerance                          # [b, R]
        matched = alike.any(dim=1)
        if bool(matched.any()):
            labels[block[matched]] = alike[matched].int().argmax(dim=1)  # the first class it is parallel to
            block, rows = block[~matched], rows[~matched]
        within = ((rows @ rows.T).abs() >= 1 - tolerance).tolist()                        # [m, m]
        found, new = [-1] * len(within), []
        for i, row in enumerate(within):
            if found[i] < 0:
                found[i] = representatives.shape[0] + len(new)
                new.append(i)
                for j in range(i + 1, len(within)):
                    if found[j] < 0 and row[j]:
                        found[j] = found[i]
        labels[block] = torch.tensor(found, dtype=torch.long, device=labels.device)
        representatives = torch.cat([representatives, rows[new]])
    return labels


def class_period(labels: torch.Tensor) -> tuple[int, ...]:
    """Per axis of a grid of class labels, the smallest shift that maps every class onto itself
    (-1 matches anything)."""
    periods = []
    for axis in range(labels.dim()):
        size = labels.shape[axis]
        period = size
        for shift in range(1, size):
            a, b = labels.narrow(axis, 0, size - shift), labels.narrow(axis, shift, size - shift)
            if bool(((a == b) | (a < 0) | (b < 0)).all()):
                period = shift
                break
        periods.append(period)
    return tuple(periods)


def match_slots(real: torch.Tensor, small: torch.Tensor, real_shape: tuple[int, ...],
                small_shape: tuple[int, ...]) -> PooledNode | None:
    """The pooling of one node, if the real tail's adjoints ``real`` [G, *real_shape[1:]] are per-token
    multiples of the unit tail's ``small`` [G, *small_shape[1:]] (G random cotangents, one γ per token)."""
    if len(real_shape) != len(small_shape):
        return None
    token_axes = tuple(a for a in range(1, len(real_shape)) if real_shape[a] != small_shape[a])
    if not token_axes:
        return None
    feature_axes = tuple(a for a in range(1, len(real_shape)) if a not in token_axes)
    real_rows = _by_token(real, token_axes, feature_axes)                                  # [T, G*F]
    small_rows = _by_token(small, token_axes, feature_axes)                                # [K, G*F]
    real_norm, small_norm = real_rows.norm(dim=1), small_rows.norm(dim=1)
    reaches = real_norm > real_norm.max() * 1e-12 if bool((real_norm > 0).any()) else real_norm > 0
    if not bool(reaches.any()):
        return None
    cosine = (real_rows / real_norm.clamp_min(1e-300).unsqueeze(1)) @ (
        small_rows / small_norm.clamp_min(1e-300).unsqueeze(1)).T                          # [T, K]
    slots = cosine.abs().argmax(dim=1)
    unit = small_rows[slots]                                                                # [T, G*F]
    gamma = (real_rows * unit).sum(1) / (unit * unit).sum(1).clamp_min(1e-300)
    residual = (real_rows - gamma.unsqueeze(1) * unit).norm(dim=1)
    if not bool((residual[reaches] <= MATCH_TOLERANCE * real_norm[reaches]).all()):
        return None
    count = small_rows.shape[0]
    slots = torch.where(reaches, slots, torch.full_like(slots, count))
    first = token_major(small[:1], token_axes, feature_axes, 0)[0]                          # [K, F]
    return PooledNode(token_axes, feature_axes, small_shape, slots, first)


def _by_token(adjoints: torch.Tensor, token_axes: tuple[int, ...], feature_axes: tuple[int, ...]) -> torch.Tensor:
    """Adjoints for G cotangents ``[G, *shape[1:]]`` -> ``[T, G*F]``: per token, all its adjoints."""
    return token_major(adjoints, token_axes, feature_axes, 0).transpose(0, 1).flatten(1)


def plan_early_pooling(gm: fx.GraphModule, plan: TrunkPlan, data_nodes: set[fx.Node], starts: list[fx.Node],
                       candidates: list[fx.Node], adjoints: dict[fx.Node, torch.Tensor],
                       cotangents: torch.Tensor, other_image: dict[fx.Node, torch.Tensor],
                       dtype: torch.dtype, probes: dict[fx.Node, torch.Tensor] | None = None,
                       scales: dict[fx.Node, torch.Tensor] | None = None) -> EarlyPooling | None:
    """Find a unit tail and the candidate nodes it pools, from real adjoints on the probe image.

    starts:      trunk nodes to try as the unit tail's start, in order
    candidates:  trunk nodes where components may be pooled
    adjoints:    node -> [G, *value shape[1:]] real adjoints for the G ``cotangents`` [G, *output[1:]]
    other_image: node -> [1, *value shape[1:]] the adjoint for ``cotangents[0]`` on another image
    dtype:       the dtype of the plan's tensors (the batches' dtype)
    probes, scales: the probe's values (graph kept) and the trunk norms' per-row scales on the images
                 of the adjoints, to find ``norm_scales`` (``tracer.norm_scales``); None: not tried
    """
    for start in progress(starts, "early pooling: unit tail"):
        if start not in adjoints:
            continue
        try:
            tail = UnitTail(gm, plan, data_nodes, start)
        except TailUnavailable:
            continue
        real_shape = (1, *adjoints[start].shape[1:])
        token_axes = _token_axes(tail, real_shape, adjoints[start].dtype, adjoints[start].device)
        if not token_axes:
            continue
        feature_axes = tuple(a for a in range(1, len(real_shape)) if a not in token_axes)
        rows = _by_token(adjoints[start], token_axes, feature_axes)
        labels = token_classes(rows).reshape([real_shape[a] for a in token_axes])
        period = class_period(labels)
        for extra in (0, 1):
            start_shape = list(real_shape)
            for axis, size in zip(token_axes, period):
                start_shape[axis] = min(size + extra, real_shape[axis])
            pooled = _verified_nodes(tail, tuple(start_shape), candidates, adjoints, cotangents)
            if pooled:
                pooling = EarlyPooling(tail, tuple(start_shape), pooled, cotangents[0])
                _find_static(pooling, adjoints, other_image)
                if probes is not None:
                    pooling.norm_scales = _fit_norm_scales(pooling, adjoints, other_image, probes, scales or {})
                pooling.cotangent = pooling.cotangent.to(dtype)
                for node in pooled.values():
                    node.adjoint = node.adjoint.to(dtype)
                _shared_layouts(pooled.values())
                pooling.static = {node: shape.to(dtype) for node, shape in pooling.static.items()}
                if pooling.norm_scales is not None:
                    pooling.norm_scales = pooling.norm_scales.to(dtype)
                return pooling
    return None


def _shared_layouts(nodes) -> None:
    """Nodes with equal slots or unit adjoints share one tensor (``EarlyPooling.weights_key``)."""
    kept: list[torch.Tensor] = []

    def shared(tensor: torch.Tensor) -> torch.Tensor:
        same = next((k for k in kept if k.shape == tensor.shape and k.dtype == tensor.dtype
                     and torch.equal(k, tensor)), None)
        if same is None:
            kept.append(tensor)
        return tensor if same is None else same

    for node in nodes:
        node.slots, node.adjoint = shared(node.slots), shared(node.adjoint)


def _fit_norm_scales(pooling: EarlyPooling, adjoints: dict, other_image: dict, probes: dict, scales: dict
                     ) -> NormScales | None:
    order = {node: i for i, node in enumerate(pooling.tail.gm.graph.nodes)}

    def gamma(node: fx.Node, image: int) -> torch.Tensor:
        return pooling.weights(node, (adjoints[node][:1] if image == 0 else other_image[node]))[0]

    return fit_norm_scales(list(pooling.nodes), order, probes, scales, gamma, pooling.tokens, MATCH_TOLERANCE)


def _find_static(pooling: EarlyPooling, adjoints: dict, other_image: dict) -> None:
    """Drop nodes whose structure does not hold on the other image; find the static ones (float64)."""
    weights, factors = {}, {}
    for node in list(pooling.nodes):
        try:
            first = pooling.weights(node, adjoints[node][:1])[0]
            second = pooling.weights(node, other_image[node])[0]
        except RuntimeError:  # the unit tail does not hold on another image: not pooled
            del pooling.nodes[node]
            continue
        squared = float(first @ first)
        factor = float(second @ first) / squared if squared > 0 else 0.0
        if squared > 0 and float((second - factor * first).norm()) <= MATCH_TOLERANCE * float(second.norm()):
            weights[node], factors[node] = first, factor
    if not weights:
        return
    order = {node: i for i, node in enumerate(pooling.tail.nodes)}
    reference = max(weights, key=order.__getitem__)
    pooling.reference = reference
    pooling.static = {node: shape for node, shape in weights.items()
                      if abs(factors[node] - factors[reference]) <= MATCH_TOLERANCE * abs(factors[reference])}


def _token_axes(tail: UnitTail, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                ) -> tuple[int, ...]:
    """Axes of the start value whose size the output's shape does not depend on."""
    try:
        reference = tail.run(shape, {tail.start: torch.zeros((1, *shape), dtype=dtype, device=device)},
                             dtype=dtype, device=device)
    except TAIL_FAILURES:
        return ()
    expected = reference[tail.start].shape
    axes = []
    for axis in range(1, len(shape)):
        if shape[axis] < 2:
            continue
        smaller = list(shape)
        smaller[axis] -= 1
        try:
            out = tail.run(tuple(smaller), {tail.start: torch.zeros((1, *smaller), dtype=dtype, device=device)},
                           dtype=dtype, device=device)
        except TAIL_FAILURES:
            continue
        if out[tail.start].shape == expected:
            axes.append(axis)
    return tuple(axes)


def _verified_nodes(tail: UnitTail, start_shape: tuple[int, ...], candidates: list[fx.Node],
                    adjoints: dict[fx.Node, torch.Tensor], cotangents: torch.Tensor) -> dict[fx.Node, PooledNode]:
    """Candidates whose real adjoints match the unit tail on ``start_shape``.

    One backward pass: G rows (one per cotangent) run from the start, and a tap at every candidate
    gives each row's adjoint there (injecting rows at every candidate would carry them all to the
    output, a cost of candidates × tail length)."""
    dtype, device = cotangents.dtype, cotangents.device
    count = cotangents.shape[0]
    taps = dict.fromkeys(n for n in candidates if n in adjoints)
    if not taps:
        return {}
    with torch.enable_grad():
        rows = torch.zeros((count, *start_shape), dtype=dtype, device=device)
        try:
            out = tail.run(start_shape, {tail.start: rows}, dtype=dtype, device=device, taps=taps)
        except TAIL_FAILURES:
            return {}
        taps = {n: tap for n, tap in taps.items() if tap is not None}          # the candidates on the tail
        if not out or not taps:
            return {}
        out = out[tail.start]                                                  # [G, 1, *output shape[1:]]
        total = (out * cotangents.reshape(out.shape)).sum()
        grads = torch.autograd.grad(total, list(taps.values()), allow_unused=True)
    pooled = {}
    for (node, tap), grad in zip(taps.items(), grads):  # grad [1 + G, *small shape]: row 1 + g for cotangent g
        if grad is None or not bool(torch.isfinite(grad[1:]).all()):
            continue
        real = adjoints[node]
        found = match_slots(real, grad[1:, 0], (1, *real.shape[1:]), tuple(tap.shape[1:]))
        if found is not None:
            pooled[node] = found
    return pooled


# random cotangents that verify an early pooling (the first also gives each batch's weights)
POOLING_COTANGENTS = 2


def early_pooling_for(gm, plan: RunPlan, probe, image: torch.Tensor) -> EarlyPooling | None:
    """Trunk nodes whose components can be pooled over tokens before the rest of the trunk
    (``tracer.pooling``), verified with the real trunk's adjoints on the probe image in float64."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    trunk = [n for n in gm.graph.nodes if plan.roles.get(n) is Role.TRUNK and isinstance(probe.values[n], torch.Tensor)
             and probe.values[n].is_floating_point()]
    if not plan.joins or not trunk:
        return None
    compacted = set(plan.compact.slices) | set(plan.compact.nodes) if plan.compact is not None else set()
    first_join = order[plan.joins[0]]
    starts = [n for n in trunk if order[n] <= first_join and n not in compacted]
    candidates = [n for n in trunk if n not in compacted and op_kind(n, gm) is not OpKind.AFFINE]
    if not starts or not candidates:
        return None
    generator = torch.Generator().manual_seed(0)
    target_shape = probe.values[plan.target].shape
    cotangents = torch.randn((POOLING_COTANGENTS, *target_shape[1:]), generator=generator, dtype=torch.float64,
                             device="cpu").to(image.device)
    norms = [n for n in trunk if n.target in ROW_SCALED_NORMS and n not in compacted]
    parking = Parking(set(starts) | set(candidates), perturb_all=True, keep_probes=True, scale_nodes=norms)
    # the probe image once per cotangent, then another image (mirrored) with the first cotangent
    images = torch.cat([image.double().expand(POOLING_COTANGENTS, *image.shape[1:]), image.double().flip(-1)])
    with in_float64(gm):
        _, out = propagate(gm, plan, images, Level.BRANCH, ComponentRegistry(), parking=parking)
        _, adjoints = parking.adjoints(out, torch.cat([cotangents, cotangents[:1]]), retain_graph=True)
        pooling = plan_early_pooling(gm, plan, probe.data_nodes, starts, candidates,
                                     {n: a[:POOLING_COTANGENTS] for n, a in adjoints.items()}, cotangents,
                                     {n: a[POOLING_COTANGENTS:] for n, a in adjoints.items()}, dtype=image.dtype,
                                     probes=parking.probes, scales=parking.scales)
        parking.probes.clear()  # (their graph)
    if pooling is None:
        return None
    for birth, found in plan.births.items():  # checked on the probe's values, in the model's dtype
        if found.join in pooling.nodes and birth not in compacted:
            branch = plan_pooled_branch(gm, plan, pooling, birth, probe.values, probe.data_nodes)
            if branch is not None and not branch.skipped & compacted:
                pooling.branches[birth] = branch
    return pooling
