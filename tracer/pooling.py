"""Early pooling: an average-pooled output reached through a linear tail, run on a few tokens.

After a component joins the trunk of an average-pooled model (Swin, MaxViT, ConvNeXt) at node
``n``, the rest of its way to the output is one linear map ``L_n``: the trunk's ops with the
norm scales frozen. Carrying every component through ``L_n`` at full resolution costs a pass
of the later stages per component. But tokens enter ``L_n`` only through per-token frozen
scalars (norm scales, the pool's ``1/N``) and token merges, so

    L_n(c) = T_n(pool_n(c)),      pool_n(c)[r] = Σ_{t : slot(t) = r} γ_t · c[t]

* ``T_n``, the **unit tail**: the same trunk ops run on a small token grid, with every
  data-dependent per-token scale set to 1 (a layer norm keeps its centring and weight) and
  biases dropped (they are components of their own);
* ``slot(t)``: the small-grid token that real token ``t`` plays (its place in the patch of
  tokens that merges into one output token);
* ``γ_t``: the frozen scalars along ``t``'s path, per image, read off one adjoint
  ``∂⟨L_n(c), g⟩/∂c`` of the batch at hand (``EarlyPooling.weights``).

Each component is then reduced over tokens (one pass over its values) before the tail's
expensive ops, and the tail runs on a few tokens. Nothing here knows a model: token axes are
the axes whose size the output does not depend on, the small grid is the period of which
tokens the real tail treats alike, and the claim is verified on the probe image: for several
random cotangents, the real tail's adjoint at every token must be one multiple ``γ_t`` of the
unit tail's adjoint at its slot.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .head_axes import AttentionAxes
from .linear_rules import (
    Evaluator,
    additive_sign,
    apply_affine,
    batch_norm_scale,
    bias_free_call,
    has_bias_argument,
    is_binary_additive,
    norm_argument,
)
from .norm_scales import NormScales, fit_norm_scales
from .ops import OpKind, op_kind
from .node_calls import ReplacedCall, ValueOverlay
from .progress import progress
from .roles import Role, TrunkPlan
from .tracing import call_target, describe

# tokens are grouped by adjoint direction to this (float64) precision (1 - |cos|) to find the grid's period
PARALLEL_TOLERANCE = 1e-12
# a real token plays a small-grid token when its adjoint is a multiple of the unit tail's to this
# (float64) relative residual
MATCH_TOLERANCE = 1e-9
# at run time, the batch's adjoint must be a per-token multiple of the unit tail's to this precision
RESIDUAL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
# tokens (evenly spread) on which each batch's adjoints are checked against the unit tail's
RESIDUAL_TOKENS = 256
# an op maps every row alike when its rows agree to this precision (of the largest) however they are laid out
SAME_ROWS_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}
# tokens compared at once with the classes found so far (``token_classes``)
CLASS_BLOCK = 512
# pool with a matrix product up to this many small-grid tokens, by index above
DENSE_POOLING_SLOTS = 8

_SCALING_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div,
                     "mul", "mul_", "div", "div_"}


class TailUnavailable(Exception):
    """The unit tail cannot be run: an op on the trunk is not a per-token scaling of a linear map."""


# how a unit tail fails on a grid its ops do not accept (shape errors from the graph's own code)
_TAIL_FAILURES = (TailUnavailable, RuntimeError, ValueError, IndexError, TypeError)


class _Values(dict):
    """Node values while the unit tail runs: row 0 (the zero row) of a tail node's stack, or the
    value of a non-data node; reading any other data node is refused."""

    def __init__(self, stacks: dict):
        super().__init__()
        self.stacks = stacks

    def __missing__(self, node):
        if node in self.stacks:
            return self.stacks[node][0]
        raise TailUnavailable(f"{describe(node)} is read by the trunk after the pooling start but is not on it")


@dataclass
class _Stack:
    """Rows ``[1 + Σ counts, *shape]`` of one tail node: the zero row, then each injection's rows."""

    rows: torch.Tensor
    segments: tuple[tuple[fx.Node, int], ...]


