"""Graph analysis: the residual trunk, the branches, and where components are born.

Walking backwards from the representation node:

* a **trunk** node is on the residual stream. Every trunk op must be linear once
  data-dependent scalars are frozen (norm scales, attention weights).
* at an addition on the trunk, each data operand is tested against the nearest
  node both operands come from (the fork): an operand that reaches the fork
  through affine ops only is **stream** (stays on the trunk); one that does not
  is a **branch**. Operand order and module names play no part.
* a **carry** node is inside a branch, between the component's birth and the
  residual add; it must be linear too (frozen norm scales allowed).
* the **birth** of a branch is its last data-dependent product or nonlinearity
  (attention ``A @ V`` or SDPA, an activation, a gate product).
* a nonlinearity on the trunk before the first residual add (a ``tanh``
  pre-logits head) moves the decomposed representation to its input; one after
  residual adds with further residual adds upstream is an error; one with no
  residual add upstream (a convolutional stem) is the birth of the embedding.
"""
from __future__ import annotations

import enum
import heapq
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .graph_analysis import GraphAnalysis
from .ops import OpKind, attention_value_input, product_positions
from .probe import Probe
from .tracing import describe, module_path, module_stack
from .vocabulary import ComponentKind


class Role(enum.Enum):
    TRUNK = "trunk"
    CARRY = "carry"
    BIRTH = "birth"


class NonlinearTrunkError(ValueError):
    """A nonlinear operation sits on the residual trunk between residual blocks."""


@dataclass
class Birth:
    """Where a component (or a group of head/token components) is born."""

    node: fx.Node
    kind: ComponentKind          # EMBEDDING, ATTENTION or BRANCH
    join: fx.Node | None         # residual add where the branch enters the trunk
    name: str = ""               # module path naming the component
    layer: int | None = None     # index of the residual block it joins
    note: str | None = None      # what it holds when that is not what its name says (a cut trunk)
    axes: Any = None             # an attention birth's head_axes.AttentionAxes (set when planning)


@dataclass
class TrunkPlan:
    """Roles of the graph nodes for one input signature."""

    target: fx.Node                          # node whose value is decomposed
    roles: dict[fx.Node, Role]
    births: dict[fx.Node, Birth]
    joins: list[fx.Node]                     # residual adds, in graph order
    branch_of: dict[fx.Node, fx.Node] = field(default_factory=dict)  # carry/birth node -> its join
    stopped_before: fx.Node | None = None    # nonlinearity after the target, if any
    layer_of_join: dict[fx.Node, int] = field(default_factory=dict)
    passthrough: set[fx.Node] = field(default_factory=set)  # ops that return their input (dropout in eval)

    def layer(self, node: fx.Node) -> int | None:
        """Residual block index of the branch ``node`` belongs to (None on the trunk)."""
        join = self.branch_of.get(node)
        return None if join is None else self.layer_of_join[join]

    def describe_stop(self) -> str | None:
        return describe(self.stopped_before) if self.stopped_before is not None else None


class _Retarget(Exception):
    def __init__(self, nonlinear: fx.Node, new_target: fx.Node):
        super().__init__(nonlinear.name)
        self.nonlinear, self.new_target = nonlinear, new_target


def plan_trunk(gm: fx.GraphModule, probe: Probe, cut_nonlinear_trunk: bool = False) -> TrunkPlan:
    """Assign trunk / carry / birth roles, moving the target before a nonlinear head.

    cut_nonlinear_trunk: a nonlinear op between residual blocks (hybrid stems, nonlinear
    downsampling) becomes the birth of an 'embedding' component instead of an error.
    """
    analysis = GraphAnalysis(gm, probe, cut_nonlinear_trunk)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    target = output.args[0]
    if isinstance(target, (tuple, list)):
        target = target[0]
    if not probe.is_data(target) or not isinstance(probe.values[target], torch.Tensor):
        raise ValueError("the model's output is not an image-dependent tensor; nothing to decompose")
    stopped_before = None
    while True:
        try:
            plan = _walk(analysis, target)
        except _Retarget as retarget:
            stopped_before = retarget.nonlinear
            target = retarget.new_target
            continue
        plan.stopped_before = stopped_before
        plan.passthrough = {n for n in probe.passthrough if n in plan.roles and plan.roles[n] is not Role.BIRTH}
        _name_births(plan, analysis)
        return plan


