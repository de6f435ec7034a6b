"""Early pooling at run time (the plan is ``tracer.pooling.EarlyPooling``).

During the pass, components leave the trunk at the plan's nodes and wait there (``Parking``).
The pooling weights γ of this batch come from the trunk norms' per-row scales where the plan found
that formula (``tracer.norm_scales``: then only the trunk's constants flow on); otherwise a probe
chunk takes the components' place, and hooks on it give, in one backward pass at the end, the
adjoint of the rest of the trunk at each such node. Attention branches the plan
pools inside the branch are not split into full-size head tensors at all: their real value is
kept where the heads are whole feature columns (at level token: the attention's weights and
values), and the row moves after it are followed with a row index code. At the end
(``pooled_components``) every waiting component is pooled over tokens with this batch's weights
and pushed through the unit tail on the small grid; a branch split by token reaches the output
through one matrix per head instead (``token_matrices``: row maps and unit tail composed, cached).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tracer.attention import AttentionParts
from tracer.linear_rules import (
    Evaluator,
    additive_sign,
    apply_affine,
    bias_free_call,
    frozen_row_scale,
    has_bias_argument,
)
from tracer.norm_scales import NormScales
from tracer.ops import op_kind, overwritten_later
from tracer.pooling import (
    MAP,
    SCALE,
    EarlyPooling,
    PooledBranch,
    row_scale,
    source_row_code,
    unit_norm,
    weighted_segment_sum,
)
from tracer.roles import TrunkPlan
from tracer.vocabulary import ComponentKind, Level

from .births import attention_groups, attention_parts
from .carried import PROBE, Carried, Chunk, ComponentRegistry, split_probe
from .propagate import born_label, offset_label


def branches_for_level(branches: dict[fx.Node, PooledBranch], level: Level | str
                       ) -> dict[fx.Node, tuple[PooledBranch, Level]]:
    """birth -> (branch, how it is split: ``branch``, ``head`` or ``token``) for the branches pooled at
    ``level``: every branch with one component, attention whose heads are whole feature columns where
    it is pooled, and at level ``token`` only where every row there is one query row of the birth."""
    chosen, level = {}, Level(level)
    for birth, spec in branches.items():
        attention = spec.kind is ComponentKind.ATTENTION
        if level is Level.BRANCH or not attention:
            chosen[birth] = (spec, Level.BRANCH)
        elif level is Level.HEAD and spec.heads is not None:
            chosen[birth] = (spec, Level.HEAD)
        elif level is Level.TOKEN and spec.heads is not None and spec.within is not None:
            chosen[birth] = (spec, Level.TOKEN)
    return chosen


@dataclass
class _BranchRun:
    """What one pass keeps of a ``PooledBranch``: component ids, a real value (where the heads are
    split, or the join's operand for one component) or the attention parts (split by token), the row
    code pushed to the join (source row + 1, 0 for none), and the row maps with the constant components
    they add."""

    spec: PooledBranch
    split: Level                                        # how the branch is split
    ids: list[int] = field(default_factory=list)
    groups: torch.Tensor | None = None                  # [F] component (within ids) of each feature
    value: torch.Tensor | None = None
    code: torch.Tensor | None = None                    # [*rows, 1] row code while it is pushed
    targets: torch.Tensor | None = None                 # [rows where pooled] the join's row each feeds, or -1
    shape: tuple[int, ...] = ()                         # value shape where the code starts
    maps: list[tuple[fx.Node, fx.Node, dict, str]] = field(default_factory=list)  # op, carrier, other inputs, kind
    row_scale: torch.Tensor | None = None               # [join rows] a ``SCALE`` step's frozen scale
    scale_at: int = -1                                  # its index in ``maps`` (-1: none)
    # split by token: weights [N, H, Nq, Nk] and values [N, H, Nk, d] of the birth, attention groups
    # per image, the source code (``source_row_code``) pushed to ``spec.node``, and there per row n·Nq + q
    weights: torch.Tensor | None = None
    values: torch.Tensor | None = None
    windows: int = 1
    source_code: torch.Tensor | None = None
    birth_shape: tuple[int, ...] = ()
    sources: torch.Tensor | None = None
    offsets: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)  # after map i: id, row [F']


class Parking:
    """Components set aside at trunk nodes, taken to the output at the end of the pass.

    nodes:       trunk nodes where the components carried so far leave the trunk
    perturb_all: record the adjoint at every node of ``nodes`` even where nothing waits
    branches:    birth -> (``PooledBranch``, how it is split) computed here instead of per component
    static, reference: nodes whose adjoint follows from the one at ``reference`` (no probe needed
                 before it: the probe needs grad only from the first node it is recorded at)
    norm_scales: γ from the trunk norms' per-row scales (``tracer.norm_scales``): no adjoint recorded
    keep_probes: keep the probe's value at every recorded node (``probes``, graph kept)
    scale_nodes: trunk norms whose ``frozen_row_scale`` is kept (``scales``; with ``norm_scales``: its norms)
    """

    def __init__(self, nodes, perturb_all: bool = False,
                 branches: dict[fx.Node, tuple[PooledBranch, str]] | None = None,
                 static=(), reference: fx.Node | None = None, norm_scales: NormScales | None = None,
                 keep_probes: bool = False, scale_nodes=()):
        self.branches = {birth: spec for birth, (spec, _) in (branches or {}).items()}
        self._split = {birth: split for birth, (_, split) in (branches or {}).items()}
        self.norm_scales = norm_scales
        if norm_scales is not None:
            static, reference, scale_nodes = (), None, norm_scales.norms
        self.required = {spec.join for spec in self.branches.values()} | ({reference} if reference else set())
        self.nodes = set(nodes) | self.required
        self.recorded = set() if norm_scales is not None else \
            self.nodes - set(static) | ({reference} if reference else set())
        self.keep_probes, self.probes = keep_probes, {}
        self.batch = 0  # images in the pass (set at the first parked node)
        self.scale_nodes, self.scales = set(scale_nodes), {}
        self.perturb_all = perturb_all
        self.parked: dict[fx.Node, list[Chunk]] = {}
        self.runs: dict[fx.Node, _BranchRun] = {}
        self._branch_of = {node: spec for spec in self.branches.values() for node in spec.skipped}
        self._leaf: torch.Tensor | None = None
        self._shapes: dict[fx.Node, torch.Size] = {}
        self._seen: dict[fx.Node, Any] = {}
        self._reduce = self._reduce_key = None
        self._last: tuple | None = None  # (key, adjoint, reduced) of the last recorded node

    # --- the trunk ------------------------------------------------------------------------
    def park(self, node: fx.Node, carried: Carried, real: dict) -> Carried:
        if node not in self.nodes or not isinstance(real.get(node), torch.Tensor):
            return carried
        probe, waiting = split_probe(carried)
        if not all(isinstance(c.values, torch.Tensor) for c in waiting):
            return carried
        if not (waiting or self.perturb_all or node in self.required):
            return carried
        shape = real[node].shape
        self.batch = shape[0]
        # the probe is zero everywhere (linear rules keep it so) and needs grad from the first node whose
        # adjoint is recorded
        values = probe[0].values if probe else real[node].new_zeros(()).expand(1, *shape)
        if node in self.recorded:
            if not values.requires_grad:
                if self._leaf is None:
                    self._leaf = torch.zeros((), dtype=real[node].dtype, device=real[node].device,
                                             requires_grad=True)
                values = self._leaf.expand(1, *shape)
            self._shapes[node] = shape
            values.register_hook(partial(self._record, node))
            if self.keep_probes:
                self.probes[node] = values
        if waiting:
            self.parked[node] = [Chunk(c.ids, c.values.expand(len(c.ids), *shape)) for c in waiting]
        if self.norm_scales is not None:  # no adjoints: nothing flows on but the trunk's constants
            return Carried([])
        return Carried([Chunk([PROBE], values)])

    def _record(self, node: fx.Node, grad: torch.Tensor) -> None:
        grad = grad[0].detach()
        key = self._reduce_key(node, grad)
        if key is None or self._last is None or self._last[0] != key:
            self._last = (key, grad, self._reduce(node, grad))  # the adjoint is kept: its address is in the key
        self._seen[node] = self._last[2]

    @property
    def needs_grad(self) -> bool:
        """Whether the pass must record the probe's graph (for ``adjoints``)."""
        return bool(self.recorded)

    def adjoints(self, out: Carried, cotangent: torch.Tensor, reduce=lambda node, grad: grad,
                 reduce_key=lambda node, grad: None, retain_graph: bool = False
                 ) -> tuple[Carried, dict[fx.Node, Any]]:
        """``out`` without the probe, and node -> ``reduce(node, adjoint)`` for every node where the
        probe was recorded (adjoint: ∂⟨output, cotangent⟩/∂value, ``cotangent`` shaped like the output).
        A node whose ``reduce_key`` equals the last recorded node's (not None) shares its result: the
        adjoints of a stage's nodes, between which the trunk only reshapes, are views of one tensor."""
        probe, rest = split_probe(out)
        rest = Carried(rest)
        self._seen, self._reduce, self._reduce_key = {}, reduce, reduce_key
        if probe and self._leaf is not None:
            with torch.enable_grad():
                values = probe[0].values[0]
                torch.autograd.grad(values, [self._leaf], grad_outputs=cotangent.expand(values.shape).to(values.dtype),
                                    allow_unused=True, retain_graph=retain_graph)
        for node, shape in self._shapes.items():  # not reached by the probe: no effect on the output
            if node not in self._seen:
                self._seen[node] = reduce(node, torch.zeros(shape, dtype=self._leaf.dtype, device=self._leaf.device))
        seen, self._seen, self._leaf, self._shapes, self._last = self._seen, {}, None, {}, None
        return rest, seen

    # --- branches pooled inside the branch ----------------------------------------------
    def computes(self, node: fx.Node) -> bool:
        """Whether ``node``'s components are handled here (a node of a ``PooledBranch``)."""
        return node in self._branch_of

    def step(self, gm: fx.GraphModule, plan: TrunkPlan, node: fx.Node, real: dict, registry: ComponentRegistry,
             level: Level, positions: list | None = None, batch_size: int | None = None) -> Carried:
        """At a node of a pooled branch: labels at the birth, the row code and row maps after the
        pooled node; no components (the join receives none from this branch).

        positions: the birth's key positions (labels at level token); batch_size: images in the batch
        """
        spec = self._branch_of[node]
        run = self.runs.setdefault(spec.birth, _BranchRun(spec, self._split[spec.birth]))
        if node is spec.birth:
            self._label_birth(plan, run, real, registry, positions, batch_size)
        elif run.source_code is not None and node in spec.prefix:
            previous = spec.prefix[spec.prefix.index(node) - 1]
            run.source_code = Evaluator(gm, node, real)({previous: run.source_code})
        if node is spec.node and run.source_code is not None:  # [rows of node]: n·Nq + q of each
            run.sources = run.source_code.reshape(-1, run.source_code.shape[-1])[:, 0].round().long() - 1
            spec.source_rows[run.birth_shape], run.source_code = run.sources, None
        steps = dict(spec.steps)
        if node in steps:
            carrier = _chain_input(spec, node)
            if steps[node] in (MAP, SCALE):
                self._record_map(gm, plan, run, node, carrier, real, registry, steps[node])
            elif run.targets is None:  # push the row code (once per value shape)
                code = run.code.expand(real[carrier].shape).contiguous()
                run.code = Evaluator(gm, node, real)({carrier: code})[..., :1].clone()  # not a view of it
            if node is spec.operand and run.targets is None:
                sources = run.code.reshape(-1).round().long() - 1          # join row -> its source row
                fed = (sources >= 0).nonzero().flatten()
                run.targets = torch.full((math.prod(run.shape[:-1]),), -1, dtype=torch.long, device=fed.device)
                run.targets[sources[fed]] = fed
                spec.row_targets[run.shape] = run.targets
                run.code = None
        return Carried([])

    def after_real(self, node: fx.Node, real: dict) -> None:
        """Keep a trunk norm's per-row scale; start a pooled branch's row code where it is pooled, and
        keep the real value it pools."""
        if node in self.scale_nodes:
            self.scales[node] = frozen_row_scale(node, real)
        spec = self._branch_of.get(node)
        if spec is None:
            return
        run = self.runs[spec.birth]
        if node is spec.node:
            run.shape = tuple(real[node].shape)
            run.targets = spec.row_targets.get(run.shape)
            if run.targets is None:
                rows = real[node].shape[:-1]
                run.code = (torch.arange(rows.numel(), dtype=torch.float64, device=real[node].device) + 1).reshape(
                    *rows, 1)
        if run.split is not Level.TOKEN and node is (spec.node if run.split is Level.HEAD else spec.operand):
            run.value = real[node].clone() if overwritten_later(node) else real[node]

    def _label_birth(self, plan, run: _BranchRun, real: dict, registry, positions: list | None,
                     batch_size: int | None) -> None:
        spec = run.spec
        birth = plan.births[spec.birth]
        parts = attention_parts(spec.birth, real) if run.split is Level.TOKEN else None
        if run.split is Level.TOKEN and parts is None:
            run.split = Level.HEAD  # as ``births.split_birth``: no weights and values, split by head only
        if run.split is Level.TOKEN:
            self._start_tokens(run, real[spec.birth], parts, batch_size)
            value = real[spec.birth]
            heads = range(run.weights.shape[1]) if value.dim() > 3 else [None]
            sources = run.windows * run.weights.shape[-1]
            key = (spec.birth, Level.TOKEN, len(heads), sources)
            if key not in plan.labels:  # the same for every batch of this plan
                plan.labels[key] = [born_label(birth, spec.birth, h, t, positions)
                                    for h in heads for t in range(sources)]
            run.ids = registry.new_many(plan.labels[key])
            return
        heads = sorted(set(spec.heads.tolist())) if run.split is Level.HEAD else [None]
        if run.split is Level.HEAD:
            run.groups = spec.heads
        run.ids = [registry.new(born_label(birth, spec.birth, h, None)) for h in heads]

    @staticmethod
    def _start_tokens(run: _BranchRun, value: torch.Tensor, parts: AttentionParts, batch_size: int | None) -> None:
        """Keep the birth's weights and values by head, start its source code (``value`` [N, *heads, Nq, d])."""
        rows, queries, width = value.shape[0], value.shape[-2], value.shape[-1]
        keys = parts.weights.shape[-1]
        run.weights = parts.weights.expand(*value.shape[:-1], keys).reshape(rows, -1, queries, keys)
        run.values = parts.values.expand(*value.shape[:-2], keys, width).reshape(rows, -1, keys, width)
        # as ``births.split_birth``: rows b·windows + w when the batch axis holds several per image
        run.windows = attention_groups(rows, batch_size)
        run.birth_shape = tuple(value.shape)
        run.sources = run.spec.source_rows.get(run.birth_shape)
        if run.sources is None:
            run.source_code = source_row_code(run.birth_shape, value.device).contiguous()

    def _record_map(self, gm, plan, run: _BranchRun, node, carrier, real, registry, kind: str) -> None:
        inputs = {n: real[n] for n in node.all_input_nodes if n is not carrier}
        run.maps.append((node, carrier, inputs, kind))
        if kind == SCALE:  # its offsets (the norm's bias) come from the same full-size evaluation
            offsets: list = []
            scale = row_scale(gm, node, carrier, real, checked=False, offsets=offsets)  # checked when planning
            if scale is None:
                raise RuntimeError(f"early pooling: no per-row scale at {node.name} for this batch; "
                                   f"decompose with prune=False")
            run.row_scale, run.scale_at = scale.reshape(-1), len(run.maps) - 1
        else:
            _, offsets = apply_affine(gm, node, op_kind(node, gm), real, carrier,
                                      real[carrier].new_zeros(1, 1, real[carrier].shape[-1]))
        for offset in offsets:
            component = registry.new(offset_label(offset, plan.layer(node), node))
            run.offsets.append((len(run.maps) - 1, component, offset.value.reshape(-1, offset.value.shape[-1])[0]))


def _chain_input(spec: PooledBranch, node: fx.Node) -> fx.Node:
    previous = spec.node
    for step, _ in spec.steps:
        if step is node:
            return previous
        previous = step
    raise KeyError(node.name)


def _apply_map(gm: fx.GraphModule, node: fx.Node, carrier: fx.Node, inputs: dict, kind: str,
               rows: torch.Tensor) -> torch.Tensor:
    """A row map (linear part; of a ``SCALE`` step: its unit part) on ``rows`` [..., F] -> [..., F']."""
    if kind == SCALE:
        return unit_norm(node, inputs, rows)
    flat = rows.reshape(1, -1, rows.shape[-1])
    if has_bias_argument(node, carrier):
        out = Evaluator(gm, bias_free_call(node)[0], inputs)({carrier: flat})
    else:
        evaluate = Evaluator(gm, node, inputs)
        out = evaluate({carrier: flat})
        at_zero = evaluate({carrier: torch.zeros_like(flat[:, :1])})
        if bool(at_zero.any()):
            out = out - at_zero
    return out.reshape(*rows.shape[:-1], out.shape[-1])


# a branch split by token is taken to the output in pieces of at most this many elements of its
# widest intermediate ([windows, keys, K, head features] pooled, before the tail's matrix)
PIECE_ELEMENTS = 2 ** 24


@dataclass
class _JoinRows:
    """The rows where a pooled branch is pooled that feed its join, and their pooling weights."""

    rows: torch.Tensor | None   # [R] those rows (None: all)
    image: torch.Tensor         # [R] image of each
    slot: torch.Tensor          # [R] small-grid token at the join
    weight: torch.Tensor        # [R] γ at the join's row (times the row's ``SCALE``, if any: for values before it)
    totals: torch.Tensor        # [B, K, 1] Σγ of the fed rows per image and slot
    scaled: torch.Tensor        # [B, K, 1] Σ weight (= totals without a ``SCALE`` step)
    target: torch.Tensor        # [R] image · (K + 1) + slot
    sign: float                 # how the branch enters the join


def _join_rows(pooling: EarlyPooling, run: _BranchRun, gamma: torch.Tensor, dtype: torch.dtype) -> _JoinRows:
    spec = run.spec
    pooled_join = pooling.nodes[spec.join]
    count = pooled_join.slot_count
    batch, tokens = gamma.shape
    fed = run.targets >= 0
    rows = None if bool(fed.all()) else fed.nonzero().flatten()
    join_rows = run.targets if rows is None else run.targets[rows]
    image, token = join_rows // tokens, join_rows % tokens
    unscaled = gamma[image, token]
    weight = unscaled if run.row_scale is None else unscaled * run.row_scale.to(unscaled)[join_rows]
    slot = pooled_join.slots.to(join_rows.device)[token]
    target = image * (count + 1) + slot

    def per_slot(values):  # [R] -> [B, K, 1]
        summed = gamma.new_zeros(batch * (count + 1)).index_add_(0, target, values)
        return summed.reshape(batch, count + 1)[:, :count].unsqueeze(-1).to(dtype)

    totals = per_slot(unscaled)
    scaled = totals if run.row_scale is None else per_slot(weight)
    return _JoinRows(rows, image, slot, weight.to(dtype), totals, scaled, target, _join_sign(spec))


def _join_sign(spec: PooledBranch) -> float:
    return additive_sign(spec.join, list(spec.join.args[:2]).index(spec.operand))


def _mapped(gm: fx.GraphModule, run: _BranchRun, rows: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``rows`` [..., F] through the branch's row maps from map ``first`` on, to the join."""
    for node, carrier, inputs, kind in run.maps[first:]:
        rows = _apply_map(gm, node, carrier, inputs, kind, rows)
    return rows


def _constants(gm: fx.GraphModule, run: _BranchRun, join: _JoinRows) -> tuple[list[int], torch.Tensor | None]:
    """The constant components the row maps add (ids, [c, B, K, F] at the join, signed)."""
    ids, values = [], []
    for position, component, row in run.offsets:  # a constant added before a SCALE step is scaled by it
        ids.append(component)
        totals = join.scaled if position < run.scale_at else join.totals
        values.append(_mapped(gm, run, (totals * row.to(totals.dtype)).unsqueeze(0), position + 1))
    if not values:
        return ids, None
    return ids, torch.cat(values) * join.sign


def _branch_components(gm: fx.GraphModule, pooling: EarlyPooling, run: _BranchRun, gamma: torch.Tensor
                       ) -> tuple[list[int], torch.Tensor]:
    """A pooled branch (split by branch or head) at its join, pooled: ids and ``[k, B, K, F]``."""
    dtype = run.value.dtype
    join = _join_rows(pooling, run, gamma, dtype)
    constant_ids, constants = _constants(gm, run, join)
    count = pooling.nodes[run.spec.join].slot_count
    if run.split is Level.HEAD:  # the real value where heads are whole columns, pooled, then the row maps
        values = run.value.reshape(-1, run.value.shape[-1])
        values = values if join.rows is None else values[join.rows]
        pooled = weighted_segment_sum(values, join.target, join.weight, gamma.shape[0] * (count + 1))
        pooled = pooled.reshape(gamma.shape[0], count + 1, -1)[:, :count]       # [B, K, F]
        components = _head_rows_mapped(gm, run, pooled) * join.sign
    else:  # one component: the real operand pooled, less the constants it holds
        components = pooling.pooled(run.spec.join, run.value.unsqueeze(0), gamma) * join.sign
        if constants is not None:
            components = components - constants.sum(0, keepdim=True)
    parts = [components] if constants is None else [components, constants]
    return run.ids + constant_ids, torch.cat(parts)


def _head_rows_mapped(gm: fx.GraphModule, run: _BranchRun, pooled: torch.Tensor) -> torch.Tensor:
    """The pooled value ``[B, K, F]`` split by head and through the row maps: ``[H, B, K, F']``.

    A first map that is a linear layer over heads laid out as equal consecutive column blocks
    (``x.transpose(1, 2).reshape(B, N, C)`` before ``proj``) takes each head's block of its weight: one
    batched product, H times smaller than the linear layer on H masked copies."""
    groups = run.groups.to(pooled.device)
    heads = len(run.ids)
    if run.maps and pooled.shape[-1] % heads == 0:
        node, carrier, inputs, kind = run.maps[0]
        width = pooled.shape[-1] // heads
        weight = inputs.get(node.args[1]) if kind == MAP and node.target is F.linear and \
            has_bias_argument(node, carrier) and isinstance(node.args[1], fx.Node) else None
        blocks = torch.arange(heads, device=groups.device).repeat_interleave(width)
        if weight is not None and weight.shape[-1] == pooled.shape[-1] and torch.equal(groups, blocks):
            per_head = torch.einsum("bkhd,ohd->hbko", pooled.unflatten(-1, (heads, width)),
                                    weight.to(pooled.dtype).unflatten(-1, (heads, width)))
            return _mapped(gm, run, per_head, first=1)
    return _masked_head_rows_mapped(gm, run, pooled)


def _masked_head_rows_mapped(gm: fx.GraphModule, run: _BranchRun, pooled: torch.Tensor) -> torch.Tensor:
    """``_head_rows_mapped`` for any layout: the row maps on one masked copy of ``pooled`` per head."""
    groups = run.groups.to(pooled.device)
    return _mapped(gm, run, torch.stack([pooled * (groups == g).to(pooled.dtype) for g in range(len(run.ids))]))


def token_matrices(gm: fx.GraphModule, pooling: EarlyPooling, runs: list[_BranchRun], dtype: torch.dtype,
                   device: torch.device) -> dict[fx.Node, torch.Tensor]:
    """birth -> ``[K, F, O]``: the row maps, the sign at the join and the unit tail composed, from a
    pooled row at ``spec.node`` (small-grid token k, feature f) to the output (O numbers per image)."""
    tails = pooling.tail_matrices({run.spec.join for run in runs}, dtype, device)
    matrices = {}
    for run in runs:
        width = len(run.spec.heads)
        rows = _mapped(gm, run, torch.eye(width, dtype=dtype, device=device))            # [F, F at the join]
        rows = rows * _join_sign(run.spec)
        count = pooling.nodes[run.spec.join].slot_count
        tail = tails[run.spec.join].reshape(count, rows.shape[-1], -1)                  # [K, F', O]
        matrices[run.spec.birth] = torch.einsum("fj,kjo->kfo", rows, tail)
    return matrices


def _token_components(pooling: EarlyPooling, run: _BranchRun, join: _JoinRows, matrix: torch.Tensor,
                      batch: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Components (h, s) of a branch split by token, at the output: ids and pieces ``[c, B, O]`` of
    the ``H·S`` components in order (the branch's constants are ``_constants``).

    matrix: ``[K, F, O]`` from ``token_matrices``. Source s = w·Nk + j is key j of attention group w
    (``births._split_tokens``); its component at row r (attention row n, query q) is
    A[n, h, q, j] · V[n, h, j, within] on head h's features, so pooled and at the output:

        out[(h, s), b] = Σ_{n : group w, image b} Σ_k Σ_{f of head h} W[n, k, h, j] · V[n, h, j, within(f)] · matrix[k, f]
        W[n, k, h, j]  = Σ_{rows r of n in slot k} γ(r) · A[n, h, q(r), j]
    """
    spec, weights, values = run.spec, run.weights, run.values            # [N, H, Nq, Nk], [N, H, Nk, d]
    count = pooling.nodes[spec.join].slot_count
    groups, heads, queries, keys = weights.shape
    sources = run.sources if join.rows is None else run.sources[join.rows]                # [R] n·Nq + q
    group = sources // queries
    per_row = weights[group, :, sources % queries] * join.weight.view(-1, 1, 1)          # [R, H, Nk]
    # [N·(K+1), H, Nk] -> [N, K, H, Nk]: each group's weights of the keys, summed per slot
    summed = per_row.new_zeros(groups * (count + 1), heads, keys).index_add_(0, group * (count + 1) + join.slot,
                                                                            per_row)
    summed = summed.view(groups, count + 1, heads, keys)[:, :count]
    image_of = torch.full((groups,), -1, dtype=torch.long, device=group.device).scatter_(0, group, join.image)
    if not bool((image_of[group] == join.image).all()):
        raise RuntimeError(f"internal: an attention group of {spec.birth.name} feeds several images")
    used = (image_of >= 0).nonzero().flatten()                                            # groups that feed the join
    window, image = used % run.windows, image_of[used]
    head_of, within = spec.heads.to(group.device), spec.within.to(group.device)
    outputs = matrix.shape[-1]
    for h in range(heads):
        features = (head_of == h).nonzero().flatten()
        own = values[used, h][..., within[features]]                                      # [n, Nk, W]
        head_matrix = matrix[:, features].reshape(-1, outputs)                            # [K·W, O]
        step = max(1, PIECE_ELEMENTS // (keys * count * len(features) * batch))           # windows per piece
        for first in range(0, run.windows, step):
            last = min(first + step, run.windows)
            inside = ((window >= first) & (window < last)).nonzero().flatten()
            slot_weights = summed[used[inside], :, h].transpose(1, 2).contiguous()        # [n, Nk, K]
            pooled = slot_weights.unsqueeze(-1) * own[inside].unsqueeze(2)                # [n, Nk, K, W]
            out = values.new_zeros(batch * (last - first), keys, outputs)                 # [B·w, Nk, O]
            out.index_copy_(0, image[inside] * (last - first) + window[inside] - first, pooled.flatten(2) @ head_matrix)
            out = out.view(batch, last - first, keys, outputs).permute(1, 2, 0, 3)        # [w, Nk, B, O] (a view)
            yield run.ids[(h * run.windows + first) * keys: (h * run.windows + last) * keys], out.flatten(0, 1)


def pooled_components(gm: fx.GraphModule, pooling: EarlyPooling, parking: Parking, out: Carried) -> Carried:
    """The output's components, with those parked at ``pooling``'s nodes (and its pooled branches)
    taken to the output: pooled over tokens with this batch's weights, then through the unit tail."""
    needed = set(parking.parked) | {run.spec.join for run in parking.runs.values()}
    if parking.norm_scales is not None:  # no backward pass: γ from the trunk norms' scales
        out = Carried(split_probe(out)[1])
        gammas = {node: parking.norm_scales.weights(node, parking.scales, parking.batch) for node in needed}
    else:
        out, gammas = parking.adjoints(out, pooling.cotangent, reduce=pooling.weights,
                                       reduce_key=pooling.weights_key)
    for node in needed:
        if node not in gammas:  # static: a multiple of the reference's weights
            gammas[node] = pooling.static_weights(node, gammas[pooling.reference])
    injections: dict[fx.Node, list[torch.Tensor]] = {}
    ids: dict[fx.Node, list[int]] = {}
    for node in list(parking.parked):
        for chunk in parking.parked.pop(node):
            injections.setdefault(node, []).append(pooling.pool(node, chunk.values, gammas[node]))
            ids.setdefault(node, []).extend(chunk.ids)
    tokens = [run for run in parking.runs.values() if run.split is Level.TOKEN]
    if tokens:
        dtype, device = tokens[0].weights.dtype, tokens[0].weights.device
        matrices = pooling.cached((Level.TOKEN, dtype, str(device)),
                                  lambda: token_matrices(gm, pooling, tokens, dtype, device))
    for birth in list(parking.runs):
        run = parking.runs.pop(birth)
        join = run.spec.join
        if run.split is not Level.TOKEN:
            run_ids, values = _branch_components(gm, pooling, run, gammas[join])
            injections.setdefault(join, []).append(pooling.arrange(join, values))
            ids.setdefault(join, []).extend(run_ids)
            continue
        rows = _join_rows(pooling, run, gammas[join], run.weights.dtype)
        for run_ids, values in _token_components(pooling, run, rows, matrices[birth], gammas[join].shape[0]):
            out.chunks.append(Chunk(run_ids, values.reshape(len(run_ids), -1, *pooling.cotangent.shape)))
        constant_ids, constants = _constants(gm, run, rows)
        if constants is not None:
            injections.setdefault(join, []).append(pooling.arrange(join, constants))
            ids.setdefault(join, []).extend(constant_ids)
    if not injections:
        return out
    for node, rows in pooling.run({n: torch.cat(parts) for n, parts in injections.items()}).items():
        count = len(ids[node])  # [k·B, 1, *D] -> [k, B, *D]
        out.chunks.append(Chunk(ids[node], rows.reshape(count, rows.shape[0] // count, *rows.shape[2:])))
    return out
