"""Pooling inside a branch: finding a branch whose rows, after some node, are only moved or mapped
alike (``plan_pooled_branch``), and the row maps and scales it applies on the small grid."""
from __future__ import annotations

import itertools
import math

import torch
from torch import fx

from tracer.head_axes import AttentionAxes
from tracer.linear_rules import (
    Evaluator,
    apply_affine,
    is_binary_additive,
    norm_argument,
)
from tracer.ops import OpKind, op_kind
from tracer.roles import Role, TrunkPlan
from tracer.vocabulary import ComponentKind

from .layout import EarlyPooling, PooledBranch, RowStep
from .unit_tail import TAIL_FAILURES, unit_norm

# an op maps every row alike when its rows agree to this precision (of the largest) however they are laid out
SAME_ROWS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


def branch_chain(plan: TrunkPlan, birth: fx.Node) -> list[fx.Node] | None:
    """The branch from ``birth`` to its join's operand, if it is a single chain of ops."""
    join = plan.births[birth].join
    chain, current = [birth], birth
    while True:
        users = [u for u in current.users if u is join or (plan.roles.get(u) is Role.CARRY
                                                           and plan.branch_of.get(u) is join)]
        if len(users) != 1:
            return None
        if users[0] is join:
            return chain
        chain.append(users[0])
        current = users[0]


def plan_pooled_branch(gm: fx.GraphModule, plan: TrunkPlan, pooling: EarlyPooling, birth: fx.Node,
                       values: dict, data_nodes: set[fx.Node]) -> PooledBranch | None:
    """How to pool ``birth``'s components inside its branch, verified on the probe ``values``."""
    join = plan.births[birth].join
    pooled = pooling.nodes.get(join)
    value = values[birth]
    if pooled is None or not isinstance(value, torch.Tensor) or value.dim() < 3:
        return None
    rank = len(pooled.small_shape)
    if pooled.feature_axes != (rank - 1,) or pooled.token_axes != tuple(range(1, rank - 1)):
        return None  # the join's rows must be (image, token) with features last
    chain = branch_chain(plan, birth)
    if chain is None or len(chain) < 2 or values[chain[-1]].shape != values[join].shape:
        return None
    steps: list[tuple[fx.Node, str]] = []
    for index in range(len(chain) - 1, 0, -1):
        step = _row_step(gm, chain[index], chain[index - 1], values, data_nodes)
        if step is None:
            break
        steps.insert(0, (chain[index], step))
    if not steps or not is_binary_additive(join) or chain[-1] not in join.args[:2]:
        return None
    kinds = [kind for _, kind in steps]
    if RowStep.SCALE in kinds and (kinds.count(RowStep.SCALE) > 1 or RowStep.MOVE in kinds[kinds.index(RowStep.SCALE):]):
        return None  # a row's scale is read where its rows are the join's: only row maps after it
    node = chain[len(chain) - 1 - len(steps)]
    prefix = chain[: chain.index(node) + 1]
    if not _without_offsets(gm, prefix, values):
        return None  # a constant added before ``node`` would be a component of its own
    kind = plan.births[birth].kind
    axes = plan.births[birth].axes
    heads = _head_features(gm, prefix, values, axes) if kind is ComponentKind.ATTENTION and axes is not None else None
    within = _head_columns(gm, prefix, values, heads) if heads is not None and axes.plain else None
    return PooledBranch(birth, kind, node, join, heads, steps, set(chain), within=within, prefix=prefix)


def _without_offsets(gm: fx.GraphModule, chain: list[fx.Node], values: dict) -> bool:
    """Whether the ops of ``chain`` after its first node are linear (zero at zero)."""
    for previous, op in itertools.pairwise(chain):
        try:
            at_zero = Evaluator(gm, op, values)({previous: torch.zeros_like(values[previous])})
        except Exception:
            return False
        if not isinstance(at_zero, torch.Tensor) or bool(at_zero.any()):
            return False
    return True