class UnitTail:
    """The trunk from ``start`` to the decomposed node, with unit per-token scales and no biases.

    ``run`` pushes rows injected at tail nodes to the decomposed node, on any token grid the
    graph's own shape arithmetic accepts (sizes are read from the rows' zero row).
    """

    def __init__(self, gm: fx.GraphModule, plan: TrunkPlan, data_nodes: set[fx.Node], start: fx.Node):
        self.gm, self.start, self.target = gm, start, plan.target
        self.data_nodes = data_nodes
        order = {node: i for i, node in enumerate(gm.graph.nodes)}
        tail = {start}
        for node in gm.graph.nodes:
            if order[node] > order[start] and (plan.roles.get(node) is Role.TRUNK or node is plan.target) and any(
                    parent in tail for parent in node.all_input_nodes):
                tail.add(node)
        if plan.target not in tail:
            raise TailUnavailable(f"the decomposed node does not depend on {describe(start)} through the trunk")
        needed: set[fx.Node] = set()
        frontier = list(tail)
        while frontier:  # shape arithmetic and constants the tail reads
            for parent in frontier.pop().all_input_nodes:
                if parent not in tail and parent not in needed and parent not in data_nodes:
                    needed.add(parent)
                    frontier.append(parent)
        self.tail = tail
        self.nodes = [n for n in gm.graph.nodes if n in tail or n in needed]
        self.position = {node: order[node] for node in self.nodes}
        last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for parent in node.all_input_nodes:
                last_use[parent] = i
        self._frees: dict[int, list[fx.Node]] = {}
        for node, i in last_use.items():
            if node is not self.target:
                self._frees.setdefault(i, []).append(node)

    def run(self, start_shape: tuple[int, ...], injections: dict[fx.Node, torch.Tensor] | None = None, *,
            dtype: torch.dtype, device: torch.device | str,
            shapes: dict | None = None, taps: dict | None = None) -> dict[fx.Node, torch.Tensor]:
        """Rows injected at tail nodes (``{node: [rows, *shape at node]}``) pushed to the decomposed
        node: ``{node: [rows, *output shape]}``. ``start_shape``: the start node's value shape on
        the grid to use. ``shapes``, if given, receives every tail node's value shape. ``taps``
        (keys: tail nodes): each gets a zero tensor that requires grad added to all rows there, so
        that a backward pass from the output gives every row's adjoint at those nodes."""
        injections = injections or {}
        stacks: dict[fx.Node, _Stack] = {}
        values = _Values({})
        for i, node in enumerate(self.nodes):
            if node is self.start:
                stacks[node] = _Stack(torch.zeros((1, *start_shape), dtype=dtype, device=device), ())
            elif node in self.tail:
                stacks[node] = self._apply(node, stacks, values)
            elif node.op == "get_attr":
                values[node] = _attribute(self.gm, node.target)
            elif node.op == "placeholder":
                values[node] = node.args[0] if node.args else None
            else:
                args = fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
                values[node] = call_target(node, self.gm, args, kwargs)
            if node in stacks:
                values.stacks[node] = stacks[node].rows
                if shapes is not None:
                    shapes[node] = tuple(stacks[node].rows.shape[1:])
                if node in injections:
                    added = injections[node]
                    stack = stacks[node]
                    stacks[node] = _Stack(torch.cat([stack.rows, added.to(stack.rows.dtype)]),
                                          stack.segments + ((node, added.shape[0]),))
                    values.stacks[node] = stacks[node].rows
                if taps is not None and node in taps:
                    taps[node] = torch.zeros_like(stacks[node].rows, requires_grad=True)
                    stacks[node] = _Stack(stacks[node].rows + taps[node], stacks[node].segments)
                    values.stacks[node] = stacks[node].rows
            for done in self._frees.get(i, ()):
                stacks.pop(done, None)
                values.stacks.pop(done, None)
                values.pop(done, None)
        out = stacks[self.target]
        result, row = {}, 1
        for node, count in out.segments:
            result[node] = out.rows[row: row + count]
            row += count
        return result

    # --- the unit rules ------------------------------------------------------------------
    def _apply(self, node: fx.Node, stacks: dict[fx.Node, _Stack], values: _Values) -> _Stack:
        kind = op_kind(node, self.gm)
        carriers = [n for n in node.all_input_nodes if n in self.tail]
        frozen = [n for n in node.all_input_nodes if n in self.data_nodes and n not in self.tail]
        if kind == OpKind.ADDITIVE and is_binary_additive(node):
            parts = [(additive_sign(node, position), stacks[operand])
                     for position, operand in enumerate(node.args[:2]) if isinstance(operand, fx.Node)
                     and operand in self.tail]
            return self._signed_sum(parts)
        if kind == OpKind.ADDITIVE:  # cat / stack: constant pieces are zero in the linear part
            if frozen:
                raise TailUnavailable(f"{describe(node)} joins trunk values with other data")
            aligned = self._aligned([stacks[n] for n in carriers])
            pieces = _constant_pieces(node, self.tail)
            overlay = ValueOverlay(values, {p: torch.zeros_like(values[p]) for p in pieces})
            rows = Evaluator(self.gm, node, overlay).over_components(
                {n: s.rows for n, s in zip(carriers, aligned)})
            return _Stack(rows, aligned[0].segments)
        if len(carriers) != 1:
            raise TailUnavailable(f"{describe(node)} has {len(carriers)} trunk inputs")
        carrier = carriers[0]
        stack = stacks[carrier]
        if kind == OpKind.NORM:
            return _Stack(unit_norm(node, values, stack.rows), stack.segments)
        if kind == OpKind.PRODUCT and has_bias_argument(node, carrier):
            stripped, _ = bias_free_call(node)
            return _Stack(Evaluator(self.gm, stripped, values).over_components({carrier: stack.rows}),
                          stack.segments)
        if kind == OpKind.PRODUCT and frozen:
            if node.target in _SCALING_PRODUCTS and (_is_multiplication(node) or _is_first_argument(node, carrier)):
                return stack  # a frozen per-token scale: 1 on the small grid (γ holds the real one)
            raise TailUnavailable(f"{describe(node)} multiplies the trunk by frozen data")
        if kind in (OpKind.AFFINE, OpKind.PRODUCT, OpKind.UNKNOWN):
            if frozen:
                raise TailUnavailable(f"{describe(node)} reads other data besides the trunk")
            call = _zero_padding(node) if node.target is F.pad else node
            rows = Evaluator(self.gm, call, values).over_components({carrier: stack.rows})
            if not isinstance(rows, torch.Tensor):
                raise TailUnavailable(f"{describe(node)} returns {type(rows).__name__} on the trunk")
            if kind == OpKind.UNKNOWN and bool(rows[0].any()):
                rows = rows - rows[:1]  # its value at zero is a constant component, not the tail's
            return _Stack(rows, stack.segments)
        raise TailUnavailable(f"{describe(node)} ({kind.value}) is not a per-token scaling of a linear map")

    def _signed_sum(self, parts: list[tuple[float, _Stack]]) -> _Stack:
        if not parts:
            raise TailUnavailable("an addition reads the trunk outside its first two arguments")
        aligned = self._aligned([stack for _, stack in parts])
        rows = None
        for (sign, _), stack in zip(parts, aligned):
            term = stack.rows if sign == 1.0 else stack.rows * sign
            rows = term if rows is None else rows + term
        return _Stack(rows, aligned[0].segments)

    def _aligned(self, stacks: list[_Stack]) -> list[_Stack]:
        """The same rows in every stack (zero rows for injections only some of them carry)."""
        if all(stack.segments == stacks[0].segments for stack in stacks):
            return stacks
        counts = dict(segment for stack in stacks for segment in stack.segments)
        union = tuple(sorted(counts.items(), key=lambda item: self.position[item[0]]))
        start, row = {}, 1
        for node, count in union:
            start[node] = row
            row += count
        out = []
        for stack in stacks:
            rows = stack.rows.new_zeros((row, *stack.rows.shape[1:]))
            source = 1
            for node, count in stack.segments:
                rows[start[node]: start[node] + count] = stack.rows[source: source + count]
                source += count
            out.append(_Stack(rows, union))
        return out


