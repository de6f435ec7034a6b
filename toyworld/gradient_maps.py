"""A gradient-based heatmap baseline: Grad-CAM on the last attention layer that reaches the output.

For a score s = ⟨representation(x), w⟩ (w [B, D]: the model's own class row, a probe's row ...),
each source token's relevance is Chefer et al.'s gradient-weighted attention of that layer,
mean over heads and the output-reading queries of ReLU(∂s/∂A ⊙ A): the attention the score
depends on, positively. Everything comes from the traced graph, as ``decompose.attention_maps``
finds it: the attention births (fused ``F.scaled_dot_product_attention`` or ``weights @ values``),
their heads and windows, the queries the output reads and each source's image position. The
attention weights are made a leaf of the autograd graph by running the layer as ``A @ V`` with
A recomputed from its real inputs (equal to the fused result up to float rounding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from decompose.attention_maps import AttentionMap, AttentionMapCapture, _axes_of, _mean_over_relevant
from tracer.attention import sdpa_arguments, sdpa_values, sdpa_weights
from tracer.graph_runner import GraphRunner
from tracer.node_calls import node_arguments
from tracer.ops import OpKind, is_multihead_attention, op_kind


class UnsupportedGradientMap(ValueError):
    """The attention layer's form has no ``A @ V`` rewrite here (e.g. ``nn.MultiheadAttention``)."""


class _LeafAttention(GraphRunner):
    """A real forward pass, with gradients, in which the attention birth ``node`` runs as ``A @ V``, A a leaf."""

    def __init__(self, gm: fx.GraphModule, images: torch.Tensor, node: fx.Node):
        super().__init__(gm, images)
        self.node, self.weights = node, None

    def step(self, node: fx.Node) -> None:
        if node is not self.node:
            return super().step(node)
        args, kwargs = node_arguments(node, self.values)
        if is_multihead_attention(node, self.gm):
            raise UnsupportedGradientMap(f"attention node {node.name!r} is an nn.MultiheadAttention; the gradient "
                                         "baseline rewrites only F.scaled_dot_product_attention and weights @ values")
        if op_kind(node, self.gm) == OpKind.ATTENTION and node.target is F.scaled_dot_product_attention:
            bound = sdpa_arguments(args, kwargs)
            if bound.get("dropout_p"):
                raise UnsupportedGradientMap(f"attention node {node.name!r} uses dropout; run the model in eval mode")
            weights, values = sdpa_weights(**bound).detach(), sdpa_values(**bound)
        else:                                                   # the birth is ``weights @ values`` itself
            weights, values = args[0].detach(), args[1]
        self.weights = weights.requires_grad_()
        self.values[node] = self.weights @ values


def gradient_attention_map(capture: AttentionMapCapture, images: torch.Tensor, directions: torch.Tensor,
                           layer: int = -1) -> AttentionMap:
    """Grad-CAM relevance of one attention layer reaching the output (default: the last) for the scores
    ⟨representation, directions⟩; ``AttentionMap.weights`` [B, heads, S] holds ReLU(∂s/∂A ⊙ A) averaged
    over the relevant queries (draw with ``align.heatmaps.attention_heatmaps``).

    images: [B, C, H, W] (model input); directions: [B, D] one direction per image in the
    representation's space (what the decomposition sums to).
    """
    decomposer = capture.decomposer
    plan = decomposer.plan(images)
    relevant = capture.relevant_queries(plan)
    if not relevant:
        raise ValueError("no attention layer reaches the output; the gradient baseline needs one")
    node = [n for n in capture.graph_module.graph.nodes if n in relevant][layer]          # graph order
    runner = _LeafAttention(capture.graph_module, images, node)
    with torch.enable_grad():
        representation = runner.run(until=plan.target)                                   # [B, D]
        if representation.shape != directions.shape:
            raise ValueError(f"directions {tuple(directions.shape)} do not match the representation "
                             f"{tuple(representation.shape)}")
        (gradient,) = torch.autograd.grad((representation * directions).sum(), runner.weights)
    relevance = (gradient * runner.weights.detach()).clamp_min(0)                        # [rows, *heads, Nq, Nk]
    batch = images.shape[0]
    reduced, queries = _mean_over_relevant(relevance, relevant[node], batch, _axes_of(plan, node, relevance, batch))
    birth = plan.births[node]
    positions = capture.key_positions(plan).get(node) or [None] * reduced.shape[-1]
    return AttentionMap(birth.name, birth.layer, node.name, reduced, list(positions), queries)
