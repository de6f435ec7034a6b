"""Run the traced graph once, carrying the components of every trunk and branch value.

Real values are computed as in a plain forward pass; every node with a role in
the ``TrunkPlan`` also gets its components ``[C, *value.shape]`` (with the ids of
the components, so that values computed from the same components add up row by
row). Values are freed after their last use, like ``torch.fx.Interpreter``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from tracer.linear_rules import Evaluator, Offset, additive_sign, apply_affine, is_binary_additive, parameter_name
from tracer.ops import OpKind, op_kind
from tracer.probe import node_arguments
from tracer.relevance import CompactPlan, Slice, compact_arguments
from tracer.roles import Role, TrunkPlan
from tracer.tracing import call_target, describe, module_path

from .births import split_birth
from .labels import ComponentLabel


@dataclass
class Carried:
    """Components of one node's value: ``values`` [C, *shape] (or a tuple of such) with ``ids``."""

    ids: list[int]
    values: Any


class ComponentRegistry:
    """Labels of all components created in a run; ids are positions in ``labels``."""

    def __init__(self):
        self.labels: list[ComponentLabel] = []
        self._keys: set[str] = set()

    def new(self, label: ComponentLabel) -> int:
        if label.key in self._keys:  # same module path twice: disambiguate by node
            label = ComponentLabel(f"{label.name}@{label.node}", label.kind, label.layer, label.head,
                                   label.token, label.node)
        self._keys.add(label.key)
        self.labels.append(label)
        return len(self.labels) - 1


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
              on_carried: Callable[[fx.Node, Carried], Carried] | None = None) -> tuple[torch.Tensor, Carried]:
    """Real value of ``plan.target`` and its components.

    compact:    slices of the carried values (only what reaches the output is computed)
    on_carried: hook applied to every node's components (used to measure relevance)
    """
    real: dict[fx.Node, Any] = {}
    carried: dict[fx.Node, Carried] = {}
    frees = _last_uses(gm.graph)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        role = plan.roles.get(node)
        if role is Role.BIRTH:  # births read their own real value
            real[node] = _real_value(gm, node, real, images, placeholder)
        if role is not None:  # components first: an in-place op may overwrite its input's value
            carried[node] = _compacted_components(gm, plan, node, role, real, carried, level, registry,
                                                  images, compact)
            if on_carried is not None:
                carried[node] = on_carried(node, carried[node])
        if role is not Role.BIRTH:
            real[node] = _real_value(gm, node, real, images, placeholder)
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
                          compact: CompactPlan | None) -> Carried:
    """Components of ``node``, computed on the slices the compaction plan allows."""
    if compact is None:
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None, None)
    if role is Role.BIRTH:
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None,
                              compact.slices.get(node))
    compaction = compact.nodes.get(node)
    if compaction is None:
        return _components_of(gm, plan, node, role, real, carried, level, registry, images, None, None)
    if compaction.mode == "compact":
        overlay, callee = compact_arguments(node, real, compaction)
        return _components_of(gm, plan, node, role, _Overlay(real, overlay), carried, level, registry,
                              images, callee, None)
    full_inputs = dict(carried)
    for parent in node.all_input_nodes:
        spec = compact.slices.get(parent)
        if parent in carried and spec is not None:
            full_inputs[parent] = Carried(carried[parent].ids, _scatter(carried[parent].values, spec))
    result = _components_of(gm, plan, node, role, real, full_inputs, level, registry, images, None, None)
    if compaction.output is not None:
        result = Carried(result.ids, _take(result.values, compaction.output))
    return result


