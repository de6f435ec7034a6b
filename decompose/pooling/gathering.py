"""Gathering at the end of the pass: every parked component pooled over tokens with this batch's
weights and pushed through the unit tail; branches split by token reach the output through one matrix
per head (``token_matrices``)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import fx

from tracer.linear_rules import (
    Evaluator,
    additive_sign,
    bias_free_call,
    has_bias_argument,
)
from tracer.recording import structural
from tracer.vocabulary import Level

from ..carried import Carried, Chunk
from .layout import EarlyPooling, PooledBranch, RowStep, weighted_segment_sum
from .parking import PROBE, BranchRun, Parking, split_probe
from .unit_tail import unit_norm


def _apply_map(gm: fx.GraphModule, node: fx.Node, carrier: fx.Node, inputs: dict, kind: str,
               rows: torch.Tensor) -> torch.Tensor:
    """A row map (linear part; of a ``SCALE`` step: its unit part) on ``rows`` [..., F] -> [..., F']."""
    if kind is RowStep.SCALE:
        return unit_norm(node, inputs, rows)
    flat = rows.reshape(1, -1, rows.shape[-1])
    if has_bias_argument(node, carrier):
        out = Evaluator(gm, bias_free_call(node)[0], inputs)({carrier: flat})
    else:
        evaluate = Evaluator(gm, node, inputs)
        out = evaluate({carrier: flat})
        out = out - evaluate({carrier: torch.zeros_like(flat[:, :1])})  # its offset (zero or not: no read-back)
    return out.reshape(*rows.shape[:-1], out.shape[-1])


HEAD_FEATURES = "pooling.gathering: the features of each head of a pooled branch"
PIECE_GROUPS = "pooling.gathering: the attention groups of each piece of a branch split by token"
# a branch split by token is taken to the output in pieces of at most this many elements of its
# widest intermediate ([windows, keys, K, head features] pooled, before the tail's matrix)
PIECE_ELEMENTS = 2 ** 19


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


def _join_rows(pooling: EarlyPooling, run: BranchRun, gamma: torch.Tensor, dtype: torch.dtype) -> _JoinRows:
    spec = run.spec
    pooled_join = pooling.nodes[spec.join]
    count = pooled_join.slot_count
    batch, tokens = gamma.shape
    rows = structural(lambda: _fed_rows(run.targets), "pooling.gathering: the rows a pooled branch feeds its join by")
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


def _fed_rows(targets: torch.Tensor) -> torch.Tensor | None:
    """[R] the rows whose join row ``targets`` gives (-1: none; a row map of the shapes), None: all."""
    fed = targets >= 0
    return None if bool(fed.all()) else fed.nonzero().flatten()


def _join_sign(spec: PooledBranch) -> float:
    return additive_sign(spec.join, list(spec.join.args[:2]).index(spec.operand))


def _mapped(gm: fx.GraphModule, run: BranchRun, rows: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``rows`` [..., F] through the branch's row maps from map ``first`` on, to the join."""
    for node, carrier, inputs, kind in run.maps[first:]:
        rows = _apply_map(gm, node, carrier, inputs, kind, rows)
    return rows


def _constants(gm: fx.GraphModule, run: BranchRun, join: _JoinRows) -> tuple[list[int], torch.Tensor | None]:
    """The constant components the row maps add (ids, [c, B, K, F] at the join, signed)."""
    ids, values = [], []
    for position, component, row in run.offsets:  # a constant added before a SCALE step is scaled by it
        ids.append(component)
        totals = join.scaled if position < run.scale_at else join.totals
        values.append(_mapped(gm, run, (totals * row.to(totals.dtype)).unsqueeze(0), position + 1))
    if not values:
        return ids, None
    return ids, torch.cat(values) * join.sign


def _branch_components(gm: fx.GraphModule, pooling: EarlyPooling, run: BranchRun, gamma: torch.Tensor
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


def _head_rows_mapped(gm: fx.GraphModule, run: BranchRun, pooled: torch.Tensor) -> torch.Tensor:
    """The pooled value ``[B, K, F]`` split by head and through the row maps: ``[H, B, K, F']``.

    A first map that is a linear layer over heads laid out as equal consecutive column blocks
    (``x.transpose(1, 2).reshape(B, N, C)`` before ``proj``) takes each head's block of its weight: one
    batched product, H times smaller than the linear layer on H masked copies."""
    heads = len(run.ids)
    if run.maps and pooled.shape[-1] % heads == 0:
        node, carrier, inputs, kind = run.maps[0]
        width = pooled.shape[-1] // heads
        weight = inputs.get(node.args[1]) if kind is RowStep.MAP and node.target is F.linear and \
            has_bias_argument(node, carrier) and isinstance(node.args[1], fx.Node) else None
        if weight is not None and weight.shape[-1] == pooled.shape[-1] and structural(
                lambda: torch.equal(run.groups.cpu(), torch.arange(heads).repeat_interleave(width)),
                "pooling.gathering: whether a pooled branch's heads are consecutive column blocks"):
            per_head = torch.einsum("bkhd,ohd->hbko", pooled.unflatten(-1, (heads, width)),
                                    weight.to(pooled.dtype).unflatten(-1, (heads, width)))
            return _mapped(gm, run, per_head, first=1)
    return _masked_head_rows_mapped(gm, run, pooled)


def _masked_head_rows_mapped(gm: fx.GraphModule, run: BranchRun, pooled: torch.Tensor) -> torch.Tensor:
    """``_head_rows_mapped`` for any layout: the row maps on one masked copy of ``pooled`` per head."""
    groups = run.groups.to(pooled.device)
    return _mapped(gm, run, torch.stack([pooled * (groups == g).to(pooled.dtype) for g in range(len(run.ids))]))


def token_matrices(gm: fx.GraphModule, pooling: EarlyPooling, runs: list[BranchRun], dtype: torch.dtype,
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


@dataclass
class _SlotWeights:
    """W[n, k, h, j] = Σ_{rows r of attention n in slot k} γ(r) · A[n, h, q(r), j] of a branch split by token,
    for the attention groups ``used`` that feed the join (their ``window`` and ``image``). ``of_groups`` sums
    them for one piece's groups at a time: all of [N, K, H, Nk] would be as large as the attention weights."""

    weights: torch.Tensor    # [N, H, Nq, Nk] the attention weights
    group: torch.Tensor      # [R] attention group of each row that feeds the join
    query: torch.Tensor      # [R] its query
    gamma: torch.Tensor      # [R] its weight at the join
    slot: torch.Tensor       # [R] its slot
    used: torch.Tensor       # [n] attention groups that feed the join
    window: torch.Tensor     # [n]
    image: torch.Tensor      # [n]
    count: int               # K: slots
    keys: int                # Nk

    @classmethod
    def of(cls, pooling: EarlyPooling, run: BranchRun, join: _JoinRows) -> _SlotWeights:
        spec, weights = run.spec, run.weights                                             # [N, H, Nq, Nk]
        groups, queries, keys = weights.shape[0], weights.shape[2], weights.shape[3]
        sources = run.sources if join.rows is None else run.sources[join.rows]            # [R] n·Nq + q
        group = sources // queries
        used, image = structural(lambda: _groups_used(group, join.image, groups, spec.birth.name),
                                 "pooling.gathering: the attention groups a pooled branch feeds its join from")
        return cls(weights, group, sources % queries, join.weight, join.slot, used, used % run.windows, image,
                   pooling.nodes[spec.join].slot_count, keys)

    def of_groups(self, groups: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """[n, K, H, Nk] (or [n, K, Nk] for one ``head``) for the attention groups ``groups`` [n]."""
        local = torch.full((self.weights.shape[0],), -1, dtype=torch.long, device=groups.device)
        local[groups] = torch.arange(len(groups), device=groups.device)
        mine = local[self.group]                                                          # [R], -1: elsewhere
        rows = structural(lambda: (mine >= 0).nonzero().flatten(),
                          "pooling.gathering: the rows of one piece's attention groups")
        chosen = self.group[rows]
        per_row = (self.weights[chosen, :, self.query[rows]] if head is None
                   else self.weights[chosen, head, self.query[rows]])                     # [R', (H,) Nk]
        per_row = per_row * self.gamma[rows].view(-1, *[1] * (per_row.dim() - 1))
        # [n·(K+1), (H,) Nk] -> [n, K, (H,) Nk]: each group's weights of the keys, summed per slot
        summed = per_row.new_zeros(len(groups) * (self.count + 1), *per_row.shape[1:]).index_add_(
            0, mine[rows] * (self.count + 1) + self.slot[rows], per_row)
        return summed.view(len(groups), self.count + 1, *per_row.shape[1:])[:, :self.count]


def _groups_used(group: torch.Tensor, image: torch.Tensor, groups: int, name: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """([n] the attention groups that rows of ``group`` [R] come from, [n] the image of each (``image`` [R],
    the image of each row); from the row maps, so from the shapes only."""
    image_of = torch.full((groups,), -1, dtype=torch.long, device=group.device).scatter_(0, group, image)
    if not bool((image_of[group] == image).all()):
        raise RuntimeError(f"internal: an attention group of {name} feeds several images")
    used = (image_of >= 0).nonzero().flatten()
    return used, image_of[used]


def _head_features(head_of: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """Per head, its features (indices into the value's last axis) of a branch split by token."""
    return structural(lambda: [(head_of == h).nonzero().flatten() for h in range(heads)], HEAD_FEATURES)


def _piece_groups(window: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """The attention groups (indices into ``window`` [n]) of windows ``first`` to ``last`` - 1: one piece."""
    return structural(lambda: ((window >= first) & (window < last)).nonzero().flatten(), PIECE_GROUPS)


def _all_heads_at_once(factors: list, head_of: torch.Tensor, heads: int) -> bool:
    """Whether every head has a factor of one width and as many features (``_token_scores``)."""
    if any(f is None for f in factors) or len({tuple(f.shape) for f in factors}) != 1:
        return False
    return structural(lambda: bool((torch.bincount(head_of, minlength=heads) == head_of.numel() // heads).all()),
                      "pooling.gathering: whether every head has as many features")


def _token_scores(run: BranchRun, slots: _SlotWeights, matrix: torch.Tensor, factors: torch.Tensor, batch: int
                  ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``_token_components`` for scores, all heads in one product: ``factors`` [H, O, k] (each head's
    directions) or [H, B, O, k] (per image), pieces ``[c, B, k]`` of the ``H·S`` components in order."""
    head_of, within = run.spec.heads.to(slots.used.device), run.spec.within.to(slots.used.device)
    heads, keys, count = factors.shape[0], slots.keys, slots.count
    features = torch.stack(_head_features(head_of, heads))                               # [H, W]
    width, outputs = features.shape[1], factors.shape[-1]
    # [H, (B,) W, K·k]: each head's features through every slot's matrix and the head's (image's) directions
    order = features.flatten()
    in_order = structural(lambda: torch.equal(order, torch.arange(len(order), device=order.device)),
                          "pooling.gathering: whether the heads' features are the matrix's column order")
    by_head = matrix if in_order else matrix[:, order]
    by_head = by_head.view(count, heads, width, -1)                     # (heads in column blocks: no copy)
    if factors.dim() == 3:
        per_head = torch.einsum("khwo,hop->hwkp", by_head, factors.to(matrix)).reshape(heads, width, -1)
    else:
        per_head = torch.einsum("khwo,hbop->hbwkp", by_head, factors.to(matrix)).reshape(heads, batch, width, -1)
    gather = within[features].view(1, heads, 1, width)
    rows = keys + (width if per_head.dim() == 4 else 0)   # per image: each group's directions gathered too
    step = max(1, PIECE_ELEMENTS // (rows * count * max(outputs, 1) * batch * heads))   # windows per piece
    for first in range(0, run.windows, step):
        last = min(first + step, run.windows)
        inside = _piece_groups(slots.window, first, last)
        groups = slots.used[inside]
        own = torch.take_along_dim(run.values[groups], gather.expand(len(groups), heads, keys, width), dim=3)
        # heads lead throughout: one batched product per head, no copy of the [H, n, Nk, K, k] products
        if per_head.dim() == 3:
            own = own.transpose(0, 1).reshape(heads, -1, width)                            # [H, n·Nk, W]
            through = torch.bmm(own, per_head)
        else:  # each attention group through its image's directions: [H, n, Nk, W] @ [H, n, W, K·k]
            through = own.transpose(0, 1) @ per_head[:, slots.image[inside]]
        through = through.view(heads, len(groups), keys, count, outputs)                   # [H, n, Nk, K, k]
        weights = slots.of_groups(groups).permute(2, 0, 3, 1).unsqueeze(-2)              # [H, n, Nk, 1, K]
        reached = (weights @ through).squeeze(-2)                                           # [H, n, Nk, k]
        out = reached.new_zeros(heads, batch * (last - first), keys, outputs)
        out.index_copy_(1, slots.image[inside] * (last - first) + slots.window[inside] - first, reached)
        out = out.view(heads, batch, last - first, keys, outputs).permute(0, 2, 3, 1, 4)  # [H, w, Nk, B, k]
        ids = [i for h in range(heads) for i in run.ids[(h * run.windows + first) * keys:
                                                        (h * run.windows + last) * keys]]
        yield ids, out.reshape(-1, batch, outputs)


def _token_components(pooling: EarlyPooling, run: BranchRun, join: _JoinRows, matrix: torch.Tensor,
                      batch: int, project: OutputProjection | None = None
                      ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Components (h, s) of a branch split by token, at the output: ids and pieces ``[c, B, O]`` of
    the ``H·S`` components in order (the branch's constants are ``_constants``).

    matrix: ``[K, F, O]`` from ``token_matrices``; with ``project``, a head whose components share one factor
    [O, k] (per image [B, O, k]: each attention group through its image's) is taken straight to its scores
    (``[c, B, k]`` pieces, the matrix times the factor), the others are projected piece by piece. Source s = w·Nk + j is key j of attention group w
    (``births._split_tokens``); its component at row r (attention row n, query q) is
    A[n, h, q, j] · V[n, h, j, within] on head h's features, so pooled and at the output:

        out[(h, s), b] = Σ_{n : group w, image b} Σ_k Σ_{f of head h} W[n, k, h, j] · V[n, h, j, within(f)]
                         · matrix[k, f]
        W[n, k, h, j]  = Σ_{rows r of n in slot k} γ(r) · A[n, h, q(r), j]
    """
    slots = _SlotWeights.of(pooling, run, join)
    values, count, keys = run.values, slots.count, slots.keys
    used, window, image = slots.used, slots.window, slots.image
    head_of, within = run.spec.heads.to(used.device), run.spec.within.to(used.device)
    heads = slots.weights.shape[1]
    if project is not None:
        factors = [project.factor(run.ids[h * run.windows * keys: (h + 1) * run.windows * keys])
                   for h in range(heads)]
        if _all_heads_at_once(factors, head_of, heads):
            yield from _token_scores(run, slots, matrix, torch.stack(factors), batch)
            return
    features_of = _head_features(head_of, heads)
    for h in range(heads):
        features = features_of[h]
        own = values[used, h][..., within[features]]                                      # [n, Nk, W]
        head_matrix = matrix[:, features].reshape(-1, matrix.shape[-1])                   # [K·W, O]
        head_ids = run.ids[h * run.windows * keys: (h + 1) * run.windows * keys]
        factor = project.factor(head_ids) if project is not None else None
        if factor is not None:
            head_matrix = head_matrix @ factor.to(head_matrix)                           # [(B,) K·W, k]
        outputs, width = head_matrix.shape[-1], len(features)
        # few outputs (scores): each key's features through the matrix of every slot first, [n, Nk, K·O],
        # never the [n, Nk, K, W] pooled values
        by_slot = head_matrix.unflatten(-2, (count, width)).transpose(-3, -2).flatten(-2) \
            if outputs < width else None                                                  # [(B,) W, K·O]
        rows = keys + (width if head_matrix.dim() == 3 else 0)   # per image: each group's matrix gathered too
        step = max(1, PIECE_ELEMENTS // (rows * count * max(min(width, outputs), 1) * batch))  # windows per piece
        for first in range(0, run.windows, step):
            last = min(first + step, run.windows)
            inside = _piece_groups(window, first, last)
            slot_weights = slots.of_groups(used[inside], h).transpose(1, 2).contiguous()  # [n, Nk, K]
            if by_slot is not None:
                through = own[inside] @ _of_groups(by_slot, image[inside])
                reached = torch.einsum("njk,njko->njo", slot_weights, through.view(len(inside), keys, count, outputs))
            else:
                pooled = slot_weights.unsqueeze(-1) * own[inside].unsqueeze(2)            # [n, Nk, K, W]
                reached = pooled.flatten(2) @ _of_groups(head_matrix, image[inside])
            out = values.new_zeros(batch * (last - first), keys, outputs)                 # [B·w, Nk, O]
            out.index_copy_(0, image[inside] * (last - first) + window[inside] - first, reached)
            out = out.view(batch, last - first, keys, outputs).permute(1, 2, 0, 3)        # [w, Nk, B, O] (a view)
            ids = run.ids[(h * run.windows + first) * keys: (h * run.windows + last) * keys]
            out = out.flatten(0, 1)
            yield ids, out if project is None or factor is not None else project(ids, out)


def _of_groups(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A matrix [a, b] for every attention group, or one per image [B, a, b] taken for each group's ``image``
    [n]: [n, a, b] (a matmul broadcasts either)."""
    return matrix if matrix.dim() == 2 else matrix[image]


class OutputProjection(Protocol):
    """Scores along directions (``decompose.scoring.Projection``): components' values at the output
    [c, B, *output] -> [c, B, k]; ``factor(ids)``: one matrix [O, k] (or one per image, [B, O, k]) that does
    it for all of ``ids``, or None."""

    def __call__(self, ids: list[int], values: torch.Tensor) -> torch.Tensor: ...

    def factor(self, ids: list[int]) -> torch.Tensor | None: ...


def _cached_token_matrices(gm: fx.GraphModule, pooling: EarlyPooling, parking: Parking) -> dict:
    """``token_matrices`` of the parked branches split by token (cached per dtype and device); no list of the
    runs outlives it (each run holds its attention's weights and values, freed once it is gathered)."""
    tokens = [run for run in parking.runs.values() if run.split is Level.TOKEN]
    if not tokens:
        return {}
    dtype, device = tokens[0].weights.dtype, tokens[0].weights.device
    return pooling.cached((Level.TOKEN, dtype, str(device)), lambda: token_matrices(gm, pooling, tokens, dtype, device))


def pooled_components(gm: fx.GraphModule, pooling: EarlyPooling, parking: Parking, out: Carried,
                      project: OutputProjection | None = None) -> Carried:
    """The output's components, with those parked at ``pooling``'s nodes (and its pooled branches)
    taken to the output: pooled over tokens with this batch's weights, then through the unit tail.

    project: scores along directions: each piece (ids, values [c, B, *output]) is projected as it reaches
             the output, or earlier by its ``factor`` (only pieces of the components exist at a time)."""
    needed = set(parking.parked) | {run.spec.join for run in parking.runs.values()}
    if project is not None:
        out = Carried([c if c.ids == [PROBE] else Chunk(c.ids, project(c.ids, c.values)) for c in out.chunks])
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
    matrices = _cached_token_matrices(gm, pooling, parking)
    for birth in list(parking.runs):
        run = parking.runs.pop(birth)
        join = run.spec.join
        if run.split is not Level.TOKEN:
            run_ids, values = _branch_components(gm, pooling, run, gammas[join])
            injections.setdefault(join, []).append(pooling.arrange(join, values))
            ids.setdefault(join, []).extend(run_ids)
            continue
        rows = _join_rows(pooling, run, gammas[join], run.weights.dtype)
        for run_ids, values in _token_components(pooling, run, rows, matrices[birth], gammas[join].shape[0],
                                                 project):
            shape = pooling.cotangent.shape if project is None else values.shape[-1:]
            out.chunks.append(Chunk(run_ids, values.reshape(len(run_ids), -1, *shape)))
        constant_ids, constants = _constants(gm, run, rows)
        if constants is not None:
            injections.setdefault(join, []).append(pooling.arrange(join, constants))
            ids.setdefault(join, []).extend(constant_ids)
    if not injections:
        return out
    for node, rows in pooling.run({n: torch.cat(parts) for n, parts in injections.items()}).items():
        count = len(ids[node])  # [k·B, 1, *D] -> [k, B, *D]
        values = rows.reshape(count, rows.shape[0] // count, *rows.shape[2:])
        out.chunks.append(Chunk(ids[node], values if project is None else project(ids[node], values)))
    return out