def _head_features(gm: fx.GraphModule, chain: list[fx.Node], values: dict, axes: AttentionAxes
                   ) -> torch.Tensor | None:
    """[F] head of each feature of the last node of ``chain``, if the birth (first) has heads, the ops
    from it only rearrange elements and every head ends up in whole feature columns."""
    birth = chain[0]
    value = values[birth]
    if not axes.splits_heads(value.shape):  # one unnamed component, as ``births.split_birth`` makes it
        return None
    head_code = (axes.head_index(value.shape, value.device) + 1).to(value.dtype).expand(value.shape)
    code, real = head_code, value
    for previous, op in itertools.pairwise(chain):
        evaluate = Evaluator(gm, op, values)
        try:
            at_zero = evaluate({previous: torch.zeros_like(real)})
            code, real = evaluate({previous: code}), evaluate({previous: real})
        except Exception:
            return None
        if not isinstance(code, torch.Tensor) or bool(at_zero.any()):
            return None
    rows = code.reshape(-1, code.shape[-1])
    if rows.shape[0] == 0 or not bool((rows == rows[:1]).all()) or not bool((rows[0] == rows[0].round()).all()):
        return None
    heads = rows[0].long() - 1
    if set(heads.tolist()) != set(range(int(head_code.max()))):  # every head, in whole columns
        return None
    expected = values[chain[-1]]  # the real value is the pushed birth value
    if expected.shape != real.shape or not torch.equal(real, expected):
        return None
    return heads


