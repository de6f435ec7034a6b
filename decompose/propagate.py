"""Run the traced graph once, carrying the components of every trunk and branch value.

Real values are computed as in a plain forward pass; every node with a role in
the ``TrunkPlan`` also gets its components ``[C, *value.shape]`` (with the ids of
the components, so that values computed from the same components add up row by
row). Values are freed after their last use, like ``torch.fx.Interpreter``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from tracer.linear_rules import (
    Evaluator,
    Offset,
    additive_sign,
    affine_offsets,
    apply_affine,
    is_binary_additive,
    parameter_name,
)
from tracer.ops import OpKind, is_in_place, op_kind, overwritten_later
from tracer.probe import ValueOverlay, node_arguments
from tracer.relevance import CompactPlan, Slice, compact_arguments
from tracer.roles import Role, TrunkPlan
from tracer.tracing import call_target, describe, module_path

from .births import split_birth
from .labels import ComponentLabel


@dataclass
class Chunk:
    """Components ``ids`` with values ``[len(ids), *shape]`` (or a tuple of such, e.g. MHA's output)."""

    ids: list[int]
    values: Any


@dataclass
class Carried:
    """Components of one node's value, kept as chunks so that a residual add concatenates
    lists instead of copying every earlier component (the sum over all chunks' rows is the value)."""

    chunks: list[Chunk]

    @classmethod
    def single(cls, ids: list[int], values: Any) -> Carried:
        return cls([Chunk(list(ids), values)])

    @property
    def ids(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk.ids]

    def map(self, transform: Callable[[Any], Any]) -> Carried:
        return Carried([Chunk(chunk.ids, transform(chunk.values)) for chunk in self.chunks])

    def stacked(self) -> torch.Tensor:
        """All components as one tensor ``[C, *shape]`` in ``ids`` order."""
        values = [chunk.values for chunk in self.chunks]
        return values[0] if len(values) == 1 else torch.cat([v.expand(len(c.ids), *values[0].shape[1:])
                                                             for v, c in zip(values, self.chunks)])

    def drain(self) -> tuple[list[int], torch.Tensor]:
        """(each id once, in increasing order; its rows summed over all chunks, ``[C, *shape]``),
        releasing each chunk once copied (peak: result + one chunk, no reordering copy); empties self.

        One component may sit in several chunks (early pooling takes a component that reached several
        pooled nodes to the output from each of them): its rows add up, as everywhere in ``Carried``."""
        ids = self.ids
        ordered = sorted(set(ids))
        if len(self.chunks) == 1 and ids == ordered:
            return ids, self.chunks.pop().values
        repeated = len(ordered) != len(ids)
        rank = {i: k for k, i in enumerate(ordered)}
        first = self.chunks[0].values
        shape = (len(ordered),) + tuple(first.shape[1:])
        out = first.new_zeros(shape) if repeated else first.new_empty(shape)  # every row written once
        while self.chunks:
            chunk = self.chunks.pop(0)
            rows = [rank[i] for i in chunk.ids]
            values = chunk.values.expand(len(rows), *out.shape[1:])
            if repeated:
                out.index_add_(0, torch.tensor(rows, device=out.device), values)
            elif rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive ids: one slice
                out[rows[0]: rows[0] + len(rows)] = values
            else:
                out[torch.tensor(rows, device=out.device)] = values
        return ordered, out


PROBE = -1  # id of the probe chunk of an ``early_pooling.Parking`` (never a component)


def split_probe(carried: Carried) -> tuple[list[Chunk], list[Chunk]]:
    """(the probe chunk, if any; the components' chunks) of ``carried``."""
    return [c for c in carried.chunks if c.ids == [PROBE]], [c for c in carried.chunks if c.ids != [PROBE]]


class ComponentRegistry:
    """Labels of all components created in a run; ids are positions in ``labels``."""

    def __init__(self):
        self.labels: list[ComponentLabel] = []
        self._keys: set[str] = set()

    def new(self, label: ComponentLabel) -> int:
        if label.key in self._keys:  # same module path twice: disambiguate by node
            label = dataclasses.replace(label, name=f"{label.name}@{label.node}")
        self._keys.add(label.key)
        self.labels.append(label)
        return len(self.labels) - 1

    def new_many(self, labels: list[ComponentLabel]) -> list[int]:
        """``[new(label) for label in labels]``, in one step when no key repeats (token level: tens of
        thousands of labels per pass)."""
        keys = [label.key for label in labels]
        if len(set(keys)) != len(keys) or not self._keys.isdisjoint(keys):
            return [self.new(label) for label in labels]
        start = len(self.labels)
        self._keys.update(keys)
        self.labels.extend(labels)
        return list(range(start, len(self.labels)))


def _last_uses(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """node -> values whose last use is that node."""
    last_user: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for parent in node.all_input_nodes:
            last_user[parent] = node
    freed: dict[fx.Node, list[fx.Node]] = {}
    for value, user in last_user.items():
        freed.setdefault(user, []).append(value)
    return freed


def propagate(gm: fx.GraphModule, plan: TrunkPlan, images: torch.Tensor, level: str,
              registry: ComponentRegistry, compact: CompactPlan | None = None,
              on_carried: Callable[[fx.Node, Carried], Carried] | None = None,
              positions: dict | None = None, parking: Any = None,
              on_value: Callable[[fx.Node, Any, Carried], None] | None = None) -> tuple[torch.Tensor, Carried]:
    """Real value of ``plan.target`` and its components.

    compact:    slices of the carried values (only what reaches the output is computed)
    on_carried: hook applied to every node's components (used to measure relevance)
    on_value:   called with (node, real value, components) once both are known (used to find where a
                sum breaks)
    positions:  attention birth -> source position of each key (labels at level token)
    parking:    an ``early_pooling.Parking``: trunk nodes where components leave the trunk (the
                result then holds its probe chunk instead of them) and branches it computes itself
    """
    with torch.enable_grad() if parking is not None and parking.needs_grad else contextlib.nullcontext():
        return _propagate(gm, plan, images, level, registry, compact, on_carried, positions or {}, parking,
                          on_value)


def _propagate(gm, plan, images, level, registry, compact, on_carried, positions, parking, on_value):
    real: dict[fx.Node, Any] = {}
    carried: dict[fx.Node, Carried] = {}
    frees = _last_uses(gm.graph)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        role, later = plan.roles.get(node), None
        if role is Role.BIRTH:  # births read their own real value
            with torch.no_grad():  # real values are constants (grad mode is on for a Parking's probe)
                real[node] = _real_value(gm, node, real, images, placeholder)
        if role is not None and parking is not None and parking.computes(node):
            carried[node] = parking.step(gm, plan, node, real, registry, level, positions.get(node),
                                         images.shape[0])
        elif role is not None and (later := _follows_real(gm, plan, node, role, carried, real, compact)) is not None:
            pass  # its components follow from its real value and offsets (``_from_real``)
        elif role is not None:  # components first: an in-place op may overwrite its input's value
            carried[node] = _compacted_components(gm, plan, node, role, real, carried, level, registry,
                                                  images, compact, positions)
            carried[node] = _consolidated(carried[node])
            if on_carried is not None:
                carried[node] = on_carried(node, carried[node])
        if role is not Role.BIRTH:
            with torch.no_grad():
                real[node] = _real_value(gm, node, real, images, placeholder)
        if later is not None:
            carried[node] = _from_real(gm, plan, node, later, real, carried, level, registry, images, compact,
                                       positions)
            if on_carried is not None:
                carried[node] = on_carried(node, carried[node])
        if role is not None and on_value is not None:
            on_value(node, real[node], carried[node])
        if role is not None and parking is not None:
            parking.after_real(node, real)
            carried[node] = parking.park(node, carried[node], real)
        if node is plan.target:
            return real[node], carried[node]
        for done in frees.get(node, ()):
            real.pop(done, None)
            carried.pop(done, None)
    raise RuntimeError("the decomposed node was never reached")


def _real_value(gm, node, real, images, placeholder):
    if node.op == "placeholder":
        return images if node is placeholder else (node.args[0] if node.args else None)
    if node.op == "get_attr":
        value: Any = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    args, kwargs = node_arguments(node, real)
    return call_target(node, gm, args, kwargs)


def _compacted_components(gm, plan, node, role, real, carried, level, registry, images,
                          compact: CompactPlan | None, positions: dict) -> Carried:
    """Components of ``node``, computed on the slices the compaction plan allows."""
    if role is Role.BIRTH:
        spec = compact.slices.get(node) if compact is not None else None
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None, spec,
                              positions.get(node))
    if compact is None:
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None, None)
    compaction = compact.nodes.get(node)
    if compaction is None:
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None, None)
    if compaction.mode == "compact":
        overlay, callee = compact_arguments(node, real, compaction)
        return _components_of(gm, plan, node, role, ValueOverlay(real, overlay), carried, level, registry,
                              images, callee, None)
    full_inputs = dict(carried)
    for parent in node.all_input_nodes:
        spec = compact.slices.get(parent)
        if parent in carried and spec is not None:
            full_inputs[parent] = carried[parent].map(lambda values: _scatter(values, spec))
    result = _components_of(gm, plan, node, role, real, full_inputs, level, registry, images, None, None)
    if compaction.output is not None:
        result = result.map(lambda values: _take(values, compaction.output))
    return result


