"""Run the traced graph once, carrying the components of every trunk and branch value.

Real values are computed as in a plain forward pass; every node with a role in the ``TrunkPlan`` also
gets its components ``[C, *value.shape]`` (``decompose.carried``: chunks of rows with component ids, so
that values computed from the same components add up row by row). ``ComponentPass`` is one such pass:
a ``tracer.graph_runner.GraphRunner`` whose step computes a node's components next to its value.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from tracer.graph_runner import GraphRunner
from tracer.linear_rules import (
    Evaluator,
    Offset,
    additive_sign,
    affine_offsets,
    apply_affine,
    is_binary_additive,
    parameter_name,
)
from tracer.node_calls import ValueOverlay
from tracer.ops import OpKind, is_in_place, op_kind, overwritten_later
from tracer.relevance import CompactionMode, CompactPlan, Slice, compact_arguments
from tracer.roles import Role, TrunkPlan
from tracer.tracing import describe, module_path
from tracer.vocabulary import ComponentKind, Level

from .births import split_birth
from .carried import (
    Carried,
    Chunk,
    ComponentRegistry,
    consolidated,
    few_chunks,
    is_floating,
    is_probe,
    merge_sum,
    unsqueezed,
)
from .labels import ComponentLabel
from .run_plan import RunPlan


class PassExtension(Protocol):
    """What the components pass lets another part of the decomposition do at its nodes: compute a node's
    components itself (``computes``, ``step``), see its real value (``after_real``) and take its
    components off the trunk (``park``). Early pooling's ``pooling.Parking`` is one; ``NoExtension``
    does nothing."""

    needs_grad: bool  # the pass records an autograd graph (for adjoints read at the end)

    def computes(self, node: fx.Node) -> bool: ...

    def step(self, gm: fx.GraphModule, plan: RunPlan, node: fx.Node, real: dict, registry: ComponentRegistry,
             level: Level, positions: list | None, batch_size: int) -> Carried: ...

    def after_real(self, node: fx.Node, real: dict) -> None: ...

    def park(self, node: fx.Node, carried: Carried, real: dict) -> Carried: ...


class NoExtension:
    """The pass on its own: every component is carried to the output."""

    needs_grad = False

    def computes(self, node: fx.Node) -> bool:
        return False

    def step(self, *args) -> Carried:
        raise RuntimeError("internal: NoExtension computes no node")

    def after_real(self, node: fx.Node, real: dict) -> None:
        pass

    def park(self, node: fx.Node, carried: Carried, real: dict) -> Carried:
        return carried


def propagate(gm: fx.GraphModule, plan: TrunkPlan, images: torch.Tensor, level: Level | str,
              registry: ComponentRegistry, compact: CompactPlan | None = None,
              on_carried: Callable[[fx.Node, Carried], Carried] | None = None,
              positions: dict | None = None, parking: PassExtension | None = None,
              on_value: Callable[[fx.Node, Any, Carried], None] | None = None) -> tuple[torch.Tensor, Carried]:
    """Real value of ``plan.target`` and its components (one ``ComponentPass``).

    compact:    slices of the carried values (only what reaches the output is computed)
    on_carried: hook applied to every node's components (used to measure relevance)
    on_value:   called with (node, real value, components) once both are known (used to find where a
                sum breaks)
    positions:  attention birth -> source position of each key (labels at level token)
    parking:    a ``PassExtension`` such as ``pooling.Parking``: trunk nodes where components leave the
                trunk (the result then holds its probe chunk instead of them) and branches it computes
                itself (None: ``NoExtension``)
    """
    run = ComponentPass(gm, plan, images, Level(level), registry, compact, on_carried, positions or {},
                        parking or NoExtension(), on_value)
    with torch.enable_grad() if run.parking.needs_grad else contextlib.nullcontext():
        representation = run.run(until=plan.target)
    if plan.target not in run.carried:
        raise RuntimeError("the decomposed node was never reached")
    return representation, run.carried[plan.target]


class ComponentPass(GraphRunner):
    """One pass over a batch: ``values`` holds the real values, ``carried`` the components of every node
    with a role; both are freed after their last use. The arguments are ``propagate``'s."""

    def __init__(self, gm: fx.GraphModule, plan: TrunkPlan, images: torch.Tensor, level: Level,
                 registry: ComponentRegistry, compact: CompactPlan | None, on_carried, positions: dict,
                 parking: PassExtension, on_value):
        super().__init__(gm, images)
        self.plan, self.level, self.registry, self.compact = plan, level, registry, compact
        self.on_carried, self.on_value, self.positions, self.parking = on_carried, on_value, positions, parking
        self.carried: dict[fx.Node, Carried] = {}

    def step(self, node: fx.Node) -> None:
        plan, parking, real, carried = self.plan, self.parking, self.values, self.carried
        role, later = plan.roles.get(node), None
        if role is Role.BIRTH:  # births read their own real value
            with torch.no_grad():  # real values are constants (grad mode is on for a Parking's probe)
                real[node] = self.evaluate(node)
        if role is not None and parking.computes(node):
            carried[node] = parking.step(self.gm, plan, node, real, self.registry, self.level,
                                         self.positions.get(node), self.images.shape[0])
        elif role is not None and (later := _follows_real(self.gm, plan, node, role, carried, real,
                                                          self.compact)) is not None:
            pass  # its components follow from its real value and offsets (``from_real``)
        elif role is not None:  # components first: an in-place op may overwrite its input's value
            carried[node] = self._hooked(node, consolidated(self.compacted_components(node, role)))
        if role is not Role.BIRTH:
            with torch.no_grad():
                real[node] = self.evaluate(node)
        if later is not None:
            carried[node] = self._hooked(node, self.from_real(node, later))
        if role is not None and self.on_value is not None:
            self.on_value(node, real[node], carried[node])
        if role is not None:
            parking.after_real(node, real)
            carried[node] = parking.park(node, carried[node], real)

    def free(self, node: fx.Node) -> None:
        self.values.pop(node, None)
        self.carried.pop(node, None)

    def _hooked(self, node: fx.Node, carried: Carried) -> Carried:
        return carried if self.on_carried is None else self.on_carried(node, carried)

    def compacted_components(self, node: fx.Node, role: Role) -> Carried:
        """Components of ``node``, computed on the slices the compaction plan allows."""
        compact, real, carried = self.compact, self.values, self.carried
        if role is Role.BIRTH:
            spec = compact.slices.get(node) if compact is not None else None
            return self.components_of(node, role, real, carried, None, spec, self.positions.get(node))
        compaction = compact.nodes.get(node) if compact is not None else None
        if compaction is None:
            return self.components_of(node, role, real, carried)
        if compaction.mode is CompactionMode.COMPACT:
            overlay, callee = compact_arguments(node, real, compaction)
            return self.components_of(node, role, ValueOverlay(real, overlay), carried, callee)
        full_inputs = dict(carried)
        for parent in node.all_input_nodes:
            spec = compact.slices.get(parent)
            if parent in carried and spec is not None:
                full_inputs[parent] = carried[parent].map(lambda values: _scatter(values, spec))
        result = self.components_of(node, role, real, full_inputs)
        if compaction.output is not None:
            result = result.map(lambda values: _take(values, compaction.output))
        return result

    def components_of(self, node: fx.Node, role: Role, real: dict, carried: dict, callee: Any = None,
                      birth_slice: Slice | None = None, key_positions: list | None = None) -> Carried:
        """Components of ``node`` from ``real`` values and ``carried`` inputs (``callee``: the same op with
        replaced arguments, if any)."""
        gm, plan, registry, images = self.gm, self.plan, self.registry, self.images
        layer = plan.layer(node)
        op = callee if callee is not None else node
        if role is Role.BIRTH:
            birth = plan.births[node]
            if node.op == "placeholder":
                label = ComponentLabel(birth.name, ComponentKind.EMBEDDING, None, None, None, node.name)
                values = images.unsqueeze(0)
                return Carried.single([registry.new(label)], _take(values, birth_slice) if birth_slice else values)
            born = split_birth(gm, birth, real, self.level, birth_slice, batch_size=images.shape[0])
            ids = registry.new_many(_birth_labels(plan, node, self.level, born, key_positions))
            return with_offsets(Carried.single(ids, born.values), born.offsets, layer, node, registry)
        if node in plan.passthrough and node.args[0] in carried:  # the op returns its input as it is
            return carried[node.args[0]]
        kind = op_kind(node, gm)
        inputs = _carried_inputs(node, kind, carried)
        if kind == OpKind.ADDITIVE or (kind == OpKind.UNKNOWN and len(inputs) > 1):
            return _additive(gm, op, kind, real, carried, layer, registry)
        if len(inputs) != 1:
            raise RuntimeError(f"internal: {describe(node)} has {len(inputs)} carried inputs")
        chunks, offsets = [], []
        for k, chunk in enumerate(few_chunks(carried[inputs[0]]).chunks):
            values, chunk_offsets = apply_affine(gm, op, kind, real, inputs[0], chunk.values)
            chunks.append(Chunk(chunk.ids, values))
            if k == 0:  # offsets do not depend on the components
                offsets = chunk_offsets
        return with_offsets(Carried(chunks), offsets, layer, node, registry)

    def from_real(self, node: fx.Node, carrier: fx.Node) -> Carried:
        """Components of a node ``_follows_real`` chose, once its real value is known."""
        gm, plan, real, registry = self.gm, self.plan, self.values, self.registry
        offsets = affine_offsets(gm, node, op_kind(node, gm), real, carrier)
        source = self.carried[carrier]
        if not source.chunks:
            return with_offsets(Carried([]), offsets, plan.layer(node), node, registry)
        if not isinstance(real[node], torch.Tensor) or not all(isinstance(o.value, torch.Tensor) for o in offsets):
            return consolidated(self.compacted_components(node, plan.roles[node]))
        whole = real[node]
        for offset in offsets:
            whole = whole - offset.value
        if whole is real[node] and overwritten_later(node):
            whole = whole.clone()  # an in-place op writes into the real value later
        return with_offsets(Carried.single(source.ids, whole.unsqueeze(0)), offsets, plan.layer(node), node,
                             registry)