def _scatter(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.scatter(values, leading=1)
    return values


def _take(values: Any, spec: Slice) -> Any:
    if isinstance(values, torch.Tensor):
        return spec.take(values, leading=1)
    return values


class _Overlay(dict):
    def __init__(self, base: dict, overlay: dict):
        super().__init__(overlay)
        self.base = base

    def __missing__(self, key):
        return self.base[key]

    def get(self, key, default=None):
        return self[key] if key in self or key in self.base else default


def _components_of(gm, plan, node, role, real, carried, level, registry, images, callee,
                   birth_slice: Slice | None) -> Carried:
    """Components of ``node`` (``callee``: the same op with replaced arguments, if any)."""
    layer = plan.layer(node)
    op = callee if callee is not None else node
    if role is Role.BIRTH:
        if node.op == "placeholder":
            birth = plan.births[node]
            label = ComponentLabel(birth.name, "embedding", None, None, None, node.name)
            values = images.unsqueeze(0)
            return Carried([registry.new(label)], _take(values, birth_slice) if birth_slice else values)
        birth = plan.births[node]
        born = split_birth(gm, birth, real, level, birth_slice)
        ids = [registry.new(ComponentLabel(birth.name, birth.kind, birth.layer, h, t, node.name))
               for h, t in zip(born.heads, born.tokens)]
        result = Carried(ids, born.values)
        return _with_offsets(result, born.offsets, layer, node, registry)
    kind = op_kind(node, gm)
    inputs = [n for n in node.all_input_nodes if n in carried]
    if kind == OpKind.ADDITIVE or (kind == OpKind.UNKNOWN and len(inputs) > 1):
        return _additive(gm, op, kind, real, carried, layer, registry)
    if len(inputs) != 1:
        raise RuntimeError(f"internal: {describe(node)} has {len(inputs)} carried inputs")
    source = carried[inputs[0]]
    values, offsets = apply_affine(gm, op, kind, real, inputs[0], source.values)
    return _with_offsets(Carried(list(source.ids), values), offsets, layer, node, registry)


def _with_offsets(result: Carried, offsets: list[Offset], layer, node, registry) -> Carried:
    for offset in offsets:
        label = ComponentLabel(offset.name, offset.kind, layer, None, None, node.name)
        constant = Carried([registry.new(label)], _unsqueeze(offset.value))
        result = _merge_sum(result, constant, 1.0)
    return result


def _unsqueeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.unsqueeze(0)
    return type(value)(_unsqueeze(v) if v is not None else None for v in value)


def _merge_sum(a: Carried, b: Carried, sign: float) -> Carried:
    """Row-aligned ``a + sign * b``; tuple values (e.g. MHA's (out, None)) merge their first item."""
    if not isinstance(a.values, torch.Tensor):
        merged = _merge_sum(Carried(a.ids, a.values[0]), Carried(b.ids, b.values[0]), sign)
        return Carried(merged.ids, (merged.values,) + tuple(a.values[1:]))
    ids = list(a.ids) + [i for i in b.ids if i not in set(a.ids)]
    position = {i: k for k, i in enumerate(ids)}
    shape = torch.broadcast_shapes(a.values.shape[1:], b.values.shape[1:])
    if len(ids) == len(a.ids) + len(b.ids) and a.values.shape[1:] == shape and b.values.shape[1:] == shape:
        return Carried(ids, torch.cat([a.values, b.values * sign if sign != 1.0 else b.values]))
    out = a.values.new_zeros((len(ids),) + tuple(shape))
    out[[position[i] for i in a.ids]] += a.values.expand(len(a.ids), *shape)
    out[[position[i] for i in b.ids]] += sign * b.values.expand(len(b.ids), *shape)
    return Carried(ids, out)


def _constant_operand(value: Any, operand: Any, node: fx.Node, layer, registry,
                      like: torch.Tensor | None = None) -> Carried:
    """A non-image tensor or number added on the trunk becomes a constant component."""
    name = parameter_name(operand) or f"{module_path(node) or node.name}:{node.name}.constant"
    kind = "constant" if parameter_name(operand) else "bias"
    label = ComponentLabel(name, kind, layer, None, None, node.name)
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(
        value, dtype=like.dtype if like is not None else None, device=like.device if like is not None else None)
    return Carried([registry.new(label)], tensor.unsqueeze(0))


def _additive(gm, node, kind, real, carried, layer, registry) -> Carried:
    """add / sub / cat / stack (and jointly affine opaque ops) of several carried values."""
    if kind == OpKind.ADDITIVE and is_binary_additive(node):
        operands = []
        for position, operand in enumerate(node.args[:2]):
            if isinstance(operand, fx.Node) and operand in carried:
                operands.append(carried[operand])
            else:
                value = real[operand] if isinstance(operand, fx.Node) else operand
                like = next(carried[n].values for n in node.all_input_nodes if n in carried)
                operands.append(_constant_operand(value, operand, node, layer, registry, like))
        result = operands[0]
        for position, operand in enumerate(operands[1:], start=1):
            result = _merge_sum(result, operand, additive_sign(node, position))
        return result
    return _zero_filled(gm, node, real, carried, layer, registry)


def _zero_filled(gm, node, real, carried, layer, registry) -> Carried:
    """Linear multi-input op: each component runs with zeros in the inputs it is absent from."""
    operand_nodes = [n for n in node.all_input_nodes if n in carried]
    constants = []
    if op_kind(node, gm) == OpKind.ADDITIVE:  # cat / stack: constant pieces become components
        pieces = node.args[0] if isinstance(node.args[0], (list, tuple)) else node.args
        constants = [p for p in pieces if isinstance(p, fx.Node) and p not in carried
                     and isinstance(real.get(p), torch.Tensor)]
    sources: dict[fx.Node, Carried] = {n: carried[n] for n in operand_nodes}
    for piece in constants:
        sources[piece] = _constant_operand(real[piece], piece, node, layer, registry)
    ids: list[int] = []
    for source in sources.values():
        ids += [i for i in source.ids if i not in ids]
    position = {i: k for k, i in enumerate(ids)}
    aligned = {}
    for n, source in sources.items():
        full = source.values.new_zeros((len(ids),) + tuple(real[n].shape))
        full[[position[i] for i in source.ids]] = source.values.expand(len(source.ids), *real[n].shape)
        aligned[n] = full
    evaluate = Evaluator(gm, node, real)
    values = evaluate.over_components(aligned)
    offsets = []
    if op_kind(node, gm) != OpKind.ADDITIVE:
        at_zero = evaluate({n: torch.zeros_like(real[n]) for n in aligned})
        if bool(at_zero.any()):
            values = values - at_zero
            offsets.append(Offset(at_zero, f"{module_path(node) or node.name}:{node.name}.offset"))
    return _with_offsets(Carried(ids, values), offsets, layer, node, registry)