def _walk(analysis: GraphAnalysis, target: fx.Node) -> TrunkPlan:
    """Assign roles in reverse graph order, so every consumer's request is in before a node is
    decided. A node asked for as trunk by one consumer and as carry by another (a branch that
    contains an affine copy of the stream, two streams feeding each other) is trunk: its
    components are the stream's, which the branch then carries along."""
    roles: dict[fx.Node, Role] = {}
    births: dict[fx.Node, Birth] = {}
    joins: list[fx.Node] = []
    branch_of: dict[fx.Node, fx.Node] = {}
    order = analysis.order
    requests: dict[fx.Node, tuple[Role, fx.Node | None, bool]] = {}
    heap: list[tuple[int, fx.Node]] = []

    def request(node: fx.Node, role: Role, join: fx.Node | None, below_residual: bool) -> None:
        current = requests.get(node)
        if current is None:
            requests[node] = (role, join, below_residual)
            heapq.heappush(heap, (-order[node], id(node), node))
        elif current[0] is Role.CARRY and role is Role.TRUNK:
            requests[node] = (role, join, below_residual or current[2])
        else:
            requests[node] = (current[0], current[1], current[2] or below_residual)

    request(target, Role.TRUNK, None, False)
    while heap:
        node = heapq.heappop(heap)[2]
        role, join, below_residual = requests[node]
        if not analysis.probe.is_data(node):
            continue
        if node.op == "placeholder":
            roles[node] = Role.BIRTH
            births[node] = Birth(node, ComponentKind.EMBEDDING, None)
            continue
        if role is Role.TRUNK:
            pushed = _trunk_step(analysis, node, join, below_residual, joins)
        else:
            pushed = _carry_step(analysis, node, join)
        if pushed is None:  # the node is a birth
            kind = _birth_kind(analysis, node) if role is Role.CARRY else ComponentKind.EMBEDDING
            roles[node] = Role.BIRTH
            births[node] = Birth(node, kind, join, note=_cut_note(analysis, node) if role is Role.TRUNK else None)
            continue
        roles[node] = role
        if role is Role.CARRY:
            branch_of[node] = join
        for item in pushed:
            request(*item)
    for node, birth in births.items():
        if birth.join is not None:
            branch_of[node] = birth.join
    joins.sort(key=order.__getitem__)
    return TrunkPlan(target, roles, births, joins, branch_of)


def _trunk_step(analysis: GraphAnalysis, node: fx.Node, join, below_residual: bool, joins: list):
    """Inputs to visit from a trunk node; ``None`` makes the node an embedding birth."""
    kind = analysis.kind(node)
    inputs = analysis.data_inputs(node)
    if kind == OpKind.ADDITIVE and len(inputs) >= 2:
        fork = analysis.fork(inputs)
        affine = [fork is not None and analysis.affine_path(fork, i) for i in inputs]
        if all(affine):
            return [(i, Role.TRUNK, join, below_residual) for i in inputs]
        if not any(affine) and fork is not None and analysis.has_residual_upstream(fork):
            streams = [_sums_residual_blocks(analysis, i, {}) for i in inputs]
            affine = streams if any(streams) else [i is _nonlinear_shortcut(analysis, node, fork, inputs)
                                                   for i in inputs]
        joins.append(node)
        return [(i, Role.TRUNK, join, True) if a else (i, Role.CARRY, node, True)
                for i, a in zip(inputs, affine)]
    linear = analysis.linear_inputs(node)
    if linear is not None:
        return [(i, Role.TRUNK, join, below_residual) for i in linear]
    if kind == OpKind.PRODUCT and inputs:
        carrier = _frozen_product_carrier(analysis, node, inputs)
        if carrier is not None:
            return [(carrier, Role.TRUNK, join, below_residual)]
    if kind == OpKind.ATTENTION:
        value = attention_value_input(node)
        return [(value, Role.TRUNK, join, below_residual)] if analysis.probe.is_data(value) else []
    if kind == OpKind.UNKNOWN and len(inputs) > 1:
        carrier = _single_affine_input(analysis, node, inputs)
        if carrier is not None:
            return [(carrier, Role.TRUNK, join, below_residual)]
    # a nonlinearity on the trunk
    if not below_residual:
        if node.op == "call_module":  # an opaque module may hide residual blocks: do not skip it
            raise NonlinearTrunkError(
                f"the representation is computed by {describe(node)}, a module torch.fx could not trace "
                "and that is not affine, so nothing before it can be decomposed. Make it traceable "
                "(no Python control flow on tensor values) or decompose an earlier output.")
        if len(inputs) != 1:
            raise NonlinearTrunkError(
                f"the representation ends in {describe(node)}, a nonlinear op of several inputs; "
                "decompose an earlier output (output='pre_logits') instead")
        raise _Retarget(node, inputs[0])
    if analysis.has_residual_upstream(node) and not analysis.cut_nonlinear_trunk:
        raise NonlinearTrunkError(
            f"{describe(node)} is a nonlinear op on the residual trunk between residual blocks, so "
            "the representation is not a sum of block contributions. Pass "
            "trace_and_decompose(model, cut_nonlinear_trunk=True) to decompose only what follows it "
            "(everything before becomes one 'embedding' component named after its module).")
    return None