def _scatter(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.scatter(values, leading=1)
    return values


def _take(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.take(values, leading=1)
    return values


def _carried_inputs(node: fx.Node, kind: OpKind, carried: dict) -> list[fx.Node]:
    inputs = [n for n in node.all_input_nodes if n in carried]
    if kind in (OpKind.AFFINE, OpKind.NORM):  # reshape_as(x), type_as(x): x gives a shape, not data
        inputs = [n for n in inputs if node.args and n is node.args[0]]
    return inputs


def _follows_real(gm, plan, node: fx.Node, role, carried: dict, real: dict, compact: CompactPlan | None
                  ) -> fx.Node | None:
    """The one carried input of a single-input op (not in place) when its components follow from the
    op's real value: the input holds none (between the nodes where a ``pooling.Parking``
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
    if len(chunks) == 1 and len(chunks[0].ids) == 1 and not is_probe(chunks[0]) and \
            _is_whole(chunks[0].values, real.get(inputs[0])):
        return inputs[0]
    return None


def _is_whole(values: Any, value: Any) -> bool:
    """Whether ``values`` [1, *shape] is ``value`` itself (a view of the same elements)."""
    return isinstance(values, torch.Tensor) and isinstance(value, torch.Tensor) and \
        values.shape[1:] == value.shape and values.dtype == value.dtype and \
        values.data_ptr() == value.data_ptr() and values.stride()[1:] == value.stride()


def _birth_labels(plan: RunPlan, node: fx.Node, level: Level, born, key_positions: list | None) -> list:
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


def with_offsets(result: Carried, offsets: list[Offset], layer, node, registry) -> Carried:
    for offset in offsets:
        constant = Carried.single([registry.new(offset_label(offset, layer, node))], unsqueezed(offset.value))
        result = merge_sum(result, constant, 1.0)
    return result


def _constant_operand(value: Any, operand: Any, node: fx.Node, layer, registry,
                      like: torch.Tensor | None = None) -> Carried:
    """A non-image tensor or number added on the trunk becomes a constant component."""
    name = parameter_name(operand) or f"{module_path(node) or node.name}:{node.name}.constant"
    kind = ComponentKind.CONSTANT if parameter_name(operand) else ComponentKind.BIAS
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
            result = merge_sum(result, operand, additive_sign(node, position))
        return result
    return _zero_filled(gm, node, real, carried, layer, registry)


def _first_floating(value: Any) -> torch.Tensor:
    return next(leaf for leaf in tree_flatten(value)[0] if is_floating(leaf))


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
    return with_offsets(Carried(chunks), offsets, layer, node, registry)


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
    return with_offsets(Carried.single(ids, values), offsets, layer, node, registry)


def _offset_at_zero(gm, node, real, sources, evaluate) -> list[Offset]:
    """Opaque jointly-affine ops may have a constant term f(0)."""
    if op_kind(node, gm) == OpKind.ADDITIVE:
        return []
    at_zero = evaluate({n: torch.zeros_like(real[n]) for n in sources})
    if not bool(at_zero.any()):
        return []
    return [Offset(at_zero, f"{module_path(node) or node.name}:{node.name}.offset")]
