"""A batch's pooling weights γ from the trunk norms' per-row scales, without a backward pass.

After an early pooling's start, the trunk holds linear maps, row moves, residual adds whose branch is
set aside, and norms whose only data-dependent part is one factor per row
(``linear_rules.frozen_row_scale``). A token t of a pooled node n then reaches the output through one
row of each norm k after it, and only those rows' scales depend on the images:

    γ_n[b, t] = factor_n[t] · Π_k scale_k[b, rows_{n,k}[t]]

``rows`` come from the probe image: two vector-Jacobian products from each norm back through the
frozen trunk, one for a random cotangent and one for it times a row code; their ratio at token t is
the code of the row t feeds. ``factor`` is γ on the probe image over the product, and the formula is
checked on another image. Where it does not hold (any other data-dependent factor) there is none, and
each batch's γ comes from the probe's backward pass instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx

# a token's two adjoints (ones, row code) must be parallel, the code an integer, to this relative precision
CODE_TOLERANCE = 1e-6


@dataclass
class NormScales:
    """γ of every pooled node as a product of the trunk norms' per-row scales (see the module)."""

    norms: list[fx.Node]                                        # the trunk norms whose scales are read
    factors: dict[fx.Node, torch.Tensor]                        # pooled node -> [T]
    rows: dict[fx.Node, list[tuple[fx.Node, torch.Tensor]]]     # pooled node -> (norm, [T] row it feeds)

    def weights(self, node: fx.Node, scales: dict[fx.Node, torch.Tensor], batch: int) -> torch.Tensor:
        """γ [B, T] at ``node`` from a batch's ``scales`` (norm -> ``frozen_row_scale`` value, [B, ...])."""
        gamma = self.factors[node].expand(batch, -1)
        for norm, rows in self.rows[node]:
            per_row = scales[norm].reshape(batch, -1)
            gamma = gamma.to(per_row.device) * per_row[:, rows.to(per_row.device)]  # the row each token feeds
        return gamma

    def to(self, dtype: torch.dtype) -> NormScales:
        return NormScales(self.norms, {n: f.to(dtype) for n, f in self.factors.items()}, self.rows)


def fit_norm_scales(nodes: list[fx.Node], order: dict[fx.Node, int], probes: dict[fx.Node, torch.Tensor],
                    scales: dict[fx.Node, torch.Tensor], gamma: Callable[[fx.Node, int], torch.Tensor],
                    tokens: Callable[[fx.Node, torch.Tensor], torch.Tensor], tolerance: float) -> NormScales | None:
    """The formula for every pooled node of ``nodes``, or None where it does not hold.

    probes: trunk node -> the probe's value there ``[1, images, *shape[1:]]`` (its autograd graph kept)
    scales: trunk norm -> its ``frozen_row_scale`` on the probe images ``[images, ...]``
    gamma:  (node, image) -> γ [T] there, from the real adjoints (image 0: the probe image; -1: another)
    tokens: (node, values [images, *shape[1:]]) -> [images, T, F] (the pooling's token-major layout)
    """
    norms = [k for k in sorted(scales, key=order.__getitem__) if k in probes]
    rows: dict[fx.Node, list[tuple[fx.Node, torch.Tensor]]] = {n: [] for n in nodes}
    first = {n: gamma(n, 0) for n in nodes}
    generator = torch.Generator().manual_seed(0)
    for norm in norms:
        before = [n for n in nodes if order[n] < order[norm] and n in probes]
        if not before:
            continue
        found = _rows_fed(probes[norm], scales[norm][0], [probes[n] for n in before], generator)
        for node, grads in zip(before, found):
            if grads is None:
                continue
            one, code = (tokens(node, g)[0] for g in grads)                       # [T, F] on the probe image
            squared = (one * one).sum(-1)
            reached = squared > 0
            if not bool(reached.any()):
                continue                                                          # the norm is not after it
            if bool((first[node] != 0)[~reached].any()):
                return None                                                       # some tokens bypass it
            estimate = (code * one).sum(-1) / torch.where(reached, squared, torch.ones_like(squared))
            residual = (code - estimate.unsqueeze(-1) * one).norm()
            whole = estimate.round()
            if float(residual) > CODE_TOLERANCE * float(code.norm()) or \
                    float((estimate - whole)[reached].abs().max()) > CODE_TOLERANCE * float(whole.abs().max()):
                return None                                                       # a token feeds several rows
            rows[node].append((norm, torch.where(reached, whole - 1, torch.zeros_like(whole)).long()))
    factors = {}
    for node in nodes:
        product = _product(rows[node], scales, 0, first[node])
        factors[node] = torch.where(product != 0, first[node] / torch.where(product != 0, product, 1), 0)
        other = gamma(node, -1)
        predicted = factors[node] * _product(rows[node], scales, -1, other)
        if float((predicted - other).norm()) > tolerance * float(other.norm()):
            return None
    return NormScales([k for k in norms if any(k is norm for n in nodes for norm, _ in rows[n])], factors, rows)


def _rows_fed(probe: torch.Tensor, scale: torch.Tensor, inputs: list[torch.Tensor],
              generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """For each of ``inputs`` (probe values before the norm whose output probe is ``probe``): the
    vector-Jacobian products of a random cotangent and of it times the norm's row code (row + 1)."""
    code = torch.arange(1, scale.numel() + 1, dtype=probe.dtype, device=probe.device).reshape(scale.shape)
    noise = torch.randn(probe.shape, generator=generator, dtype=probe.dtype).to(probe.device)
    unique = list({id(t): t for t in inputs}.values())                            # stage nodes share a tensor
    with torch.enable_grad():
        ones = torch.autograd.grad(probe, unique, noise, retain_graph=True, allow_unused=True)
        coded = torch.autograd.grad(probe, unique, noise * code, retain_graph=True, allow_unused=True)
    by_id = {id(t): (a, b) for t, a, b in zip(unique, ones, coded)}
    out = []
    for tensor in inputs:
        a, b = by_id[id(tensor)]
        out.append(None if a is None or b is None else (a[0], b[0]))
    return out


def _product(rows: list[tuple[fx.Node, torch.Tensor]], scales: dict, image: int, like: torch.Tensor) -> torch.Tensor:
    product = torch.ones_like(like)
    for norm, index in rows:
        product = product * scales[norm][image].reshape(-1)[index].to(like)
    return product