def _cut_note(analysis: GraphAnalysis, node: fx.Node) -> str | None:
    """What an embedding born at a nonlinear op after residual blocks holds (``cut_nonlinear_trunk``)."""
    if node.op == "placeholder" or not analysis.has_residual_upstream(node):
        return None
    return (f"everything before {describe(node)}, a nonlinear op on the residual trunk: the blocks before it "
            "are not decomposed (cut_nonlinear_trunk=True)")


def _nonlinear_shortcut(analysis: GraphAnalysis, add: fx.Node, fork: fx.Node, inputs: list[fx.Node]) -> fx.Node:
    """The shortcut of a residual add none of whose operands reaches the fork affinely (Hiera's
    ``max-pool(proj(norm(x))) + attn(norm(x))``), with residual blocks before the fork.

    Read as a new trunk, the add would make everything before the fork one silent "branch". Like any
    nonlinear op between residual blocks this is an error, unless ``cut_nonlinear_trunk``: then the
    operand with the fewest nonlinear ops after the fork is the shortcut, and its nonlinear op becomes
    the cut (an ``embedding`` component holding everything before it). Operands equally far from
    affine are refused: which one is the shortcut would be a guess.
    """
    depths = [_nonlinear_depth(analysis, fork, i, {}) for i in inputs]
    fewest = min(depths)
    shortcut = inputs[depths.index(fewest)] if depths.count(fewest) == 1 else None
    ops = ", ".join(describe(_last_nonlinear(analysis, fork, i)) for i in inputs)
    if not analysis.cut_nonlinear_trunk:
        raise NonlinearTrunkError(
            f"{describe(add)} is a residual add none of whose operands reaches {describe(fork)} through affine "
            f"ops (they end in {ops}): a nonlinear op sits on the shortcut between residual blocks, so the "
            "representation is not a sum of block contributions. Pass trace_and_decompose(model, "
            "cut_nonlinear_trunk=True) to decompose only what follows it (everything before becomes one "
            "'embedding' component).")
    if shortcut is None:
        raise NonlinearTrunkError(
            f"{describe(add)}: none of its operands reaches {describe(fork)} through affine ops, and they are "
            f"equally far from it (they end in {ops}), so which one is the residual shortcut cannot be told; "
            "decompose an earlier output or make the shortcut affine.")
    return shortcut


def _sums_residual_blocks(analysis: GraphAnalysis, node: fx.Node, memo: dict) -> bool:
    """Whether ``node`` is a residual stream: linear steps back from it reach a residual add (TNT's patch
    stream, to which the pixel stream is added, reaches the fork through its blocks' branches only)."""
    if node not in memo:
        memo[node] = False
        if _is_linear_step(analysis, node):
            memo[node] = analysis.is_residual_add(node) or any(
                _sums_residual_blocks(analysis, i, memo) for i in analysis.data_inputs(node))
    return memo[node]


def _nonlinear_depth(analysis: GraphAnalysis, fork: fx.Node, node: fx.Node, memo: dict) -> int:
    """Most nonlinear ops on any path from ``fork`` to ``node`` (affine ops and frozen norms count 0)."""
    if node is fork or analysis.affine_path(fork, node):
        return 0
    if node not in memo:
        upstream = [n for n in analysis.data_inputs(node) if analysis.depends_on(n, fork)]
        deepest = max((_nonlinear_depth(analysis, fork, n, memo) for n in upstream), default=0)
        memo[node] = deepest + (0 if _is_linear_step(analysis, node) else 1)
    return memo[node]


def _is_linear_step(analysis: GraphAnalysis, node: fx.Node) -> bool:
    """Linear in its data inputs (weights frozen): additive, affine, a norm, a linear map or convolution."""
    kind = analysis.kind(node)
    if kind == OpKind.PRODUCT:
        inputs = analysis.data_inputs(node)
        return len(inputs) == 1 and analysis._is_linear_position(node, inputs[0], product_positions(node))
    return kind in (OpKind.ADDITIVE, OpKind.AFFINE, OpKind.NORM)