def _is_multiplication(node: fx.Node) -> bool:
    return node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_")


def _is_first_argument(node: fx.Node, carrier: fx.Node) -> bool:
    return bool(node.args) and node.args[0] is carrier


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _constant_pieces(node: fx.Node, tail: set[fx.Node]) -> list[fx.Node]:
    pieces = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else node.args
    return [p for p in pieces if isinstance(p, fx.Node) and p not in tail]


def _zero_padding(node: fx.Node) -> ReplacedCall:
    """``F.pad`` whose linear part pads with zeros (a constant fill is an offset)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = 0.0
    elif "value" in kwargs:
        kwargs["value"] = 0.0
    return ReplacedCall(node, tuple(args), kwargs)


def unit_norm(node: fx.Node, values: dict, rows: torch.Tensor) -> torch.Tensor:
    """A norm with its data-dependent scale set to 1: centring and weight remain."""
    if node.target is F.layer_norm:
        dims = tuple(range(-len(tuple(norm_argument(node, values, "normalized_shape"))), 0))
        out = rows - rows.mean(dims, keepdim=True)
        weight = norm_argument(node, values, "weight")
        return out * weight if weight is not None else out
    if node.target is F.rms_norm:
        weight = norm_argument(node, values, "weight")
        return rows * weight if weight is not None else rows
    if node.target is F.batch_norm:  # running statistics: a fixed per-channel scale, kept
        x = norm_argument(node, values, "input")
        return rows * batch_norm_scale(node, values).reshape((-1,) + (1,) * (x.dim() - 2))
    if node.target is F.normalize:
        return rows
    raise TailUnavailable(f"{describe(node)}: its frozen scale is not one number per token")


# --- where to pool, verified ---------------------------------------------------------------

@dataclass
class PooledNode:
    """How the components of one trunk node are pooled onto the unit tail's small grid."""

    token_axes: tuple[int, ...]     # axes of the node's value that are pooled (batch axis 0 excluded)
    feature_axes: tuple[int, ...]   # the other non-batch axes
    small_shape: tuple[int, ...]    # the node's value shape on the small grid (batch axis of size 1)
    slots: torch.Tensor             # [T] small-grid token played by each real token; K if it reaches nothing
    adjoint: torch.Tensor           # [K, F] the unit tail's adjoint at each small-grid token for the cotangent

    @property
    def slot_count(self) -> int:
        return self.adjoint.shape[0]


