"""Where each attention key comes from in the image, found by pushing indices through the graph.

For an attention birth ``weights @ values``, key ``j`` reads one token of the stream the
branch forked from, and that token (through the linear trunk) reads a patch of pixels.
Both maps are recovered with one trick on the probe image: for a linear-in-its-input map
``y = f(x)`` where each input element feeds one output position, the gradients of
``⟨y, code ⊙ r⟩`` and ``⟨y, r⟩`` (``r`` random, ``code`` the output position + 1) have the
ratio ``code`` at every input element that feeds position ``code``. No names, no layouts:

1. values ← fork:   key index of every element of the fork value (the real branch path:
   norm, qkv linear, reshapes, permutes);
2. fork ← image:    key index of every pixel, through the embedding component carried
   along the linear trunk (patch embedding, position adds, norms); where receptive fields
   overlap (a pixel feeds several keys), the centroid of each key's receptive field instead,
   found in few shared backward passes (``tracer.receptive_fields``);
3. keys that no pixel reaches are special tokens: named by the constant component
   (``cls_token``, ``reg_token``, ``dist_token``) with the smallest support covering them.

Positions are ``(row, col)`` in the grid of key centroids, the constant's name, or
``"padding"`` for keys no input feeds (a partial window padded inside the branch). Windowed
attention numbers its sources ``window * Nk + key``, windows as ``tracer.head_axes`` found them
(rows of one image, or a middle axis such as outlook attention's positions).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import fx

from .node_calls import ValueOverlay, node_arguments
from .ops import OpKind, attention_value_input, is_multihead_attention, op_kind
from .progress import progress
from .roles import Role, TrunkPlan
from .tracing import call_target
from .vocabulary import ComponentKind

Position = tuple[int, int] | str | None


def value_input(gm: fx.GraphModule, birth: fx.Node) -> tuple[fx.Node, int] | None:
    """The values operand of an attention birth and its key axis."""
    if op_kind(birth, gm) == OpKind.ATTENTION:
        node = attention_value_input(birth)
        key_axis = -2  # SDPA values [..., Nk, d]
        if is_multihead_attention(birth, gm):  # MHA values [S, N, E], or [N, S, E] when batch_first
            key_axis = 1 if gm.get_submodule(birth.target).batch_first else 0
        return (node, key_axis) if node is not None else None
    if len(birth.args) >= 2 and isinstance(birth.args[1], fx.Node):
        return birth.args[1], -2
    return None


def fork_of(plan: TrunkPlan, node: fx.Node, data_nodes: set[fx.Node]) -> fx.Node | None:
    """The nearest trunk node ``node`` is computed from (the stream the branch read)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if plan.roles.get(current) is Role.TRUNK or (current in plan.births and plan.births[current].kind is ComponentKind.EMBEDDING):
            return current
        frontier.extend(n for n in current.all_input_nodes if n in data_nodes)
    return None


def subgraph_function(gm: fx.GraphModule, values: dict, start: fx.Node, end: fx.Node) -> Callable:
    """``x -> value of end`` with ``start`` replaced by ``x`` (other inputs at their probe values)."""
    on_path = _ancestors(end) & _descendants(start)
    path = [n for n in gm.graph.nodes if n in on_path and n is not start]  # graph order

    def run(x: torch.Tensor):
        env = ValueOverlay(values, {start: x})
        for node in path:
            args, kwargs = node_arguments(node, env)
            env[node] = call_target(node, gm, args, kwargs)
        return env[end]

    return run


def _ancestors(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.all_input_nodes)


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _reachable(node: fx.Node, neighbours: Callable) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(neighbours(current))
    return seen


