"""Early pooling at run time (the plan is ``tracer.pooling.EarlyPooling``).

During the pass, components leave the trunk at the plan's nodes and wait there (``Parking``);
a probe chunk takes their place, and hooks on it give, in one backward pass at the end, the
adjoint of the rest of the trunk at each such node for this batch. Attention branches the plan
pools inside the branch are not split into full-size head tensors at all: their real value is
kept where the heads are whole feature columns (at level token: the attention's weights and
values), and the row moves after it are followed with a row index code. At the end
(``pooled_components``) every waiting component is pooled over tokens with this batch's weights
and pushed through the unit tail on the small grid.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import fx

from tracer.attention import AttentionParts
from tracer.linear_rules import (
    Evaluator,
    additive_sign,
    apply_affine,
    bias_free_call,
    has_bias_argument,
    is_in_place,
)
from tracer.ops import op_kind
from tracer.pooling import MAP, EarlyPooling, PooledBranch, source_row_code
from tracer.roles import TrunkPlan

from .births import attention_groups, attention_parts
from .propagate import PROBE, Carried, Chunk, ComponentRegistry, born_label, offset_label, split_probe


def branches_for_level(branches: dict[fx.Node, PooledBranch], level: str) -> dict[fx.Node, tuple[PooledBranch, str]]:
    """birth -> (branch, how it is split: ``branch``, ``head`` or ``token``) for the branches pooled at
    ``level``: every branch with one component, attention whose heads are whole feature columns where
    it is pooled, and at level ``token`` only where every row there is one query row of the birth."""
    chosen = {}
    for birth, spec in branches.items():
        attention = spec.kind == "attention"
        if level == "branch" or not attention:
            chosen[birth] = (spec, "branch")
        elif level == "head" and spec.heads is not None:
            chosen[birth] = (spec, "head")
        elif level == "token" and spec.heads is not None and spec.within is not None:
            chosen[birth] = (spec, "token")
    return chosen


@dataclass
class _BranchRun:
    """What one pass keeps of a ``PooledBranch``: component ids, a real value (where the heads are
    split, or the join's operand for one component) or the attention parts (split by token), the row
    code pushed to the join (source row + 1, 0 for none), and the row maps with the constant components
    they add."""

    spec: PooledBranch
    split: str                                          # "branch", "head" or "token"
    ids: list[int] = field(default_factory=list)
    groups: torch.Tensor | None = None                  # [F] component (within ids) of each feature
    value: torch.Tensor | None = None
    code: torch.Tensor | None = None                    # [*rows, 1] row code while it is pushed
    targets: torch.Tensor | None = None                 # [rows where pooled] the join's row each feeds, or -1
    shape: tuple[int, ...] = ()                         # value shape where the code starts
    maps: list[tuple[fx.Node, fx.Node, dict]] = field(default_factory=list)  # op, carrier, other inputs
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
    """

    def __init__(self, nodes, perturb_all: bool = False,
                 branches: dict[fx.Node, tuple[PooledBranch, str]] | None = None,
                 static=(), reference: fx.Node | None = None):
        self.branches = {birth: spec for birth, (spec, _) in (branches or {}).items()}
        self._split = {birth: split for birth, (_, split) in (branches or {}).items()}
        self.required = {spec.join for spec in self.branches.values()} | ({reference} if reference else set())
        self.nodes = set(nodes) | self.required
        self.recorded = self.nodes - set(static) | ({reference} if reference else set())
        self.perturb_all = perturb_all
        self.parked: dict[fx.Node, list[Chunk]] = {}
        self.runs: dict[fx.Node, _BranchRun] = {}
        self._branch_of = {node: spec for spec in self.branches.values() for node in spec.skipped}
        self._leaf: torch.Tensor | None = None
        self._shapes: dict[fx.Node, torch.Size] = {}
        self._seen: dict[fx.Node, Any] = {}
        self._reduce = None

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
        # the probe is zero everywhere (linear rules keep it so); it carries the trunk's offsets where
        # nothing else flows, and needs grad from the first node whose adjoint is recorded
        values = probe[0].values if probe else real[node].new_zeros(()).expand(1, *shape)
        if node in self.recorded:
            if not values.requires_grad:
                if self._leaf is None:
                    self._leaf = torch.zeros((), dtype=real[node].dtype, device=real[node].device,
                                             requires_grad=True)
                values = self._leaf.expand(1, *shape)
            self._shapes[node] = shape
            values.register_hook(partial(self._record, node))
        if waiting:
            self.parked[node] = [Chunk(c.ids, c.values.expand(len(c.ids), *shape)) for c in waiting]
        return Carried([Chunk([PROBE], values)])

    def _record(self, node: fx.Node, grad: torch.Tensor) -> None:
        self._seen[node] = self._reduce(node, grad[0].detach())

    def adjoints(self, out: Carried, cotangent: torch.Tensor, reduce=lambda node, grad: grad
                 ) -> tuple[Carried, dict[fx.Node, Any]]:
        """``out`` without the probe, and node -> ``reduce(node, adjoint)`` for every node where the
        probe was recorded (adjoint: ∂⟨output, cotangent⟩/∂value, ``cotangent`` shaped like the output)."""
        probe, rest = split_probe(out)
        rest = Carried(rest)
        self._seen, self._reduce = {}, reduce
        if probe and self._leaf is not None:
            with torch.enable_grad():
                values = probe[0].values[0]
                torch.autograd.grad(values, [self._leaf], grad_outputs=cotangent.expand(values.shape).to(values.dtype),
                                    allow_unused=True)
        for node, shape in self._shapes.items():  # not reached by the probe: no effect on the output
            if node not in self._seen:
                self._seen[node] = reduce(node, torch.zeros(shape, dtype=self._leaf.dtype, device=self._leaf.device))
        seen, self._seen, self._leaf, self._shapes = self._seen, {}, None, {}
        return rest, seen

    # --- branches pooled inside the branch ----------------------------------------------
    def computes(self, node: fx.Node) -> bool:
        """Whether ``node``'s components are handled here (a node of a ``PooledBranch``)."""
        return node in self._branch_of

    def step(self, gm: fx.GraphModule, plan: TrunkPlan, node: fx.Node, real: dict, registry: ComponentRegistry,
             level: str, positions: list | None = None, batch_size: int | None = None) -> Carried:
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
            if steps[node] == MAP:
                self._record_map(gm, plan, run, node, carrier, real, registry)
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
        """Start a pooled branch's row code where it is pooled, and keep the real value it pools."""
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
        if run.split != "token" and node is (spec.node if run.split == "head" else spec.operand):
            run.value = real[node].clone() if _overwritten_later(node) else real[node]

    def _label_birth(self, plan, run: _BranchRun, real: dict, registry, positions: list | None,
                     batch_size: int | None) -> None:
        spec = run.spec
        birth = plan.births[spec.birth]
        parts = attention_parts(spec.birth, real) if run.split == "token" else None
        if run.split == "token" and parts is None:
            run.split = "head"  # as ``births.split_birth``: no weights and values, split by head only
        if run.split == "token":
            self._start_tokens(run, real[spec.birth], parts, batch_size)
            value = real[spec.birth]
            heads = range(run.weights.shape[1]) if value.dim() > 3 else [None]
            sources = run.windows * run.weights.shape[-1]
            run.ids = [registry.new(born_label(birth, spec.birth, h, t, positions))
                       for h in heads for t in range(sources)]
            return
        heads = sorted(set(spec.heads.tolist())) if run.split == "head" else [None]
        if run.split == "head":
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
            run.source_code = source_row_code(run.birth_shape).to(value.device).contiguous()

    def _record_map(self, gm, plan, run: _BranchRun, node, carrier, real, registry) -> None:
        inputs = {n: real[n] for n in node.all_input_nodes if n is not carrier}
        run.maps.append((node, carrier, inputs))
        width = real[carrier].shape[-1]
        zero = real[carrier].new_zeros(1, 1, width)
        _, offsets = apply_affine(gm, node, op_kind(node, gm), real, carrier, zero)
        for offset in offsets:
            component = registry.new(offset_label(offset, plan.layer(node), node))
            run.offsets.append((len(run.maps) - 1, component, offset.value.reshape(-1, offset.value.shape[-1])[0]))


def _overwritten_later(node: fx.Node) -> bool:
    """Whether an in-place op (``x.add_(y)``, ``x += y``) writes into ``node``'s value."""
    return any(user.args and user.args[0] is node and is_in_place(user) for user in node.users)


def _chain_input(spec: PooledBranch, node: fx.Node) -> fx.Node:
    previous = spec.node
    for step, _ in spec.steps:
        if step is node:
            return previous
        previous = step
    raise KeyError(node.name)


def _apply_map(gm: fx.GraphModule, node: fx.Node, carrier: fx.Node, inputs: dict, rows: torch.Tensor) -> torch.Tensor:
    """A row map (linear part) on ``rows`` [..., F] -> [..., F']."""
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


# a branch split by token is pooled and taken through the unit tail in pieces of at most this many
# elements ([components, B, K, F]): the small grid still has K·F numbers per component and image
PIECE_ELEMENTS = 2 ** 24


def _branch_pieces(gm: fx.GraphModule, pooling: EarlyPooling, run: _BranchRun, gamma: torch.Tensor
                   ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """A pooled branch's components at its join, pooled: ids and ``[k, B, K, F]``, in one piece (in
    several when split by token, each of at most ``PIECE_ELEMENTS``, then its constants)."""
    spec = run.spec
    pooled_join = pooling.nodes[spec.join]
    count = pooled_join.slot_count
    batch, tokens = gamma.shape
    fed = run.targets >= 0
    every_row = bool(fed.all())
    rows = None if every_row else fed.nonzero().flatten()               # rows where pooled that feed the join
    join_rows = run.targets if every_row else run.targets[rows]
    image, token = join_rows // tokens, join_rows % tokens
    weight = gamma[image, token]
    target = image * (count + 1) + pooled_join.slots.to(join_rows.device)[token]
    dtype = (run.value if run.value is not None else run.weights).dtype
    totals = gamma.new_zeros(batch * (count + 1)).index_add_(0, target, weight)
    totals = totals.reshape(batch, count + 1)[:, :count].unsqueeze(-1).to(dtype)  # [B, K, 1]: Σγ of fed rows
    sign = additive_sign(spec.join, list(spec.join.args[:2]).index(spec.operand))
    constants: list[torch.Tensor] = []
    constant_ids: list[int] = []
    for index, (node, carrier, inputs) in enumerate(run.maps):
        constants = [_apply_map(gm, node, carrier, inputs, c) for c in constants]
        for position, component, row in run.offsets:
            if position == index:
                constants.append((totals * row.to(dtype)).unsqueeze(0))
                constant_ids.append(component)

    def mapped(components: torch.Tensor) -> torch.Tensor:
        for node, carrier, inputs in run.maps:
            components = _apply_map(gm, node, carrier, inputs, components)
        return components

    def signed(values: torch.Tensor) -> torch.Tensor:
        return values if sign == 1.0 else values * sign

    if run.split == "token":
        slot = pooled_join.slots.to(join_rows.device)[token]
        for first, piece in _pooled_tokens(run, rows, image, weight.to(dtype), slot, batch, count):
            yield run.ids[first: first + piece.shape[0]], signed(mapped(piece))
        if constants:
            yield constant_ids, signed(torch.cat(constants))
        return
    if run.split == "head":  # the real value where heads are whole columns, pooled, then the row maps
        values = run.value.reshape(-1, run.value.shape[-1])
        values = values if every_row else values[rows]
        pooled = values.new_zeros(batch * (count + 1), values.shape[-1])
        pooled.index_add_(0, target, values * weight.unsqueeze(1).to(dtype))
        pooled = pooled.reshape(batch, count + 1, -1)[:, :count]       # [B, K, F]
        groups = run.groups.to(pooled.device)
        components = mapped(torch.stack([pooled * (groups == g).to(dtype) for g in range(len(run.ids))]))
    else:  # one component: the real operand pooled, less the constants it holds
        components = pooling.pooled(spec.join, run.value.unsqueeze(0), gamma)
        for constant in constants:
            components = components - constant
    yield run.ids + constant_ids, signed(torch.cat([components] + constants))


def _pooled_tokens(run: _BranchRun, rows: torch.Tensor | None, image: torch.Tensor, weight: torch.Tensor,
                   slot: torch.Tensor, batch: int, count: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Components (h, s) of a branch split by token, pooled at ``spec.node``: pieces ``[c, B, K, F]``
    of the ``H·S`` components in order, each with the index of its first component.

    rows: rows of ``spec.node`` that feed the join (None: all); image, weight, slot: per such row.
    Source s = w·Nk + j is key j of attention group w (``births._split_tokens``); its component at
    row r (attention row n, query q) is A[n, h, q, j] · V[n, h, j, within] on head h's features:

        pooled[(h, s), b, k, f] = Σ_{n : group w, image b} W[n, k, h, j] · V[n, h(f), j, within(f)] · [h(f) = h]
        W[n, k, h, j] = Σ_{rows r of n in slot k} weight(r) · A[n, h, q(r), j]
    """
    spec, weights, values = run.spec, run.weights, run.values            # [N, H, Nq, Nk], [N, H, Nk, d]
    groups, heads, queries, keys = weights.shape[0], weights.shape[1], weights.shape[2], weights.shape[3]
    sources = run.sources if rows is None else run.sources[rows]                          # [R] n·Nq + q
    group = sources // queries
    per_row = weights[group, :, sources % queries] * weight.view(-1, 1, 1)               # [R, H, Nk]
    # [N·(K+1), H, Nk] -> [N, K, H, Nk]: each group's weights of the keys, summed per slot
    summed = per_row.new_zeros(groups * (count + 1), heads, keys).index_add_(0, group * (count + 1) + slot, per_row)
    summed = summed.view(groups, count + 1, heads, keys)[:, :count]
    image_of = torch.full((groups,), -1, dtype=torch.long, device=group.device).scatter_(0, group, image)
    if not bool((image_of[group] == image).all()):
        raise RuntimeError(f"internal: an attention group of {spec.birth.name} feeds several images")
    used = (image_of >= 0).nonzero().flatten()                                            # groups that feed the join
    where = (used % run.windows, image_of[used])                                          # (w, b) of each
    head_of, within = spec.heads.to(group.device), spec.within.to(group.device)
    columns = values.transpose(1, 2).reshape(groups, keys, -1)[used][..., head_of * values.shape[-1] + within]
    width = len(head_of)
    step = max(1, PIECE_ELEMENTS // (keys * batch * count * width))                     # windows per piece
    for h in range(heads):
        own = columns * (head_of == h).to(columns.dtype)                                  # [n, Nk, F]
        for first in range(0, run.windows, step):
            last = min(first + step, run.windows)
            inside = ((where[0] >= first) & (where[0] < last)).nonzero().flatten()
            out = values.new_zeros(last - first, keys, batch, count, width)              # [w, Nk, B, K, F]
            part = summed[used[inside], :, h].transpose(1, 2).unsqueeze(-1) * own[inside].unsqueeze(2)
            out.transpose(1, 2).index_put_((where[0][inside] - first, where[1][inside]), part, accumulate=True)
            yield (h * run.windows + first) * keys, out.reshape(-1, batch, count, width)


def pooled_components(gm: fx.GraphModule, pooling: EarlyPooling, parking: Parking, out: Carried) -> Carried:
    """The output's components, with those parked at ``pooling``'s nodes (and its pooled branches)
    taken to the output: pooled over tokens with this batch's weights, then through the unit tail."""
    out, gammas = parking.adjoints(out, pooling.cotangent, reduce=pooling.weights)
    for node in set(parking.parked) | {run.spec.join for run in parking.runs.values()}:
        if node not in gammas:  # static: a multiple of the reference's weights
            gammas[node] = pooling.static_weights(node, gammas[pooling.reference])
    injections: dict[fx.Node, list[torch.Tensor]] = {}
    ids: dict[fx.Node, list[int]] = {}
    for node in list(parking.parked):
        for chunk in parking.parked.pop(node):
            injections.setdefault(node, []).append(pooling.pool(node, chunk.values, gammas[node]))
            ids.setdefault(node, []).extend(chunk.ids)
    for birth in list(parking.runs):
        run = parking.runs.pop(birth)
        join = run.spec.join
        pieces = _branch_pieces(gm, pooling, run, gammas[join])
        if run.split != "token":
            run_ids, values = next(pieces)
            injections.setdefault(join, []).append(pooling.arrange(join, values))
            ids.setdefault(join, []).extend(run_ids)
            continue
        for run_ids, values in pieces:  # each piece through the unit tail alone (bounded memory)
            rows = pooling.run({join: pooling.arrange(join, values)})[join]
            out.chunks.append(Chunk(run_ids, rows.reshape(len(run_ids), rows.shape[0] // len(run_ids),
                                                          *rows.shape[2:])))
    if not injections:
        return out
    for node, rows in pooling.run({n: torch.cat(parts) for n, parts in injections.items()}).items():
        count = len(ids[node])  # [k·B, 1, *D] -> [k, B, *D]
        out.chunks.append(Chunk(ids[node], rows.reshape(count, rows.shape[0] // count, *rows.shape[2:])))
    return out
