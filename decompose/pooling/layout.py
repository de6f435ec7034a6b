"""The records of an early pooling: how each trunk node's components are pooled onto the small grid
(``PooledNode``), the whole plan with its per-batch weights (``EarlyPooling``), and the branches pooled
inside the branch (``PooledBranch`` and its row steps)."""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import fx

from tracer.recording import check, is_recording
from tracer.tracing import describe
from tracer.vocabulary import ComponentKind, Vocabulary

from .norm_scales import NormScales
from .unit_tail import TailUnavailable, UnitTail

# at run time, the batch's adjoint must be a per-token multiple of the unit tail's to this precision
RESIDUAL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}
# tokens (evenly spread) on which each batch's adjoints are checked against the unit tail's
RESIDUAL_TOKENS = 256
# pool with a matrix product up to this many small-grid tokens, by index above
DENSE_POOLING_SLOTS = 8


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
            tokens = token_major(grad, pooled.token_axes, pooled.feature_axes, leading=1)   # [O, 1, K, F]
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
        check(lambda: _check_per_token_multiple(node, real, gamma, unit, slots), "early pooling's per-token multiple")
        return gamma

    def tokens(self, node: fx.Node, values: torch.Tensor) -> torch.Tensor:
        """``values`` [B, *value shape[1:]] at ``node`` -> [B, T, F] (the token-major layout of γ)."""
        pooled = self.nodes[node]
        return token_major(values, pooled.token_axes, pooled.feature_axes, leading=0)

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
        tokens = token_major(values, pooled.token_axes, pooled.feature_axes, leading=1)    # [k, B, T, F]
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


def _check_per_token_multiple(node: fx.Node, real: torch.Tensor, gamma: torch.Tensor, unit: torch.Tensor,
                              slots: torch.Tensor) -> None:
    """Raise unless a spread of the batch's token adjoints ``real`` [B, T, F] are ``gamma`` [B, T] times the
    unit tail's ``unit`` [K, F] at their ``slots`` [T] (a batch that broke the structure found on the probe)."""
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


def weighted_segment_sum(values: torch.Tensor, segment: torch.Tensor, weight: torch.Tensor, count: int
                         ) -> torch.Tensor:
    """``[count, F]``: Σ weight[r] · values[r] over the rows r of each segment (``values`` [R, F],
    ``segment`` and ``weight`` [R]), as one sparse (CSR) product: no scaled copy of ``values``, no
    ``index_add_`` (about 5x faster on CPU). While recording a graph (``decompose.compiled``): ``index_add_``
    (torch's tracer takes no sparse tensors, and the CSR rows are a read-back)."""
    if is_recording():
        return values.new_zeros(count, values.shape[1]).index_add_(0, segment, values * weight.to(values).unsqueeze(1))
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


def token_major(values: torch.Tensor, token_axes: tuple[int, ...], feature_axes: tuple[int, ...],
                 leading: int) -> torch.Tensor:
    """``[*lead, B, *shape]`` -> ``[*lead, B, T, F]`` (token axes, then feature axes, flattened)."""
    token = [leading + a for a in token_axes]
    feature = [leading + a for a in feature_axes]
    permuted = values.permute(list(range(leading + 1)) + token + feature)
    return permuted.reshape(*values.shape[:leading + 1], math.prod(values.shape[a] for a in token),
                            math.prod(values.shape[a] for a in feature))


class RowStep(Vocabulary):
    """What one op of a pooled branch does to the rows after the pooled node."""

    MOVE = "move"     # moves whole rows (window reverse, roll, crop)
    MAP = "map"       # maps every row alike (projection, layer scale)
    SCALE = "scale"   # a norm over the features: a row map times a frozen per-row scale


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
    """

    birth: fx.Node
    kind: ComponentKind             # the birth's kind (ATTENTION or BRANCH)
    node: fx.Node
    join: fx.Node
    heads: torch.Tensor | None
    steps: list[tuple[fx.Node, RowStep]]
    skipped: set[fx.Node]
    within: torch.Tensor | None = None
    prefix: list[fx.Node] = dataclasses.field(default_factory=list)

    @property
    def operand(self) -> fx.Node:
        return self.steps[-1][0]


def chain_input(spec: PooledBranch, node: fx.Node) -> fx.Node:
    """The input of ``node``, one of ``spec``'s steps, along the branch."""
    previous = spec.node
    for step, _ in spec.steps:
        if step is node:
            return previous
        previous = step
    raise KeyError(node.name)