MAX_CHUNKS = 512
# before an op, many chunks holding few elements in all are stacked into one (one call instead of many)
STACK_CHUNKS, STACK_ELEMENTS = 8, 2**22


def _few_chunks(carried: Carried) -> Carried:
    """``carried`` with its chunks stacked into one when they are many but small (the constants and
    head rows that reach a CLS model's final norm); the probe chunk of a ``Parking`` stays apart."""
    if len(carried.chunks) <= STACK_CHUNKS or not all(isinstance(c.values, torch.Tensor) for c in carried.chunks):
        return carried
    probe, rest = split_probe(carried)
    shape = rest[0].values.shape[1:]
    if sum(len(c.ids) for c in rest) * shape.numel() > STACK_ELEMENTS:
        return carried
    rest = Carried(rest)
    return Carried(probe + [Chunk(rest.ids, rest.stacked())])


def _consolidated(carried: Carried) -> Carried:
    """Bound the number of chunks (each op runs once per chunk) with an occasional copy (the probe
    chunk of a ``Parking`` stays apart: it alone needs grad)."""
    if len(carried.chunks) <= MAX_CHUNKS or not all(isinstance(c.values, torch.Tensor) for c in carried.chunks):
        return carried
    probe, rest = split_probe(carried)
    rest = Carried(rest)
    return Carried([Chunk(rest.ids, rest.stacked())] + probe)