def code_of_inputs(function: Callable, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """For ``y = function(x)``: the code of the output position each input element feeds.

    ``codes`` (shaped like ``y``, integers ≥ 1) label output positions. Returns an integer tensor
    shaped like ``x`` (0: feeds nothing), or None when some element feeds several positions.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        return codes_from_graph(x, function(x), codes)


def codes_from_graph(x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor, directions: int = 4
                     ) -> torch.Tensor | None:
    """``code_of_inputs`` for an already computed ``y`` (graph kept for further calls).

    A random direction can make an element's plain gradient cancel to almost zero, so each
    element reads its ratio from the direction where that gradient is largest.
    """
    generator = torch.Generator().manual_seed(1)
    best_plain = torch.zeros_like(x)
    best_ratio = torch.zeros_like(x)
    for _ in range(directions):
        direction = (torch.rand(y.shape, generator=generator, dtype=torch.float64, device="cpu") + 0.5).to(y)
        coded, = torch.autograd.grad(y, x, direction * codes.to(y), retain_graph=True)
        plain, = torch.autograd.grad(y, x, direction, retain_graph=True)
        better = plain.abs() > best_plain.abs()
        best_ratio = torch.where(better, coded / torch.where(better, plain, torch.ones_like(plain)), best_ratio)
        best_plain = torch.where(better, plain, best_plain)
    active = best_plain.abs() > 1e-9 * best_plain.abs().max().clamp_min(1e-300)
    ratio = torch.where(active, best_ratio, torch.zeros_like(best_ratio))
    rounded = ratio.round()
    tolerance = 1e-6 if y.dtype == torch.float64 else 1e-2
    if bool(((ratio - rounded).abs() > tolerance * rounded.abs().clamp_min(1))[active].any()):
        return None
    return rounded.long()


def source_codes(shape: torch.Size, key_axis: int, window_axis: int, device: torch.device | str) -> torch.Tensor:
    """``window * Nk + key + 1`` broadcast over a values tensor of ``shape``."""
    key_axis, window_axis = key_axis % len(shape), window_axis % len(shape)
    key_view, window_view = [1] * len(shape), [1] * len(shape)
    key_view[key_axis], window_view[window_axis] = shape[key_axis], shape[window_axis]
    keys = torch.arange(shape[key_axis], dtype=torch.float64, device=device).view(key_view)
    windows = torch.arange(shape[window_axis], dtype=torch.float64, device=device).view(window_view)
    return (windows * shape[key_axis] + keys + 1).expand(shape)


def support_positions(centroids: list[tuple[float, float] | None]) -> list[tuple[int, int] | None]:
    """(row, col) per key in the grid of the centroids of the grid cells its elements depend on, used when
    receptive fields overlap; the cells come from few grouped backward passes (``tracer.receptive_fields``,
    ``tracer.composed_supports``)."""
    return _rank_centroids(centroids)


def _rank_centroids(centroids: list[tuple[float, float] | None]) -> list[tuple[int, int] | None]:
    ys = sorted({round(c[0], 3) for c in centroids if c})
    xs = sorted({round(c[1], 3) for c in centroids if c})
    return [(ys.index(round(c[0], 3)), xs.index(round(c[1], 3))) if c else None for c in centroids]


def grid_positions(pixel_keys: torch.Tensor, count: int) -> list[tuple[int, int] | None]:
    """(row, col) per key from the centroids of the pixels that feed it (``pixel_keys`` [H, W])."""
    codes = pixel_keys.flatten().cpu()
    rows = torch.arange(pixel_keys.shape[0], dtype=torch.float64).repeat_interleave(pixel_keys.shape[1])
    cols = torch.arange(pixel_keys.shape[1], dtype=torch.float64).repeat(pixel_keys.shape[0])
    size = count + 1
    pixels = torch.bincount(codes, minlength=size)[1:size].double()
    sum_rows = torch.bincount(codes, weights=rows, minlength=size)[1:size]
    sum_cols = torch.bincount(codes, weights=cols, minlength=size)[1:size]
    centroids = [(float(r / n), float(c / n)) if n > 0 else None
                 for r, c, n in zip(sum_rows.tolist(), sum_cols.tolist(), pixels.tolist())]
    return _rank_centroids(centroids)


def attention_key_positions(gm: fx.GraphModule, plan: TrunkPlan, values: dict, data_nodes: set[fx.Node],
                            image: torch.Tensor, fork_components: dict[fx.Node, dict[str, Any]],
                            supports: Callable[[fx.Node, torch.Tensor, int], list | None]
                            ) -> dict[fx.Node, list[Position]]:
    """Per attention birth, the position of every key (None where it cannot be told).

    image: the probe image, a leaf requiring grad; fork_components: fork node ->
    {"embedding": the image's component at the fork (computed from ``image``),
    "constants": {name: component value at the fork}}, from one linear pass. supports:
    (fork, element keys, keys) -> ``support_positions`` for that fork, used where receptive fields
    overlap (called in graph order). Forks with the same embedding whose keys are the same element sets
    share their grid positions.
    """
    positions: dict[fx.Node, list[Position]] = {}
    known: list[tuple[torch.Tensor, torch.Tensor, list[Position]]] = []  # embedding, element keys, result
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    in_graph_order = sorted(plan.births.items(), key=lambda item: order[item[0]])   # earlier forks first:
    for birth_node, birth in progress(in_graph_order, "token key positions"):      # later ones compose on them
        if birth.kind is not ComponentKind.ATTENTION:
            continue
        found = value_input(gm, birth_node)
        if found is None:
            continue
        value_node, axis = found
        fork = fork_of(plan, value_node, data_nodes)
        value = values.get(value_node)
        if fork is None or not isinstance(value, torch.Tensor) or fork not in fork_components \
                or not isinstance(values[fork], torch.Tensor):   # a tuple-valued trunk node (MViTv2's blocks)
            continue
        if birth.axes is not None:  # windows as head_axes planned them (rows, or middle axes)
            codes, keys = birth.axes.source_codes(values[birth_node].shape, value.shape, axis, value.device)
        else:
            batch_axis = 1 if axis % value.dim() == 0 else 0
            keys = value.shape[axis] * value.shape[batch_axis]  # the probe has one image: more rows are windows
            codes = source_codes(value.shape, axis, batch_axis, value.device)
        element_keys = None if codes is None else code_of_inputs(
            subgraph_function(gm, values, fork, value_node), values[fork], codes)
        if element_keys is None:
            positions[birth_node] = [None] * keys
            continue
        embedding = fork_components[fork].get("embedding")   # [*fork shape], a function of image
        on_grid = [None] * keys if embedding is None else _shared_grid_positions(
            known, embedding, element_keys, keys, partial(_grid_positions, image, embedding, element_keys, keys,
                                                          partial(supports, fork, element_keys, keys)))
        positions[birth_node] = _named_positions(on_grid, element_keys, keys, fork_components[fork])
    return positions


def _shared_grid_positions(known: list, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int,
                           compute: Callable[[], list[Position]]) -> list[Position]:
    """``compute()``, once per embedding and grouping of its elements into keys: forks with the same
    embedding whose keys are the same element sets, numbered otherwise (MaxViT's block and grid attention,
    every block of a stage whose trunk only adds branches), reuse it key by key."""
    for seen_embedding, seen_keys, result in known:
        if _same(seen_embedding, embedding):
            matched = _same_groups(element_keys, seen_keys, keys)
            if matched is not None:
                return [result[k] if k >= 0 else None for k in matched]
    result = compute()
    known.append((embedding.detach(), element_keys, result))
    return result


def _grid_positions(image: torch.Tensor, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int,
                    support: Callable[[], list | None]) -> list[Position]:
    """(row, col) per key from the pixels feeding it, or from its receptive field where fields overlap."""
    pixel_codes = codes_from_graph(image, embedding, element_keys)
    if pixel_codes is not None:
        per_pixel = pixel_codes.amax(dim=tuple(range(pixel_codes.dim() - 2)))  # [H, W]
        return list(grid_positions(per_pixel, keys))
    # overlapping receptive fields (a pooled or strided-conv shortcut): support centroids
    return list(support() or [None] * keys)


def _same_groups(codes: torch.Tensor, seen: torch.Tensor, keys: int) -> list[int] | None:
    """Per key of ``codes`` (key + 1 per element, 0: none), the key of ``seen`` with exactly the same
    elements (-1 for a key with no element); None unless every key has such a match."""
    if codes.shape != seen.shape or bool(((codes > 0) != (seen > 0)).any()):
        return None
    fed = codes.flatten() > 0
    span = int(seen.max()) + 1
    joined = (codes.flatten()[fed] * span + seen.flatten()[fed]).unique()   # one per (key, seen key)
    pairs = torch.stack([joined // span, joined % span], 1)
    if len(pairs[:, 0].unique()) != len(pairs) or len(pairs[:, 1].unique()) != len(pairs):
        return None                                                       # a key split or merged
    matched = [-1] * keys
    for key, other in pairs.tolist():
        if key > keys:
            return None
        matched[key - 1] = other - 1
    return matched


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a.detach(), b.detach()))


def _named_positions(on_grid: list[Position], element_keys: torch.Tensor, keys: int,
                     fork: dict[str, Any]) -> list[Position]:
    """``on_grid``, with keys no pixel reaches named by the constant covering them, or ``"padding"``."""
    result = list(on_grid)
    covers = []
    for name, constant in fork.get("constants", {}).items():
        covered = {int(k) - 1 for k in element_keys[(constant != 0) & (element_keys > 0)].unique().tolist()}
        if covered and len(covered) < keys:
            covers.append((len(covered), name, covered))
    fed = {int(k) - 1 for k in element_keys.unique().tolist() if k > 0}
    for key in range(keys):
        if result[key] is None:
            owners = sorted(c for c in covers if key in c[2])
            if owners:
                result[key] = owners[0][1]
            elif key not in fed:  # made inside the branch (F.pad of a partial window): no source
                result[key] = "padding"
    return result
