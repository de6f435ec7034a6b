"""The per-batch run of an early pooling inside the components pass: ``Parking`` sets components
aside at the pooled nodes and computes the pooled branches' labels, row codes and row maps."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import fx

from tracer.attention import AttentionParts, own_storage
from tracer.linear_rules import (
    Evaluator,
    apply_affine,
    frozen_row_scale,
)
from tracer.ops import op_kind, overwritten_later
from tracer.vocabulary import ComponentKind, Level

from ..births import attention_groups, attention_parts
from ..carried import Carried, Chunk, ComponentRegistry
from ..propagate import born_label, offset_label
from ..run_plan import RunPlan
from .branches import row_scale, source_row_code
from .layout import PooledBranch, RowStep, chain_input
from .norm_scales import NormScales

PROBE = -1  # the id of a ``Parking``'s probe chunk (``carried.is_probe``)


def split_probe(carried: Carried) -> tuple[list[Chunk], list[Chunk]]:
    """(a ``Parking``'s probe chunk, if any; the other chunks) of ``carried``."""
    return [c for c in carried.chunks if c.ids == [PROBE]], [c for c in carried.chunks if c.ids != [PROBE]]


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
class BranchRun:
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
    norm_scales: γ from the trunk norms' per-row scales (``norm_scales``): no adjoint recorded
    keep_probes: keep the probe's value at every recorded node (``probes``, graph kept)
    scale_nodes: trunk norms whose ``frozen_row_scale`` is kept (``scales``; with ``norm_scales``: its norms)
    rows:        the pooled branches' row maps by value shape, kept across passes (``RunPlan.rows``):
                 (birth, "targets", shape at its node) -> the join's row each row feeds (-1: none), and
                 (birth, "sources", birth shape) -> the birth's (attention row · Nq + query) of each row;
                 they depend on shapes only, so each batch size pushes a row code through the moves once
    """

    def __init__(self, nodes, perturb_all: bool = False,
                 branches: dict[fx.Node, tuple[PooledBranch, Level]] | None = None,
                 static=(), reference: fx.Node | None = None, norm_scales: NormScales | None = None,
                 keep_probes: bool = False, scale_nodes=(), rows: dict | None = None):
        self.rows = {} if rows is None else rows
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
        self.runs: dict[fx.Node, BranchRun] = {}
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

    def step(self, gm: fx.GraphModule, plan: RunPlan, node: fx.Node, real: dict, registry: ComponentRegistry,
             level: Level, positions: list | None = None, batch_size: int | None = None) -> Carried:
        """At a node of a pooled branch: labels at the birth, the row code and row maps after the
        pooled node; no components (the join receives none from this branch).

        positions: the birth's key positions (labels at level token); batch_size: images in the batch
        """
        spec = self._branch_of[node]
        run = self.runs.setdefault(spec.birth, BranchRun(spec, self._split[spec.birth]))
        if node is spec.birth:
            self._label_birth(plan, run, real, registry, positions, batch_size)
        elif run.source_code is not None and node in spec.prefix:
            previous = spec.prefix[spec.prefix.index(node) - 1]
            run.source_code = Evaluator(gm, node, real)({previous: run.source_code})
        if node is spec.node and run.source_code is not None:  # [rows of node]: n·Nq + q of each
            run.sources = run.source_code.reshape(-1, run.source_code.shape[-1])[:, 0].round().long() - 1
            self.rows[(spec.birth, "sources", run.birth_shape)], run.source_code = run.sources, None
        steps = dict(spec.steps)
        if node in steps:
            carrier = chain_input(spec, node)
            if steps[node] in (RowStep.MAP, RowStep.SCALE):
                self._record_map(gm, plan, run, node, carrier, real, registry, steps[node])
            elif run.targets is None:  # push the row code (once per value shape)
                code = run.code.expand(real[carrier].shape).contiguous()
                run.code = Evaluator(gm, node, real)({carrier: code})[..., :1].clone()  # not a view of it
            if node is spec.operand and run.targets is None:
                sources = run.code.reshape(-1).round().long() - 1          # join row -> its source row
                fed = (sources >= 0).nonzero().flatten()
                run.targets = torch.full((math.prod(run.shape[:-1]),), -1, dtype=torch.long, device=fed.device)
                run.targets[sources[fed]] = fed
                self.rows[(spec.birth, "targets", run.shape)] = run.targets
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
            run.targets = self.rows.get((spec.birth, "targets", run.shape))
            if run.targets is None:
                rows = real[node].shape[:-1]
                run.code = (torch.arange(rows.numel(), dtype=torch.float64, device=real[node].device) + 1).reshape(
                    *rows, 1)
        if run.split is not Level.TOKEN and node is (spec.node if run.split is Level.HEAD else spec.operand):
            run.value = real[node].clone() if overwritten_later(node) else real[node]

    def _label_birth(self, plan, run: BranchRun, real: dict, registry, positions: list | None,
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

    def _start_tokens(self, run: BranchRun, value: torch.Tensor, parts: AttentionParts, batch_size: int | None
                      ) -> None:
        """Keep the birth's weights and values by head, start its source code (``value`` [N, *heads, Nq, d])."""
        rows, queries, width = value.shape[0], value.shape[-2], value.shape[-1]
        keys = parts.weights.shape[-1]
        run.weights = own_storage(parts.weights.expand(*value.shape[:-1], keys).reshape(rows, -1, queries, keys))
        run.values = own_storage(parts.values.expand(*value.shape[:-2], keys, width).reshape(rows, -1, keys, width))
        # as ``births.split_birth``: rows b·windows + w when the batch axis holds several per image
        run.windows = attention_groups(rows, batch_size)
        run.birth_shape = tuple(value.shape)
        run.sources = self.rows.get((run.spec.birth, "sources", run.birth_shape))
        if run.sources is None:
            run.source_code = source_row_code(run.birth_shape, value.device).contiguous()

    def _record_map(self, gm, plan, run: BranchRun, node, carrier, real, registry, kind: str) -> None:
        inputs = {n: real[n] for n in node.all_input_nodes if n is not carrier}
        run.maps.append((node, carrier, inputs, kind))
        if kind is RowStep.SCALE:  # its offsets (the norm's bias) come from the same full-size evaluation
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