def _scatter(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.scatter(values, leading=1)
    return values


def _take(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.take(values, leading=1)
    return values




def _components_of(gm, plan, node, role, real, carried, level, registry, images, callee,
                   birth_slice: Slice | None, key_positions: list | None = None) -> Carried:
    """Components of ``node`` (``callee``: the same op with replaced arguments, if any)."""
    layer = plan.layer(node)
    op = callee if callee is not None else node
    if role is Role.BIRTH:
        birth = plan.births[node]
        if node.op == "placeholder":
            label = ComponentLabel(birth.name, "embedding", None, None, None, node.name)
            values = images.unsqueeze(0)
            return Carried.single([registry.new(label)], _take(values, birth_slice) if birth_slice else values)
        born = split_birth(gm, birth, real, level, birth_slice, batch_size=images.shape[0])
        ids = registry.new_many(_birth_labels(plan, node, level, born, key_positions))
        return _with_offsets(Carried.single(ids, born.values), born.offsets, layer, node, registry)
    if node in plan.passthrough and node.args[0] in carried:  # the op returns its input as it is
        return carried[node.args[0]]
    kind = op_kind(node, gm)
    inputs = _carried_inputs(node, kind, carried)
    if kind == OpKind.ADDITIVE or (kind == OpKind.UNKNOWN and len(inputs) > 1):
        return _additive(gm, op, kind, real, carried, layer, registry)
    if len(inputs) != 1:
        raise RuntimeError(f"internal: {describe(node)} has {len(inputs)} carried inputs")
    chunks, offsets = [], []
    for k, chunk in enumerate(_few_chunks(carried[inputs[0]]).chunks):
        values, chunk_offsets = apply_affine(gm, op, kind, real, inputs[0], chunk.values)
        chunks.append(Chunk(chunk.ids, values))
        if k == 0:  # offsets do not depend on the components
            offsets = chunk_offsets
    return _with_offsets(Carried(chunks), offsets, layer, node, registry)


def _carried_inputs(node: fx.Node, kind: OpKind, carried: dict) -> list[fx.Node]:
    inputs = [n for n in node.all_input_nodes if n in carried]
    if kind in (OpKind.AFFINE, OpKind.NORM):  # reshape_as(x), type_as(x): x gives a shape, not data
        inputs = [n for n in inputs if node.args and n is node.args[0]]
    return inputs


def _follows_real(gm, plan, node: fx.Node, role, carried: dict, real: dict, compact: CompactPlan | None
                  ) -> fx.Node | None:
    """The one carried input of a single-input op (not in place) when its components follow from the
    op's real value: the input holds none (between the nodes where an ``early_pooling.Parking``
    without a probe sets them aside), or one component that is the input's whole real value (the
    image, a branch born whole): then the op's linear part of it is its real value less its offsets,
    with no second evaluation. Else None."""
    if role is Role.BIRTH or node in plan.passthrough or is_in_place(node):
        return None
    if compact is not None and (node in compact.nodes or any(n in compact.slices for n in node.all_input_nodes)):
        return None
    kind = op_kind(node, gm)
    if kind == OpKind.ADDITIVE:
        return None
    inputs = _carried_inputs(node, kind, carried)
    if len(inputs) != 1:
        return None
    chunks = carried[inputs[0]].chunks
    if not chunks:
        return inputs[0]
    if len(chunks) == 1 and len(chunks[0].ids) == 1 and chunks[0].ids != [PROBE] and \
            _is_whole(chunks[0].values, real.get(inputs[0])):
        return inputs[0]
    return None


def _is_whole(values: Any, value: Any) -> bool:
    """Whether ``values`` [1, *shape] is ``value`` itself (a view of the same elements)."""
    return isinstance(values, torch.Tensor) and isinstance(value, torch.Tensor) and \
        values.shape[1:] == value.shape and values.dtype == value.dtype and \
        values.data_ptr() == value.data_ptr() and values.stride()[1:] == value.stride()


def _from_real(gm, plan, node: fx.Node, carrier: fx.Node, real: dict, carried: dict, level, registry, images,
               compact, positions) -> Carried:
    """Components of a node ``_follows_real`` chose, once ``real[node]`` is known."""
    offsets = affine_offsets(gm, node, op_kind(node, gm), real, carrier)
    source = carried[carrier]
    if not source.chunks:
        return _with_offsets(Carried([]), offsets, plan.layer(node), node, registry)
    if not isinstance(real[node], torch.Tensor) or not all(isinstance(o.value, torch.Tensor) for o in offsets):
        return _consolidated(_compacted_components(gm, plan, node, plan.roles[node], real, carried, level,
                                                   registry, images, compact, positions))
    whole = real[node]
    for offset in offsets:
        whole = whole - offset.value
    if whole is real[node] and overwritten_later(node):
        whole = whole.clone()  # an in-place op writes into the real value later
    return _with_offsets(Carried.single(source.ids, whole.unsqueeze(0)), offsets, plan.layer(node), node, registry)


def _birth_labels(plan: TrunkPlan, node: fx.Node, level: str, born, key_positions: list | None) -> list:
    """The labels of a birth's components (tens of thousands at level token), built once per plan and
    reused while the split gives the same (head, token) rows."""
    cached = plan.labels.get((node, level))
    if cached is None or cached[0] != born.heads or cached[1] != born.tokens:
        labels = [born_label(plan.births[node], node, h, t, key_positions) for h, t in zip(born.heads, born.tokens)]
        cached = plan.labels[(node, level)] = (list(born.heads), list(born.tokens), labels)
    return cached[2]


def born_label(birth, node: fx.Node, head: int | None, token: int | None,
               key_positions: list | None = None) -> ComponentLabel:
    """Label of the component a birth (``roles.Birth``) gives for ``head`` and source ``token``."""
    position = key_positions[token] if key_positions and token is not None else None
    return ComponentLabel(birth.name, birth.kind, birth.layer, head, token, node.name, position, birth.note)


def offset_label(offset: Offset, layer: int | None, node: fx.Node) -> ComponentLabel:
    """Label of the constant component an affine op's offset (bias, shift) becomes."""
    return ComponentLabel(offset.name, offset.kind, layer, None, None, node.name)


def _with_offsets(result: Carried, offsets: list[Offset], layer, node, registry) -> Carried:
    for offset in offsets:
        constant = Carried.single([registry.new(offset_label(offset, layer, node))], _unsqueeze(offset.value))
        result = _merge_sum(result, constant, 1.0)
    return result


def _is_floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _leafwise(transform: Callable, *values: Any) -> Any:
    """Apply ``transform`` to aligned floating leaves; other leaves (sizes, None) from the first."""
    flat = [tree_flatten(v)[0] for v in values]
    leaves, structure = tree_flatten(values[0])
    out = [transform(*(f[i] for f in flat)) if _is_floating(leaf) else leaf for i, leaf in enumerate(leaves)]
    return tree_unflatten(out, structure)


def _unsqueeze(value: Any) -> Any:
    return _leafwise(lambda leaf: leaf.unsqueeze(0), value)


def _merge_sum(a: Carried, b: Carried, sign: float) -> Carried:
    """``a + sign * b`` row-aligned by component id.

    Disjoint components (a residual add, a new constant) just join the chunk list; chunks
    holding the same ids (two slices of one value added together) add up. Rows are broadcast
    to the common shape (``x + pos_embed``), leaf by leaf for tuple-valued ops.
    """
    everything = a.chunks + b.chunks
    if not everything:  # both operands computed elsewhere (see early_pooling.Parking)
        return Carried([])
    if all(isinstance(c.values, torch.Tensor) for c in everything):  # the common case, without pytrees
        shape = torch.broadcast_shapes(*{c.values.shape[1:] for c in everything})
        common = [shape]

        def broadcast(values: Any) -> Any:
            return values if values.shape[1:] == shape else values.expand(values.shape[0], *shape)
    else:
        shapes = [tree_flatten(c.values)[0] for c in everything]
        common = [torch.broadcast_shapes(*(leaves[i].shape[1:] for leaves in shapes)) if _is_floating(leaf)
                  else None for i, leaf in enumerate(shapes[0])]

        def broadcast(values: Any) -> Any:
            leaves, structure = tree_flatten(values)
            return tree_unflatten([leaf.expand(leaf.shape[0], *common[i]) if _is_floating(leaf) else leaf
                                   for i, leaf in enumerate(leaves)], structure)

    chunks = [Chunk(c.ids, broadcast(c.values)) for c in a.chunks]
    a_ids = set(a.ids)
    for chunk in b.chunks:
        values = broadcast(chunk.values if sign == 1.0 else _leafwise(lambda leaf: leaf * sign, chunk.values))
        if a_ids.isdisjoint(chunk.ids):
            chunks.append(Chunk(chunk.ids, values))
            continue
        same = next((k for k, c in enumerate(chunks) if c.ids == chunk.ids), None)
        if same is None:
            return _merge_by_index(a, b, sign, common[0])
        chunks[same] = Chunk(chunk.ids, _leafwise(torch.add, chunks[same].values, values))
    return Carried(chunks)


def _merge_by_index(a: Carried, b: Carried, sign: float, shape) -> Carried:
    """General row alignment (partially overlapping id sets): one dense chunk."""
    if not all(isinstance(c.values, torch.Tensor) for c in a.chunks + b.chunks):
        raise NotImplementedError("partially overlapping components of a tuple-valued op")
    ids = a.ids + [i for i in b.ids if i not in set(a.ids)]
    position = {i: k for k, i in enumerate(ids)}
    first = a.chunks[0].values
    out = first.new_zeros((len(ids),) + tuple(shape))
    for carried, factor in ((a, 1.0), (b, sign)):
        for chunk in carried.chunks:
            out[[position[i] for i in chunk.ids]] += factor * chunk.values.expand(len(chunk.ids), *shape)
    return Carried.single(ids, out)


def _constant_operand(value: Any, operand: Any, node: fx.Node, layer, registry,
                      like: torch.Tensor | None = None) -> Carried:
    """A non-image tensor or number added on the trunk becomes a constant component."""
    name = parameter_name(operand) or f"{module_path(node) or node.name}:{node.name}.constant"
    kind = "constant" if parameter_name(operand) else "bias"
    label = ComponentLabel(name, kind, layer, None, None, node.name)
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(
        value, dtype=like.dtype if like is not None else None, device=like.device if like is not None else None)
    return Carried.single([registry.new(label)], tensor.unsqueeze(0))


def _additive(gm, node, kind, real, carried, layer, registry) -> Carried:
    """add / sub / cat / stack (and jointly affine opaque ops) of several carried values."""
    if kind == OpKind.ADDITIVE and is_binary_additive(node):
        operands = []
        for operand in node.args[:2]:
            if isinstance(operand, fx.Node) and operand in carried:
                operands.append(carried[operand])
            else:
                value = real[operand] if isinstance(operand, fx.Node) else operand
                like = next(_first_floating(real[n]) for n in node.all_input_nodes if n in carried)
                operands.append(_constant_operand(value, operand, node, layer, registry, like))
        result = operands[0]
        for position, operand in enumerate(operands[1:], start=1):
            result = _merge_sum(result, operand, additive_sign(node, position))
        return result
    return _zero_filled(gm, node, real, carried, layer, registry)


def _first_floating(value: Any) -> torch.Tensor:
    return next(leaf for leaf in tree_flatten(value)[0] if _is_floating(leaf))


def _zero_filled(gm, node, real, carried, layer, registry) -> Carried:
    """Linear multi-input op (cat, stack ...): each chunk runs with zeros in the other inputs."""
    operand_nodes = [n for n in node.all_input_nodes if n in carried]
    sources: dict[fx.Node, Carried] = {n: carried[n] for n in operand_nodes}
    if op_kind(node, gm) == OpKind.ADDITIVE:  # cat / stack: constant pieces become components
        pieces = node.args[0] if isinstance(node.args[0], (list, tuple)) else node.args
        for piece in pieces:
            if isinstance(piece, fx.Node) and piece not in carried and isinstance(real.get(piece), torch.Tensor):
                sources[piece] = _constant_operand(real[piece], piece, node, layer, registry)
    all_ids = [i for source in sources.values() for i in source.ids]
    if len(all_ids) != len(set(all_ids)):  # the same components in several inputs: align rows
        sources = {n: Carried.single(*_aligned(source, all_ids, real[n].shape)) for n, source in sources.items()}
        first = next(iter(sources.values()))
        return _zero_filled_aligned(gm, node, real, sources, first.ids, layer, registry)
    evaluate = Evaluator(gm, node, real)
    offsets = _offset_at_zero(gm, node, real, sources, evaluate)
    chunks = []
    for n, source in sources.items():
        for chunk in source.chunks:
            count = len(chunk.ids)
            inputs = {m: (chunk.values.expand(count, *real[m].shape) if m is n else
                          real[m].new_zeros(()).expand(count, *real[m].shape)) for m in sources}
            values = evaluate.over_components(inputs)
            chunks.append(Chunk(chunk.ids, values - offsets[0].value if offsets else values))
    return _with_offsets(Carried(chunks), offsets, layer, node, registry)


def _aligned(source: Carried, ids: list[int], shape) -> tuple[list[int], torch.Tensor]:
    unique = list(dict.fromkeys(ids))
    position = {i: k for k, i in enumerate(unique)}
    full = _first_floating(source.chunks[0].values).new_zeros((len(unique),) + tuple(shape))
    for chunk in source.chunks:
        full[[position[i] for i in chunk.ids]] = chunk.values.expand(len(chunk.ids), *shape)
    return unique, full


def _zero_filled_aligned(gm, node, real, sources, ids, layer, registry) -> Carried:
    evaluate = Evaluator(gm, node, real)
    offsets = _offset_at_zero(gm, node, real, sources, evaluate)
    values = evaluate.over_components({n: s.chunks[0].values for n, s in sources.items()})
    if offsets:
        values = values - offsets[0].value
    return _with_offsets(Carried.single(ids, values), offsets, layer, node, registry)


def _offset_at_zero(gm, node, real, sources, evaluate) -> list[Offset]:
    """Opaque jointly-affine ops may have a constant term f(0)."""
    if op_kind(node, gm) == OpKind.ADDITIVE:
        return []
    at_zero = evaluate({n: torch.zeros_like(real[n]) for n in sources})
    if not bool(at_zero.any()):
        return []
    return [Offset(at_zero, f"{module_path(node) or node.name}:{node.name}.offset")]
