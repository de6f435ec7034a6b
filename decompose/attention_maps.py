"""Attention weights of the queries the output reads, per attention layer, with key positions.

The baseline for token heatmaps (raw attention of the output-reading query) needs the
attention weights, which fused attention (``F.scaled_dot_product_attention``) and
``nn.MultiheadAttention`` never expose. They are recomputed here from the real inputs of
every attention birth of the traced graph, exactly as the decomposition splits attention
(``tracer.attention``), and reduced at once to what the output reads:

* **which queries**: the rows of the attention output that reach the representation
  directly (the class-token row of a class-token model, every token of an average-pooled
  one), found by the decomposer's relevance pass, never from names;
* **which keys**: every source of the birth, numbered like the token-level components
  (``window * Nk + key`` for windowed attention) with their image positions.

``AttentionMap.weights`` [B, heads, S] is the mean over the relevant queries of one image of
the attention each source receives (a distribution over the S sources per image and head).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from tracer.attention import mha_arguments, mha_parts, sdpa_arguments, sdpa_weights
from tracer.graph_runner import GraphRunner
from tracer.head_axes import AttentionAxes, RowLayout
from tracer.node_calls import node_arguments
from tracer.ops import OpKind, is_multihead_attention, op_kind
from tracer.roles import TrunkPlan
from tracer.vocabulary import ComponentKind

from .decomposer import Decomposer, relevance_masks
from .run_plan import RunPlan

Position = tuple[int, int] | str | None


@dataclass
class AttentionMap:
    """One attention layer seen from the output.

    name, layer, node: the attention branch (as in its components' labels)
    weights:   [B, heads, S] mean attention of the relevant queries to each source
    positions: S source positions: ``(row, col)`` in the layer's patch grid, or the
               parameter that made the token (``cls_token`` ...), ``"padding"``, None
    queries:   relevant query rows per image and head (summed over windows; the most of any head)
    """

    name: str
    layer: int | None
    node: str
    weights: torch.Tensor
    positions: list[Position]
    queries: int


class AttentionMapCapture:
    """``capture(images) -> list[AttentionMap]`` in graph order, for a ``Decomposer``.

    The relevant queries and key positions are found once per input signature (one
    relevance pass and one position pass on the decomposer's probe image).
    """

    def __init__(self, decomposer: Decomposer):
        self.decomposer = decomposer
        self._relevant: dict[int, tuple[RunPlan, dict[fx.Node, torch.Tensor]]] = {}

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.decomposer.graph_module

    def relevant_queries(self, plan: RunPlan) -> dict[fx.Node, torch.Tensor]:
        """Attention birth -> bool [rows, *heads, Nq] of the probe image: query rows reaching the output."""
        cached = self._relevant.get(id(plan))
        if cached is not None and cached[0] is plan:
            return cached[1]
        gm = self.graph_module
        masks = relevance_masks(gm, plan, plan.probe_image)
        relevant = {}
        for node, birth in plan.births.items():
            if birth.kind is not ComponentKind.ATTENTION:
                continue
            found = _query_relevance(gm, node, masks)
            if found is not None and bool(found.any()):
                relevant[node] = found
        self._relevant[id(plan)] = (plan, relevant)
        return relevant

    def key_positions(self, plan: RunPlan) -> dict[fx.Node, list[Position]]:
        return self.decomposer.key_positions(plan)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[AttentionMap]:
        """Attention maps of every attention layer that reaches the output directly, for ``images`` [B, C, H, W]."""
        plan = self.decomposer.plan(images)
        relevant = self.relevant_queries(plan)
        positions = self.key_positions(plan)
        batch = images.shape[0]
        reduced_maps = _read_attention(self.graph_module, plan, images, relevant,
                                       lambda node, weights, mask: _mean_over_relevant(
                                           weights, mask, batch, _axes_of(plan, node, weights, batch)))
        maps = []
        for node, (reduced, queries) in reduced_maps.items():
            birth = plan.births[node]
            sources = positions.get(node) or [None] * reduced.shape[-1]
            if len(sources) != reduced.shape[-1]:
                raise RuntimeError(f"internal: {len(sources)} key positions for {reduced.shape[-1]} sources "
                                   f"at attention node {node.name!r} ({birth.name})")
            maps.append(AttentionMap(birth.name, birth.layer, node.name, reduced, list(sources), queries))
        return maps


def attention_maps(decomposer: Decomposer, images: torch.Tensor) -> list[AttentionMap]:
    """Per attention layer reaching the output, ``AttentionMap.weights`` [B, heads, S] (see module doc)."""
    return AttentionMapCapture(decomposer)(images)


def _query_relevance(gm: fx.GraphModule, node: fx.Node, masks: dict) -> torch.Tensor | None:
    """bool [rows, *heads, Nq] (weights' layout without the key axis) from the birth's relevance mask."""
    if is_multihead_attention(node, gm):  # output (out, weights): the mask lives on the getitem user
        mha = gm.get_submodule(node.target)
        mask = next((masks[user] for user in node.users if user in masks and user.args[1:] == (0,)), None)
        if mask is None:
            return None
        rows = mask.any(-1)                                   # [L, N] or [N, L] when batch_first
        rows = rows if mha.batch_first else rows.transpose(0, 1)
        return rows.unsqueeze(1).expand(rows.shape[0], mha.num_heads, rows.shape[1])
    mask = masks.get(node)
    if mask is None:
        return None
    return mask.any(-1)                                       # output [..., Nq, d] -> [..., Nq]


def _attention_weights(gm: fx.GraphModule, node: fx.Node, real: dict) -> torch.Tensor:
    """Attention weights [..., Nq, Nk] of the attention birth ``node`` from its real inputs."""
    args, kwargs = node_arguments(node, real)
    if is_multihead_attention(node, gm):
        return mha_parts(gm.get_submodule(node.target), **mha_arguments(args, kwargs)).weights
    if op_kind(node, gm) == OpKind.ATTENTION and node.target is F.scaled_dot_product_attention:
        return sdpa_weights(**sdpa_arguments(args, kwargs))
    return args[0]  # weights @ values


class _AttentionReading(GraphRunner):
    """A real forward pass that stops once every wanted attention birth was read."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, wanted: dict[fx.Node, torch.Tensor],
                 reduce: Callable[[fx.Node, torch.Tensor, torch.Tensor], Any]):
        super().__init__(gm, images)
        self.wanted, self.reduce = wanted, reduce
        self.found: dict[fx.Node, Any] = {}

    def step(self, node: fx.Node) -> None:
        if node in self.wanted:
            self.found[node] = self.reduce(node, _attention_weights(self.gm, node, self.values), self.wanted[node])
        super().step(node)

    def finished(self) -> bool:
        return len(self.found) == len(self.wanted)


def _read_attention(gm: fx.GraphModule, plan: TrunkPlan, images: torch.Tensor, wanted: dict[fx.Node, torch.Tensor],
                    reduce: Callable[[fx.Node, torch.Tensor, torch.Tensor], Any]) -> dict[fx.Node, Any]:
    """One real forward pass up to the decomposed node: ``reduce(node, weights, wanted[node])`` at each wanted
    birth."""
    reading = _AttentionReading(gm, images, wanted, reduce)
    if wanted:
        reading.run(until=plan.target)
    return reading.found


def _axes_of(plan: TrunkPlan, node: fx.Node, weights: torch.Tensor, batch: int) -> AttentionAxes:
    """The birth's planned heads and windows; ``nn.MultiheadAttention`` (weights [N, H, L, S]): its heads."""
    axes = plan.births[node].axes
    if axes is not None:
        return axes
    return AttentionAxes(weights.dim(), tuple(range(1, weights.dim() - 2)), (),
                         RowLayout.all_windows(weights.shape[0] // batch))


def _mean_over_relevant(weights: torch.Tensor, relevant: torch.Tensor, batch: int, axes: AttentionAxes
                        ) -> tuple[torch.Tensor, int]:
    """weights [rows, *middle, Nq, Nk] and relevant [rows1, *middle, Nq] (probe image) -> ([B, H, W*Nk], count).

    Heads and windows as ``axes`` plan them (``tracer.head_axes``): source ``w * Nk + k`` is key ``k``
    of window ``w``; each head's map is the mean over its relevant queries of all its windows.
    """
    rows, keys = weights.shape[0], weights.shape[-1]
    per_image = rows // batch
    mask = relevant.to(weights.device).expand(relevant.shape[0], *weights.shape[1:-1])
    mask = mask.repeat(batch, *[1] * (mask.dim() - 1)) if mask.shape[0] == per_image else mask
    if mask.shape != weights.shape[:-1]:
        raise RuntimeError(f"internal: relevance mask {tuple(mask.shape)} does not fit attention weights "
                           f"{tuple(weights.shape)}")
    heads, windows = axes.head_count(weights.shape), axes.window_count(weights.shape)
    image = torch.arange(rows, device=weights.device).div(per_image, rounding_mode="floor")
    image = image.view(-1, *[1] * (weights.dim() - 1))
    group = (image * heads + axes.head_index(weights.shape, weights.device)) * windows \
        + axes.window_index(weights.shape, weights.device)                # [rows, *middle, 1, 1]
    group = group.squeeze(-1).expand(*weights.shape[:-2], 1).squeeze(-1).flatten()  # one per attention
    kept = (weights * mask.unsqueeze(-1).to(weights.dtype)).sum(-2).reshape(-1, keys)  # [attentions, Nk]
    summed = kept.new_zeros(batch * heads * windows, keys).index_add_(0, group, kept)
    per_source = summed.reshape(batch, heads, windows * keys)                          # [B, H, W*Nk]
    counted = mask.sum(-1).reshape(-1).to(weights.dtype)
    count = counted.new_zeros(batch * heads * windows).index_add_(0, group, counted).reshape(batch, heads, -1).sum(-1)
    return per_source / count.clamp_min(1).unsqueeze(-1), int(count.max())