def _last_nonlinear(analysis: GraphAnalysis, fork: fx.Node, node: fx.Node) -> fx.Node:
    """The nonlinear op nearest to ``node`` on its way back to ``fork`` (for error messages)."""
    while _is_linear_step(analysis, node):
        upstream = [n for n in analysis.data_inputs(node)
                    if analysis.depends_on(n, fork) and not analysis.affine_path(fork, n)]
        if not upstream:
            break
        node = upstream[0]
    return node


def _frozen_product_carrier(analysis: GraphAnalysis, node: fx.Node, inputs: list[fx.Node]) -> fx.Node | None:
    """For ``x * s``, ``x / s`` or ``A @ V`` on the trunk: the operand kept linear.

    With one data operand it is that operand. With two, the one that reaches
    their fork affinely is kept and the other (a norm scale, attention weights)
    is frozen at its real value.
    """
    positions = product_positions(node)
    candidates = [i for i in inputs if analysis._is_linear_position(node, i, positions)]
    if len(inputs) == 1:
        return candidates[0] if candidates else None
    fork = analysis.fork(inputs)
    if fork is None:
        return None
    affine = [i for i in inputs if analysis.affine_path(fork, i)]
    if len(affine) == 1 and affine[0] in candidates:
        return affine[0]
    return None


def _single_affine_input(analysis: GraphAnalysis, node: fx.Node, inputs: list[fx.Node]) -> fx.Node | None:
    affine = [i for i in inputs if analysis.is_affine_in(node, (i,))]
    if len(affine) != 1:
        return None
    fork = analysis.fork(inputs)
    return affine[0] if fork is not None and analysis.affine_path(fork, affine[0]) else None


def _carry_step(analysis: GraphAnalysis, node: fx.Node, join: fx.Node):
    """Inputs to visit from a node inside a branch; ``None`` makes it the birth."""
    kind = analysis.kind(node)
    inputs = analysis.data_inputs(node)
    linear = analysis.linear_inputs(node)
    if linear is not None and inputs:
        return [(i, Role.CARRY, join, True) for i in linear]
    if kind == OpKind.PRODUCT and len(inputs) == 1 and analysis._is_linear_position(
            node, inputs[0], product_positions(node)):
        return [(inputs[0], Role.CARRY, join, True)]
    return None


MATRIX_PRODUCTS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}


def _birth_kind(analysis: GraphAnalysis, node: fx.Node) -> ComponentKind:
    """``attention`` for fused attention or a matrix product of two data tensors (weights @ values)."""
    kind = analysis.kind(node)
    if kind == OpKind.ATTENTION or (kind == OpKind.PRODUCT and node.target in MATRIX_PRODUCTS
                                    and len(analysis.data_inputs(node)) == 2):
        return ComponentKind.ATTENTION
    return ComponentKind.BRANCH


def _name_births(plan: TrunkPlan, analysis: GraphAnalysis) -> None:
    """Name each birth by the outermost module whose output lies in its branch.

    ``blocks.3.mlp`` for a GELU born in ``blocks.3.mlp.act`` whose module output
    (``fc2``'s dropout) is carried to the residual add; layers number the
    residual blocks (module of the residual add) in graph order.
    """
    last_node: dict[str, fx.Node] = {}
    for node in analysis.gm.graph.nodes:
        for path in module_stack(node) + ([module_path(node)] if node.op == "call_module" else []):
            last_node[path] = node
    in_branch = {n for n, r in plan.roles.items() if r is not Role.TRUNK}
    block_layers: dict[str, int] = {}
    for join in plan.joins:
        block_layers.setdefault(module_path(join) or join.name, len(block_layers))
        plan.layer_of_join[join] = block_layers[module_path(join) or join.name]
    for node, birth in plan.births.items():
        stack = module_stack(node) + ([module_path(node)] if node.op == "call_module" else [])
        name = next((p for p in stack if last_node.get(p) in in_branch), None)
        if node.op == "placeholder":  # the image: named by the module that first reads it
            first = min((u for u in node.users if u in plan.roles), key=analysis.order.__getitem__, default=None)
            name = module_path(first) if first is not None else None
        birth.name = name or module_path(node) or node.name
        if birth.join is not None:
            birth.layer = plan.layer_of_join[birth.join]