@dataclass
class EarlyPooling:
    """Trunk nodes whose components are pooled over tokens before the rest of the trunk.

    tail:        the unit tail, run on ``start_shape`` (the start node's small-grid shape)
    nodes:       trunk node -> how its components are pooled
    cotangent:   [*output shape without batch] the direction whose adjoint gives the weights γ
    branches:    birth -> how its components are pooled inside its branch (``PooledBranch``)
    static:      node -> γ [T] on the probe image where every image's γ is that times one factor per
                 image, the same at every such node: only ``reference`` (the last of them) needs a
                 batch's adjoint (after it, the trunk holds no per-token scale; MaxViT's blocks)
    """

    tail: UnitTail
    start_shape: tuple[int, ...]
    nodes: dict[fx.Node, PooledNode]
    cotangent: torch.Tensor
    branches: dict[fx.Node, PooledBranch] = dataclasses.field(default_factory=dict)  # by birth
    static: dict[fx.Node, torch.Tensor] = dataclasses.field(default_factory=dict)
    reference: fx.Node | None = None
    norm_scales: NormScales | None = None   # γ without a backward pass, where the trunk allows
    cache: dict = dataclasses.field(default_factory=dict, repr=False)  # products of the weights (``cached``)

    def cached(self, key, compute):
        """``compute()`` once per ``key`` while the model's weights and buffers are unchanged (the unit
        tail and the row maps depend on them, never on the images)."""
        gm = self.tail.gm
        version = tuple((id(t), t._version) for t in itertools.chain(gm.parameters(), gm.buffers()))
        if self.cache.get("version") != version:
            self.cache.clear()
            self.cache["version"] = version
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def tail_matrices(self, nodes, dtype: torch.dtype, device: torch.device) -> dict[fx.Node, torch.Tensor]:
        """node -> ``[K·F, O]``: the unit tail from each of ``nodes`` as one matrix (rows: small-grid
        token and feature as in ``pooled``; O: the output's numbers per image), so ``pooled(...)``
        [k, B, K, F] reshaped to [k·B, K·F] reaches the output as one product. All from one backward
        pass of O rows through the small grid."""
        size = self.cotangent.numel()
        taps = dict.fromkeys(nodes)
        with torch.enable_grad():
            rows = torch.zeros(size, *self.start_shape, dtype=dtype, device=device)
            out = self.tail.run(self.start_shape, {self.tail.start: rows}, dtype=dtype, device=device,
                                taps=taps)[self.tail.start]                         # [O, 1, *output shape[1:]]
            missing = [describe(n) for n, tap in taps.items() if tap is None]
            if missing:
                raise TailUnavailable(f"not on the unit tail: {', '.join(missing)}")
            units = torch.eye(size, dtype=dtype, device=device).reshape(out.shape)
            grads = torch.autograd.grad(out, list(taps.values()), units, allow_unused=True)
        matrices = {}
        for node, grad in zip(taps, grads):  # grad [1 + O, *small shape]: row 1 + o is output o's adjoint
            pooled = self.nodes[node]
            grad = grad[1:].detach() if grad is not None else taps[node].new_zeros(taps[node].shape)[1:]
            tokens = _token_major(grad, pooled.token_axes, pooled.feature_axes, leading=1)   # [O, 1, K, F]
            matrices[node] = tokens.reshape(size, -1).T.contiguous()
        return matrices

    def static_weights(self, node: fx.Node, reference_weights: torch.Tensor) -> torch.Tensor:
        """γ [B, T] at a ``static`` node from the batch's γ at ``reference`` [B, T_reference]."""
        shape = self.static[self.reference]
        scale = (reference_weights @ shape) / (shape @ shape)                  # [B] one factor per image
        return scale.unsqueeze(1) * self.static[node].to(scale.dtype)

    def weights(self, node: fx.Node, adjoint: torch.Tensor) -> torch.Tensor:
        """γ [B, T] from ``adjoint`` [B, *value shape[1:]] = ∂⟨output, cotangent⟩/∂value at ``node``.

        Each token's adjoint is projected on the unit tail's at its slot; on a spread of tokens the
        rest must vanish (a batch that broke the structure found on the probe image raises).
        """
        pooled = self.nodes[node]
        real = self.tokens(node, adjoint)                                                   # [B, T, F]
        unit = pooled.adjoint.to(real.dtype)                                                # [K, F]
        squared = (unit * unit).sum(-1, keepdim=True)
        dual = unit / torch.where(squared > 0, squared, torch.ones_like(squared))          # [K, F]
        slots = pooled.slots.to(real.device)
        gamma = (real * torch.cat([dual, dual.new_zeros(1, dual.shape[1])])[slots]).sum(-1)  # [B, T]
        spread = torch.arange(0, real.shape[1], max(1, real.shape[1] // RESIDUAL_TOKENS), device=real.device)
        sample = real[:, spread]
        unit_rows = torch.cat([unit, unit.new_zeros(1, unit.shape[1])])[slots[spread]]
        residual = (sample - gamma[:, spread].unsqueeze(-1) * unit_rows).norm()
        tolerance = RESIDUAL_TOLERANCE.get(real.dtype, 1e-3)
        if float(residual) > tolerance * float(sample.norm()):
            raise RuntimeError(
                f"early pooling at {describe(node)}: for this batch the trunk after it is not a per-token "
                f"multiple of the unit tail found on the probe image (relative residual "
                f"{float(residual / sample.norm().clamp_min(1e-30)):.1e}); decompose with prune=False")
        return gamma

    def tokens(self, node: fx.Node, values: torch.Tensor) -> torch.Tensor:
        """``values`` [B, *value shape[1:]] at ``node`` -> [B, T, F] (the token-major layout of γ)."""
        pooled = self.nodes[node]
        return _token_major(values, pooled.token_axes, pooled.feature_axes, leading=0)

    def weights_key(self, node: fx.Node, adjoint: torch.Tensor) -> tuple:
        """Equal for two nodes exactly when ``weights`` gives the same for them: the same slots and unit
        adjoints (shared by ``_shared_layouts``) and the adjoint read token-major from the same memory."""
        pooled, tokens = self.nodes[node], self.tokens(node, adjoint)
        return id(pooled.slots), id(pooled.adjoint), tokens.data_ptr(), tuple(tokens.shape), tokens.stride()

    def pool(self, node: fx.Node, values: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Components ``values`` [k, B, *value shape[1:]] pooled: [k·B, *small shape] for ``run``."""
        return self.arrange(node, self.pooled(node, values, gamma))

    def pooled(self, node: fx.Node, values: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Components ``values`` [k, B, *value shape[1:]] pooled over tokens: [k, B, K, F]."""
        pooled = self.nodes[node]
        tokens = _token_major(values, pooled.token_axes, pooled.feature_axes, leading=1)    # [k, B, T, F]
        k, batch, _, features = tokens.shape
        count = pooled.slot_count
        slots = pooled.slots.to(tokens.device)
        if count <= DENSE_POOLING_SLOTS:                                      # [B, K, T] weights
            weights = gamma.new_zeros(batch, count + 1, gamma.shape[1])
            weights.scatter_(1, slots.expand(batch, -1).unsqueeze(1), gamma.unsqueeze(1))
            out = torch.matmul(weights[:, :count].to(tokens.dtype), tokens)  # [k, B, K, F]
        elif k == 1:  # one sparse product over all images' tokens
            segment = (torch.arange(batch, device=slots.device).unsqueeze(1) * (count + 1) + slots).flatten()
            out = weighted_segment_sum(tokens.reshape(batch * tokens.shape[2], features), segment,
                                       gamma.flatten(), batch * (count + 1))
            out = out.view(1, batch, count + 1, features)[:, :, :count]
        else:
            out = tokens.new_zeros(k, batch, count + 1, features)
            out.index_add_(2, slots, tokens * gamma.to(tokens.dtype).unsqueeze(-1))
            out = out[:, :, :count]
        return out

    def arrange(self, node: fx.Node, pooled_values: torch.Tensor) -> torch.Tensor:
        """Pooled components ``[k, B, K, F]`` laid out on the small grid: ``[k·B, *small shape]``."""
        pooled = self.nodes[node]
        k, batch = pooled_values.shape[:2]
        small = pooled.small_shape
        grid = [small[a] for a in pooled.token_axes] + [small[a] for a in pooled.feature_axes]
        out = pooled_values.reshape(k * batch, 1, *grid)                      # batch, tokens, features
        order = [0, 1] + [a + 1 for a in pooled.token_axes] + [a + 1 for a in pooled.feature_axes]
        return out.permute(_inverse(order))

    def run(self, injections: dict[fx.Node, torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
        """Pooled rows (from ``pool``) through the unit tail: ``{node: [rows, 1, *output shape[1:]]}``."""
        first = next(iter(injections.values()))
        return self.tail.run(self.start_shape, injections, dtype=first.dtype, device=first.device)


def weighted_segment_sum(values: torch.Tensor, segment: torch.Tensor, weight: torch.Tensor, count: int
                         ) -> torch.Tensor:
    """``[count, F]``: Σ weight[r] · values[r] over the rows r of each segment (``values`` [R, F],
    ``segment`` and ``weight`` [R]), as one sparse (CSR) product: no scaled copy of ``values``, no
    ``index_add_`` (about 5x faster on CPU)."""
    order = torch.argsort(segment)
    rows = torch.zeros(count + 1, dtype=torch.long, device=segment.device)
    rows[1:] = torch.bincount(segment, minlength=count).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        matrix = torch.sparse_csr_tensor(rows, order, weight[order].to(values.dtype), size=(count, values.shape[0]))
        return matrix @ values


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return inverse


def _token_major(values: torch.Tensor, token_axes: tuple[int, ...], feature_axes: tuple[int, ...],
                 leading: int) -> torch.Tensor:
    """``[*lead, B, *shape]`` -> ``[*lead, B, T, F]`` (token axes, then feature axes, flattened)."""
    token = [leading + a for a in token_axes]
    feature = [leading + a for a in feature_axes]
    permuted = values.permute(list(range(leading + 1)) + token + feature)
    return permuted.reshape(*values.shape[:leading + 1], math.prod(values.shape[a] for a in token),
                            math.prod(values.shape[a] for a in feature))


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
    first = _token_major(small[:1], token_axes, feature_axes, 0)[0]                          # [K, F]
    return PooledNode(token_axes, feature_axes, small_shape, slots, first)


def _by_token(adjoints: torch.Tensor, token_axes: tuple[int, ...], feature_axes: tuple[int, ...]) -> torch.Tensor:
    """Adjoints for G cotangents ``[G, *shape[1:]]`` -> ``[T, G*F]``: per token, all its adjoints."""
    return _token_major(adjoints, token_axes, feature_axes, 0).transpose(0, 1).flatten(1)


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
    except _TAIL_FAILURES:
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
        except _TAIL_FAILURES:
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
        except _TAIL_FAILURES:
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


# --- branches pooled before their output projection ---------------------------------------

MOVE, MAP, SCALE = "move", "map", "scale"


@dataclass
class PooledBranch:
    """A branch whose components are pooled inside the branch, from real values.

    From ``node`` on, the branch only moves whole rows (window reverse, roll, crop: ``MOVE``) or
    maps every row alike (projection, layer scale: ``MAP``), and the join's pooling only sums
    rows, so pooling commutes with the rest of the branch: the real value is pooled once and the
    row maps run on the small grid. No per-component tensor of full size is made:

    * one component (level ``branch``, an MLP): the pooled real value at the join's operand, minus
      the pooled constant components (biases) the row maps add;
    * heads (level ``head``): where the heads have been merged into the feature axis, head h's
      component is the real value at ``node`` with the other heads' features zeroed (``heads``);
    * (head, source token) (level ``token``): where moreover every row of ``node`` is one (attention
      row, query) of the birth, component (h, s) is pooled straight from the attention weights and
      values (``decompose.early_pooling``), never at full size.

    node:      where the branch's rows start to be only moved or mapped (features last)
    join:      the pooled trunk node the branch joins
    heads:     [F] head of each feature of ``node``'s value, None if heads are not whole columns there
    within:    [F] index of each feature within its head (the birth's last axis), None unless every
               row of ``node`` is one (attention row, query) of the birth (the token-level split)
    prefix:    the branch from its birth to ``node`` (ops that only rearrange the birth's elements)
    steps:     the ops from ``node`` to the join's branch operand, each ``MOVE``, ``MAP`` or ``SCALE``
               (a norm over the features: its unit part is a row map, its frozen per-row scale joins
               the pooling weights; at most one, with only row maps after it: SwinV2's post-norm)
    skipped:   the branch's nodes from its birth to that operand (no components computed there)
    row_targets: per value shape at ``node``, the join's row each of its rows feeds (cached)
    """

    birth: fx.Node
    kind: str                       # the birth's kind ("attention", "branch")
    node: fx.Node
    join: fx.Node
    heads: torch.Tensor | None
    steps: list[tuple[fx.Node, str]]
    skipped: set[fx.Node]
    # value shape at ``node`` -> [rows of ``node``'s value] the join's row each feeds (-1: none); the
    # moves depend on shapes only, so each batch size pushes a row code through them once
    row_targets: dict[tuple[int, ...], torch.Tensor] = dataclasses.field(default_factory=dict)
    within: torch.Tensor | None = None
    prefix: list[fx.Node] = dataclasses.field(default_factory=list)
    # birth value shape -> [rows of ``node``'s value] the birth's (attention row · Nq + query) of each (cached)
    source_rows: dict[tuple[int, ...], torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def operand(self) -> fx.Node:
        return self.steps[-1][0]


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
    if SCALE in kinds and (kinds.count(SCALE) > 1 or MOVE in kinds[kinds.index(SCALE):]):
        return None  # a row's scale is read where its rows are the join's: only row maps after it
    node = chain[len(chain) - 1 - len(steps)]
    prefix = chain[: chain.index(node) + 1]
    if not _without_offsets(gm, prefix, values):
        return None  # a constant added before ``node`` would be a component of its own
    kind = plan.births[birth].kind
    axes = plan.births[birth].axes
    heads = _head_features(gm, prefix, values, axes) if kind == "attention" and axes is not None else None
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
        return SCALE if row_scale(gm, op, source, values) is not None else None
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
        return MOVE
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
        return MAP
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
    except _TAIL_FAILURES:
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
