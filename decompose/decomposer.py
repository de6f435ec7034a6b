"""``trace_and_decompose(model)``: trace once, decompose any batch."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from tracer.composed_supports import SupportChain
from tracer.head_axes import plan_attention_axes
from tracer.positions import attention_key_positions, fork_of, support_positions, value_input
from tracer.probe import ModelRunError, run_probe
from tracer.recording import check
from tracer.relevance import CompactPlan, plan_compaction
from tracer.roles import TrunkPlan, plan_trunk
from tracer.tracing import describe, frozen_eval_copy, trace_representation
from tracer.vocabulary import ComponentKind, Level

from .births import LEVELS
from .carried import Carried, Chunk, ComponentRegistry
from .compiled import CallPath, RecordedGraphs
from .decomposition import Decomposition
from .directions import Directions, as_directions
from .pooling import Parking, branches_for_level, early_pooling_for, pooled_components
from .precision import Float64Values, in_float64, restored
from .propagate import propagate
from .run_plan import RunPlan
from .scoring import (
    Projection,
    check_direction,
    score_by_adjoints,
    with_check_direction,
    without_check_direction,
)
from .sum_check import (
    FirstInexactNode,
    InexactSum,
    check_sum,
    describe_first_inexact,
    direction_errors,
    image_errors,
    tolerance_for,
)

# ``trace_and_decompose``'s ``graphs`` when not given (the test suite's ``--graphs`` option sets it)
GRAPHS_BY_DEFAULT = False


class Decomposer(nn.Module):
    """Callable module: ``decomposer(images, level="head") -> Decomposition``.

    Holds an eval-mode copy of the model traced with torch.fx; the user's model is
    never modified. Graph roles are analysed once per input shape and dtype. Every call checks that
    the components sum to the representation (``decompose.sum_check``).
    """

    def __init__(self, model: nn.Module, output: str = "pre_logits", prune: bool = True,
                 cut_nonlinear_trunk: bool = False, sum_tolerance: float | None = None,
                 on_inexact_sum: InexactSum | str = InexactSum.RAISE, graphs: bool = False):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"trace_and_decompose expects a torch.nn.Module, got {type(model).__name__}")
        if on_inexact_sum not in {mode.value for mode in InexactSum}:
            raise ValueError(f"on_inexact_sum must be one of {[mode.value for mode in InexactSum]}, "
                             f"got {on_inexact_sum!r}")
        if sum_tolerance is not None and not sum_tolerance >= 0:
            raise ValueError(f"sum_tolerance must be a number >= 0 (or None for the dtype's default), "
                             f"got {sum_tolerance!r}")
        started = time.perf_counter()
        self.output = output
        self.prune = prune
        self.cut_nonlinear_trunk = cut_nonlinear_trunk
        self.sum_tolerance = sum_tolerance
        self.on_inexact_sum = InexactSum(on_inexact_sum)
        self.graph_module, self.opaque_modules = trace_representation(frozen_eval_copy(model), output)
        self.trace_seconds = time.perf_counter() - started
        self._plans: dict[tuple, RunPlan] = {}
        self.graphs = RecordedGraphs() if graphs else None
        self._expected_input = _expected_input_size(model)
        config = getattr(model, "pretrained_cfg", None)
        self.pretrained_cfg = dict(config) if isinstance(config, dict) else None  # preprocessing

    def plan(self, images: torch.Tensor) -> RunPlan:
        """Roles of the graph nodes for inputs shaped like ``images`` (cached)."""
        signature = (tuple(images.shape[1:]), images.dtype, images.device.type)
        if signature not in self._plans:
            try:
                probe = run_probe(self.graph_module, images[:1])
            except ModelRunError as error:
                hint = (f" Its pretrained_cfg gives input_size [B, {', '.join(map(str, self._expected_input))}]"
                        " (models created with another img_size expect that size)." if self._expected_input else "")
                raise ValueError(f"{error}.{hint}") from error
            plan = plan_trunk(self.graph_module, probe, self.cut_nonlinear_trunk)
            attention_axes_for(self.graph_module, plan, probe)
            output = probe.values.get(plan.target)
            plan = RunPlan(plan, images[:1].detach().clone(),  # the probe's values are not kept
                           output_shape=tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ())
            if self.prune:
                plan.compact = compaction_for(self.graph_module, plan, probe, images[:1])
                plan.pooling = early_pooling_for(self.graph_module, plan, probe, images[:1])
            self._plans[signature] = plan
        return self._plans[signature]

    def output_width(self, images: torch.Tensor) -> int:
        """Numbers per image of the decomposed output for inputs shaped like ``images`` (what a direction's
        length must be)."""
        return math.prod(self.plan(images).output_shape)

    def key_positions(self, plan: RunPlan) -> dict:
        """Attention birth -> the source position of each of its keys (computed once per plan, at the first
        call that needs them: level token, attention maps)."""
        if plan.key_positions is None:
            probe = run_probe(self.graph_module, plan.probe_image)
            plan.key_positions = key_positions_for(self.graph_module, plan, probe, plan.probe_image)
        return plan.key_positions

    @torch.no_grad()
    def forward(self, images: torch.Tensor, level: Level | str = Level.HEAD,
                directions: Directions | torch.Tensor | None = None) -> Decomposition:
        """Decompose a batch ``images`` [B, C, H, W] into ``Decomposition.components`` [C, B, *D].

        directions: ``[k, D]`` shared by every component, or a ``decompose.directions.Directions`` (per
                    component, per image: ``per_image``): the result holds ``scores`` [C, B, k] = ⟨component,
                    u⟩ instead of the vectors, never allocating ``[C, B, D]``."""
        _check_images(images, self.graph_module, self._expected_input)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {[str(known) for known in LEVELS]}, got {level!r}")
        level = Level(level)
        table = as_directions(directions) if directions is not None else None  # bad directions fail first
        if self.graphs is not None:
            return self.graphs.decompose(self, images, level, table, directions)
        return self.interpret(images, level, table)

    @property
    def last_path(self) -> CallPath:
        """Which path the last call ran: a recorded graph, or the interpreter (always, without ``graphs``)."""
        return self.graphs.last_path if self.graphs is not None else CallPath.INTERPRETER

    @torch.no_grad()
    def interpret(self, images: torch.Tensor, level: Level, table: Directions | None) -> Decomposition:
        """``forward`` by walking the fx graph node by node (the interpreter), for checked arguments."""
        plan = self.plan(images)
        positions = self.key_positions(plan) if level is Level.TOKEN else None
        if table is not None:
            return self._scores(plan, images, level, table, positions)
        representation, components, labels = self._components(plan, images, level, positions)
        return self.checked(plan, images, level, representation, components, labels)

    def _components(self, plan: RunPlan, images: torch.Tensor, level: Level, positions: dict | None
                    ) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(representation [B, *D], components [C, B, *D], their C labels) of ``images``: the pass, with no
        check (``decompose.compiled`` records it as one graph)."""
        registry = ComponentRegistry()
        parking = _parking(plan, level)
        representation, carried = propagate(self.graph_module, plan, images, level, registry,
                                            compact=plan.compact, positions=positions, parking=parking)
        if parking is not None:
            carried = pooled_components(self.graph_module, plan.pooling, parking, carried)
        ids, components = carried.drain()  # in creation order: stable labels
        return representation, components, [registry.labels[i] for i in ids]

    def checked(self, plan: RunPlan, images: torch.Tensor, level: Level, representation: torch.Tensor,
                components: torch.Tensor, labels: list) -> Decomposition:
        """The ``Decomposition`` of a components pass once its sum is checked (``check_sum``)."""
        error = check_sum(components.sum(0), representation, what=f"{self.output} output, {describe(plan.target)}",
                          tolerance=tolerance_for(representation.dtype, self.sum_tolerance),
                          on_inexact=self.on_inexact_sum,
                          diagnose=lambda image: self._first_inexact_node(plan, images[image: image + 1], level))
        return Decomposition(components, labels, representation, level, plan.target.name,
                             plan.describe_stop(), sum_error=error)

    def compiled(self, level: Level | str, example_images: torch.Tensor,
                 directions: Directions | torch.Tensor | None = None):
        """The decomposition at ``level`` of images shaped like ``example_images`` as one ``torch.fx`` graph
        (``decompose.compiled.DecompositionGraph``): ``graph(images) -> (representation, components)``,
        ``graph.decompose(images) -> Decomposition`` (the sum checked), ``graph.labels``. With ``directions``
        it records the scores along them (``forward``'s ``directions``), which become constants of the graph:
        other directions need another recording."""
        from .compiled import compile_decomposition

        return compile_decomposition(self, level, example_images, directions)

    def _scores(self, plan: RunPlan, images: torch.Tensor, level: Level, directions: Directions,
                positions: dict | None) -> Decomposition:
        """``forward`` with directions (``decompose.scoring``)."""
        width = math.prod(plan.output_shape)
        directions = directions.checked(width, images, images.shape[0])
        checked = with_check_direction(directions, width, images)
        representation, scores, labels = self._score_pass(plan, images, level, checked, positions)
        return self.checked_scores(plan, images, level, checked, representation, scores, labels)

    def _score_pass(self, plan: RunPlan, images: torch.Tensor, level: Level, checked: Directions,
                    positions: dict | None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(representation [B, *D], scores [C, B, k + 1], their C labels) along ``checked`` (the directions
        and the check column, ``with_check_direction``): the pass, its final sum not checked
        (``decompose.compiled`` records it as one graph)."""
        if plan.pooling is None:
            scored = score_by_adjoints(
                self.graph_module, plan, images, level, checked, positions,
                check_sum=lambda total, representation: check(
                    lambda: self._check_branch_sum(plan, images, level, total, representation),
                    "scoring.score_by_adjoints: the branch-level components' sum"))
            return scored.representation, scored.scores, scored.labels
        registry, parking = ComponentRegistry(), _parking(plan, level)
        representation, carried = propagate(self.graph_module, plan, images, level, registry,
                                            compact=plan.compact, positions=positions, parking=parking)
        carried = pooled_components(self.graph_module, plan.pooling, parking, carried,
                                    project=Projection(checked, registry))
        ids, scores = carried.drain()
        return representation, scores, [registry.labels[i] for i in ids]

    def _check_branch_sum(self, plan: RunPlan, images: torch.Tensor, level: Level, total: torch.Tensor,
                          representation: torch.Tensor) -> None:
        check_sum(total, representation, what=f"{self.output} output, {describe(plan.target)}",
                  tolerance=tolerance_for(images.dtype, self.sum_tolerance), on_inexact=self.on_inexact_sum,
                  diagnose=lambda image: self._first_inexact_node(plan, images[image: image + 1], level))

    def checked_scores(self, plan: RunPlan, images: torch.Tensor, level: Level, checked: Directions,
                       representation: torch.Tensor, scores: torch.Tensor, labels: list) -> Decomposition:
        """The ``Decomposition`` of a scores pass once the scores along the check direction (the last
        column of ``scores`` [C, B, k + 1]) are checked to sum to the representation's."""
        what = f"{self.output} output, {describe(plan.target)}"

        def diagnose(image: int) -> str:
            if plan.pooling is None:  # the branch-level sum was checked: the pull-back is what failed
                return ("The branch-level components sum to the output (checked in the same pass), so scoring "
                        "the finer components from the births' adjoints is where the sum breaks.")
            return self._first_inexact_node(plan, images[image: image + 1], level)

        along = scores[..., -1].sum(0)
        error = check_sum(along, representation, what=what + " along a random direction",
                          tolerance=tolerance_for(images.dtype, self.sum_tolerance), on_inexact=self.on_inexact_sum,
                          diagnose=diagnose, errors=direction_errors(along, representation, check_direction(checked)))
        return Decomposition(None, labels, representation, level, plan.target.name, plan.describe_stop(),
                             sum_error=error, scores=scores[..., :-1], directions=without_check_direction(checked))

    def _first_inexact_node(self, plan: RunPlan, image: torch.Tensor, level: Level) -> str:
        """Where a sum breaks: ``image`` [1, C, H, W] decomposed again in float64 without early pooling,
        each node's components compared with its real value."""
        hook = FirstInexactNode(plan.compact.slices if plan.compact is not None else {})
        try:
            with in_float64(self.graph_module):
                representation, carried = propagate(
                    self.graph_module, plan, image.double(), level, ComponentRegistry(), compact=plan.compact,
                    positions=plan.key_positions if level is Level.TOKEN else None, on_value=hook)
                total = carried.drain()[1].sum(0)
            error = float(image_errors(total, representation)[0])
        except Exception as failure:  # the diagnosis must not hide the error it explains
            return f"(Looking for the node where it breaks failed: {type(failure).__name__}: {failure}.)"
        return describe_first_inexact(hook.found, error, pooled=plan.pooling is not None)


def _parking(plan: RunPlan, level: Level) -> Parking | None:
    """The early pooling's run inside one components pass (None: the plan pools nothing)."""
    if plan.pooling is None:
        return None
    return Parking(plan.pooling.nodes, branches=branches_for_level(plan.pooling.branches, level),
                   static=plan.pooling.static, reference=plan.pooling.reference,
                   norm_scales=plan.pooling.norm_scales, rows=plan.rows)


def trace_and_decompose(model: nn.Module, output: str = "pre_logits", prune: bool = True,
                        cut_nonlinear_trunk: bool = False, sum_tolerance: float | None = None,
                        on_inexact_sum: InexactSum | str = InexactSum.RAISE, graphs: bool | None = None
                        ) -> Decomposer:
    """Trace ``model`` once and return a ``Decomposer``.

    output: ``"pre_logits"`` (timm's ``num_classes=0`` features; open_clip image towers
            give their embedding) or ``"logits"`` (the classifier output).
    prune:  compute each component only where it can reach the output (e.g. the class
            token row); ``False`` computes every position (same result, slower).
    cut_nonlinear_trunk: for models with a nonlinear op between residual blocks (hybrid CNN
            stems, nonlinear downsampling): everything up to the last such op becomes one
            ``embedding`` component named after its module, instead of an error.
    sum_tolerance: largest relative error ‖Σ components − representation‖ / ‖representation‖ of any
            image that a call accepts (None: 1e-4 in float32, 1e-10 in float64, 1e-2 in half precision).
    on_inexact_sum: ``"raise"`` (default) an ``InexactSumError`` naming the error and the first node
            where the components stop summing to its value; ``"warn"``: the same as a warning, and the
            inexact result.
    graphs: run each call as a recorded graph (``decompose.compiled``): the first call of an input shape,
            dtype, device, level and directions records it, later ones run it. Where a value of the batch
            decides what the pass computes, that signature falls back to the interpreter with a
            ``GraphFallbackWarning``; ``decomposer.last_path`` says which path the last call ran.
    """
    return Decomposer(model, output=output, prune=prune, cut_nonlinear_trunk=cut_nonlinear_trunk,
                      sum_tolerance=sum_tolerance, on_inexact_sum=on_inexact_sum,
                      graphs=GRAPHS_BY_DEFAULT if graphs is None else graphs)


def relevance_masks(gm, plan: TrunkPlan, image: torch.Tensor) -> dict:
    """node -> bool mask of the elements of its value that reach the output (one image)."""
    perturbations: dict = {}

    def perturb(node, carried: Carried) -> Carried:
        first = carried.chunks[0]
        if isinstance(first.values, torch.Tensor) and first.values.is_floating_point():
            values = first.values
            delta = torch.zeros(values.shape[1:], dtype=values.dtype, device=values.device, requires_grad=True)
            perturbations[node] = delta
            return Carried([Chunk(first.ids, values + delta)] + carried.chunks[1:])
        return carried

    with torch.enable_grad():
        target, out = propagate(gm, plan, image, Level.BRANCH, ComponentRegistry(), on_carried=perturb)
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(target.shape, generator=generator, dtype=torch.float64, device="cpu").to(target)
        (out.stacked().sum(0) * direction).sum().backward()
    return {node: (delta.grad != 0) if delta.grad is not None
            else torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
            for node, delta in perturbations.items()}


def attention_axes_for(gm, plan: TrunkPlan, probe) -> None:
    """Set the head and window axes of every attention birth (``tracer.head_axes``), found in float64."""
    with torch.enable_grad(), in_float64(gm):
        found = plan_attention_axes(gm, plan, Float64Values(probe.values), probe.data_nodes)
    for node, axes in found.items():
        plan.births[node].axes = axes


def key_positions_for(gm, plan: TrunkPlan, probe, image: torch.Tensor) -> dict:
    """Attention birth -> position of each key, from one linear pass on ``image`` [1, C, H, W]."""
    births = [n for n, b in plan.births.items() if b.kind is ComponentKind.ATTENTION]
    forks = set()
    for birth in births:
        found = value_input(gm, birth)
        fork = fork_of(plan, found[0], probe.data_nodes) if found else None
        if fork is not None:
            forks.add(fork)
    with torch.enable_grad(), in_float64(gm) as original:  # exact integer codes need float64 gradients
        grid, fork_components = _fork_components(gm, plan, image.double(), forks)
        values = Float64Values(probe.values)
        grid_leaf = grid if grid is not None else image.double().requires_grad_(True)
        model_dtype: list = []

        def supports(fork, element_keys: torch.Tensor, keys: int) -> list | None:
            """Receptive-field positions from the same pass in the model's own dtype (only which
            gradients are zero matters there, and float64 convolutions are many times slower)."""
            with restored(original):
                if not model_dtype:
                    leaf, found = _fork_components(gm, plan, image, forks)
                    model_dtype.append((None if leaf is None else SupportChain(leaf), found))
                chain, found = model_dtype[0]
                if "embedding" not in found.get(fork, {}):   # (always so without a grid leaf)
                    return None
                carried, row = found[fork]["carried"]
                return support_positions(chain.key_centroids(carried, row, element_keys, keys))

        return attention_key_positions(gm, plan, values, probe.data_nodes, grid_leaf, fork_components,
                                       supports=supports)


GRID_PROBE = -2  # the key-positions pass carries the embedding's grid as a probe chunk (``carried.is_probe``)


def _fork_components(gm, plan: TrunkPlan, image: torch.Tensor, forks: set) -> tuple[torch.Tensor | None, dict]:
    """One linear pass (grad enabled): the embedding's grid leaf (None: the image is the grid) and
    fork -> {"embedding": the image's component there, "constants": {name: component}}."""
    captured: dict = {}
    embedding_birth = next((n for n, b in plan.births.items() if b.kind is ComponentKind.EMBEDDING), None)
    leaves: dict = {}

    def capture(node, carried: Carried) -> Carried:
        if node is embedding_birth and isinstance(carried.chunks[0].values, torch.Tensor):
            # the embedding's own value (the image, or a convolutional stem's output) is the grid; it
            # travels as the probe chunk, which is never stacked with other components, so that a
            # backward pass from a fork costs one component's ops, not every component's there
            leaf = carried.chunks[0].values.detach().clone().requires_grad_(True)
            leaves["grid"] = leaf
            ids = [GRID_PROBE] if len(carried.chunks[0].ids) == 1 else carried.chunks[0].ids
            carried = Carried([Chunk(ids, leaf)] + carried.chunks[1:])
        if node in forks:
            captured[node] = carried
        return carried

    registry = ComponentRegistry()
    propagate(gm, plan, image, Level.BRANCH, registry, on_carried=capture)
    grid = leaves.get("grid")
    fork_components = {}
    for fork, carried in captured.items():
        parts: dict = {"constants": {}}
        for chunk in carried.chunks:
            if not isinstance(chunk.values, torch.Tensor):
                continue
            for row, component in enumerate(chunk.ids):
                label = registry.labels[component] if component != GRID_PROBE else None
                if (label is None or label.kind is ComponentKind.EMBEDDING) and grid is not None and grid.dim() == 5:
                    # [1, B, C, H, W]
                    parts["embedding"] = chunk.values[row]
                    parts["carried"] = (chunk.values, row)      # the tensor it is a row of
                elif label is not None and label.kind is ComponentKind.CONSTANT:
                    parts["constants"][label.name] = chunk.values[row].detach()
        fork_components[fork] = parts
    return grid, fork_components


def compaction_for(gm, plan: TrunkPlan, probe, image: torch.Tensor) -> CompactPlan:
    masks = relevance_masks(gm, plan, image)
    carriers = [n for n in gm.graph.nodes if n in plan.roles]
    return plan_compaction(gm, carriers, masks, probe.values, set(plan.births))


def _expected_input_size(model: nn.Module) -> tuple | None:
    config: Any = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = config.get("input_size") if isinstance(config, dict) else None
    return tuple(size) if size else None


def _check_images(images: Any, gm: nn.Module, expected: tuple | None) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        hint = f" (e.g. [B, {', '.join(map(str, expected))}])" if expected else ""
        raise ValueError(f"images must be a 4-D batch [B, C, H, W]{hint}, got shape {tuple(images.shape)}; "
                         "add a batch axis with images.unsqueeze(0) for a single image")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised pixels), got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"images contain NaN or inf values (batch indices {bad}); clean the input first")
    parameter = next(gm.parameters(), None)
    if parameter is not None and parameter.dtype != images.dtype:
        raise ValueError(f"images are {images.dtype} but the model is {parameter.dtype}; "
                         f"convert with images.to({parameter.dtype}) or model.to({images.dtype}) "
                         "before trace_and_decompose")
    if parameter is not None and parameter.device != images.device:
        raise ValueError(f"images are on {images.device} but the model is on {parameter.device}; "
                         "move them to the same device")