def source_row_code(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """For a birth value [N, *heads, Nq, d]: n·Nq + q + 1 at every element (float64, exact)."""
    rows, queries = shape[0], shape[-2]
    code = torch.arange(rows * queries, dtype=torch.float64, device=device) + 1
    view = [rows] + [1] * (len(shape) - 3) + [queries, 1]
    return code.reshape(view).expand(shape)


def pushed(gm: fx.GraphModule, chain: list[fx.Node], values: dict, code: torch.Tensor) -> torch.Tensor:
    """``code`` in place of the value of ``chain[0]``, through the rest of ``chain``."""
    for previous, op in itertools.pairwise(chain):
        code = Evaluator(gm, op, values)({previous: code})
    return code


def _head_columns(gm: fx.GraphModule, chain: list[fx.Node], values: dict, heads: torch.Tensor
                  ) -> torch.Tensor | None:
    """[F] index within its head of each feature at the last node of ``chain``, if every row there is one
    (attention row n, query q) of the birth ``chain[0]`` [N, *heads, Nq, d]: checked exactly, the real
    value at row r, feature f is the birth's element (n(r), heads[f], q(r), within[f])."""
    birth, last = values[chain[0]], values[chain[-1]]
    if birth.dim() < 3 or birth.numel() >= 2 ** 52 or last.dim() < 2:
        return None
    rows, queries, width = birth.shape[0], birth.shape[-2], birth.shape[-1]
    columns = (torch.arange(width, dtype=torch.float64, device=birth.device) + 1).expand(birth.shape)
    try:
        source, within = (pushed(gm, chain, values, code.contiguous()) for code in
                          (source_row_code(tuple(birth.shape), birth.device), columns))
    except Exception:
        return None
    if not isinstance(source, torch.Tensor) or source.shape != last.shape or within.shape != last.shape:
        return None
    source, within = source.reshape(-1, last.shape[-1]), within.reshape(-1, last.shape[-1])
    if not (bool((source == source[:, :1]).all()) and bool((within == within[:1]).all())
            and bool((source >= 1).all()) and bool((within >= 1).all())):
        return None
    source, within = source[:, 0].long() - 1, within[0].long() - 1
    by_head = birth.reshape(rows, -1, queries, width)                           # [N, H, Nq, d]
    n, q = (source // queries).unsqueeze(1), (source % queries).unsqueeze(1)
    expected = by_head[n, heads.unsqueeze(0), q, within.unsqueeze(0)]          # [R, F]
    return within if torch.equal(expected, last.reshape(expected.shape)) else None


def _row_step(gm: fx.GraphModule, op: fx.Node, source: fx.Node, values: dict,
              data_nodes: set[fx.Node]) -> str | None:
    """``MOVE`` if ``op`` moves whole rows of ``source`` (features last), ``MAP`` if it maps every
    row alike (rows kept in place), ``SCALE`` if it is a norm whose linear part is a per-row scale
    times a row map (``row_scale``), else None; checked on random tensors of the probe's shapes."""
    x, y = values.get(source), values.get(op)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() < 2 or y.dim() < 2:
        return None
    kind = op_kind(op, gm)
    if kind == OpKind.NORM:
        return RowStep.SCALE if row_scale(gm, op, source, values) is not None else None
    if kind not in (OpKind.AFFINE, OpKind.PRODUCT, OpKind.UNKNOWN):
        return None
    if [n for n in op.all_input_nodes if n in data_nodes and n is not source]:
        return None
    evaluate = Evaluator(gm, op, values)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float64, device="cpu").to(x)
    try:
        out = evaluate({source: noise})
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        return None
    width = x.shape[-1]
    if kind != OpKind.PRODUCT and y.shape[-1] == width and _moves_rows(evaluate, source, noise, out):
        return RowStep.MOVE
    if y.shape[:-1] != x.shape[:-1]:
        return None
    rows = noise.reshape(1, -1, width)
    try:  # every row alike: the same rows with the leading axes flattened, and one row alone
        flat_out = evaluate({source: rows})
        first = evaluate({source: rows[:, :1]})
    except Exception:
        return None
    if not isinstance(flat_out, torch.Tensor) or flat_out.numel() != out.numel():
        return None
    out_rows = out.reshape(-1, y.shape[-1])
    tolerance = SAME_ROWS_TOLERANCE.get(out.dtype, 1e-3) * float(out_rows.abs().max().clamp_min(1e-30))
    if (torch.allclose(flat_out.reshape(out_rows.shape), out_rows, rtol=0, atol=tolerance)
            and torch.allclose(first.reshape(-1), out_rows[0], rtol=0, atol=tolerance)):
        return RowStep.MAP
    return None


def row_scale(gm: fx.GraphModule, norm: fx.Node, source: fx.Node, values: dict,
              checked: bool = True, offsets: list | None = None) -> torch.Tensor | None:
    """[*rows] the frozen scale of each row where a norm's linear part is that scale times its unit
    part (``unit_norm``), as a layer or RMS norm over the features; None if it is not (a group norm).
    ``checked=False`` skips the check on a second row (a plan already checked this norm).
    ``offsets``, if given, receives the norm's offsets (its bias: ``Offset``s) from the same evaluation."""
    x = values.get(source)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or norm_argument(norm, values, "input") is not x:
        return None
    generator = torch.Generator().manual_seed(1)
    probes = torch.randn(2 if checked else 1, x.shape[-1], generator=generator, dtype=torch.float64,
                         device="cpu").to(x)
    try:
        evaluated = [apply_affine(gm, norm, OpKind.NORM, values, source, p.expand(1, *x.shape)) for p in probes]
        frozen = [out[0] for out, _ in evaluated]                                       # [*rows, F] each
        unit = [unit_norm(norm, values, p) for p in probes]                             # [F] each
    except TAIL_FAILURES:
        return None
    if offsets is not None:
        offsets.extend(evaluated[0][1])
    first = unit[0].reshape(-1)
    scale = (frozen[0].reshape(-1, first.shape[0]) @ first) / (first @ first).clamp_min(torch.finfo(first.dtype).tiny)
    if not checked:
        return scale.reshape(x.shape[:-1])
    expected = scale.unsqueeze(1) * unit[1].reshape(1, -1)
    second = frozen[1].reshape(expected.shape)
    tolerance = SAME_ROWS_TOLERANCE.get(x.dtype, 1e-3) * float(second.abs().max().clamp_min(1e-30))
    if not torch.allclose(second, expected, rtol=0, atol=tolerance):
        return None
    return scale.reshape(x.shape[:-1])


def _moves_rows(evaluate: Evaluator, source: fx.Node, noise: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the op's output rows are input rows (or zero), found by pushing a row code through it."""
    width = noise.shape[-1]
    rows = math.prod(noise.shape[:-1])
    if rows >= 2 / torch.finfo(noise.dtype).eps:
        return False  # row numbers would not be exact in this dtype
    code = torch.arange(rows, dtype=noise.dtype, device=noise.device) + 1
    code = code.reshape(*noise.shape[:-1], 1).expand(noise.shape)
    try:
        moved = evaluate({source: code.contiguous()})
    except Exception:
        return False
    if not isinstance(moved, torch.Tensor) or moved.shape != out.shape:
        return False
    moved = moved.reshape(-1, width)
    index = moved[:, 0]
    if not (bool((moved == moved[:, :1]).all()) and bool((index == index.round()).all())
            and bool(((index >= 0) & (index <= rows)).all())):
        return False
    index = index.long() - 1
    flat = noise.reshape(-1, width)
    gathered = torch.where(index.unsqueeze(1) >= 0, flat[index.clamp_min(0)], torch.zeros_like(moved))
    return torch.equal(out.reshape(-1, width), gathered)  # exact: no constant is added either
