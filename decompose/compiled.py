"""The decomposition of one input signature as one graph: no Python per node and no read-back at call time.

``decomposer.compiled(level, example_images)`` records one components pass of the interpreter on the
example (``torch.fx.experimental.proxy_tensor.make_fx``, real tensors): every structural decision (the
plan's slices, the early pooling's rows and splits, each head's feature block) is made while recording and
becomes a constant of the graph, and only the tensor ops remain. The values the pass reads back are either
structural or checks (``tracer.recording``); any other read stops the recording with an error naming it.

The graph maps images of the example's shape, dtype and device to ``(representation [B, *D], components
[C, B, *D])``; ``DecompositionGraph.decompose`` wraps them with their labels and checks the sum, as the
interpreter's call does. With directions (``compiled(level, example, directions=U)``) it records the scores
pass instead, ``(representation, scores [C, B, k + 1])``: the directions and the random check column are
constants of the graph, so other directions need another recording.
"""
from __future__ import annotations

import enum
import math
import traceback
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from tracer.recording import recording
from tracer.vocabulary import Level

from .births import LEVELS
from .decomposition import Decomposition
from .directions import Directions, as_directions
from .scoring import with_check_direction

TORCH = str(Path(torch.__file__).parent)
PACKAGES = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("decompose", "tracer"))


class GraphCaptureError(RuntimeError):
    """The decomposition reads a value of the batch that decides what it computes: it cannot be one graph."""


class InputMismatchError(ValueError):
    """A compiled decomposition called on images of another shape, dtype or device than its example's."""


@fx.node.has_side_effect
def refuse_other_inputs(images: torch.Tensor, shape: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``images`` if they have the recorded shape, dtype and device; else an ``InputMismatchError``."""
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != shape or images.dtype != dtype \
            or str(images.device) != device:
        got = (f"{tuple(images.shape)} {images.dtype} on {images.device}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise InputMismatchError(
            f"this decomposition graph was recorded for images {shape} {dtype} on {device}, got {got}; "
            "record another with decomposer.compiled(level, images) (or call the decomposer itself)")
    return images


class DecompositionGraph(fx.GraphModule):
    """``graph(images) -> (representation [B, *D], components [C, B, *D])`` for images shaped like the example;
    recorded with directions, ``(representation, scores [C, B, k + 1])``, the last column along the check
    direction (``scoring.with_check_direction``).

    labels:     the C component labels, the interpreter's list for the same level
    level:      the level it decomposes at
    directions: the directions and the check column it scores along (``Directions`` [M, k + 1, D]), constants
                of the graph: other directions need another recording; None: it gives components
    structural: the read-backs whose values became constants of the graph (``tracer.recording``)
    checks:     the checks that ran on the example only; on other batches the sum check covers them
    ``decompose(images)`` returns the checked ``Decomposition``.
    """

    def __init__(self, traced: fx.GraphModule, decomposer, plan, level: Level, labels: list, record,
                 directions: Directions | None = None):
        super().__init__(traced, traced.graph, class_name="DecompositionGraph")
        self.labels, self.level = labels, level
        self.structural, self.checks = sorted(record.structural), sorted(record.checks)
        self.__dict__["_decomposer"], self.__dict__["_plan"] = decomposer, plan  # not submodules
        self.__dict__["directions"] = directions

    def decompose(self, images: torch.Tensor) -> Decomposition:
        """The graph's outputs on ``images`` with their labels, the sum checked (``Decomposer.checked``)."""
        representation, values = self(images)
        return self.wrap(images, representation, values)

    def wrap(self, images: torch.Tensor, representation: torch.Tensor, values: torch.Tensor) -> Decomposition:
        """A ``Decomposition`` of outputs the graph (or a compiled copy of it) gave for ``images``: ``values``
        are its components, or its scores when it was recorded with directions."""
        if self.directions is None:
            return self._decomposer.checked(self._plan, images, self.level, representation, values, self.labels)
        return self._decomposer.checked_scores(self._plan, images, self.level, self.directions, representation,
                                               values, self.labels)


def compile_decomposition(decomposer, level: Level | str, example: torch.Tensor,
                          directions: Directions | torch.Tensor | None = None) -> DecompositionGraph:
    """Record ``decomposer``'s components pass on ``example`` [B, C, H, W] at ``level`` as one graph; with
    ``directions``, its scores pass along them (they become constants of the graph)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {[str(known) for known in LEVELS]}, got {level!r}")
    level = Level(level)
    table = as_directions(directions) if directions is not None else None
    decomposer.interpret(example, level, table)  # plans, checks the example and its sum
    plan = decomposer.plan(example)
    positions = decomposer.key_positions(plan) if level is Level.TOKEN else None
    checked = None
    if table is not None:
        width = math.prod(plan.output_shape)
        checked = with_check_direction(table.checked(width, example, example.shape[0]), width, example)
    labels: list = []

    def components(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if checked is None:
            representation, values, found = decomposer._components(plan, images, level, positions)
        else:
            representation, values, found = decomposer._score_pass(plan, images, level, checked, positions)
        labels[:] = found
        return representation, values

    with recording() as record, torch.no_grad():
        try:
            traced = make_fx(components, tracing_mode="real")(example)
        except RuntimeError as error:
            if "_local_scalar_dense" not in str(error) and "data-dependent" not in str(error):
                raise
            raise GraphCaptureError(
                f"the decomposition at level {level} reads a value of the batch that decides what it computes, "
                f"at {_read_site(error)}: it cannot be recorded as one graph; call the decomposer itself") from error
    _check_inputs_first(traced, example)
    traced.graph.eliminate_dead_code()  # values the walk computed but no output needs (ops that write are kept)
    traced.recompile()
    return DecompositionGraph(traced, decomposer, plan, level, labels, record, checked)


def _read_site(error: BaseException) -> str:
    """Where ``error`` was raised: the innermost frame outside torch, and the decomposition's own frame that
    reached it (a model's module can read a value itself)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(TORCH)]
    own = [f for f in frames if f.filename.startswith(PACKAGES)]
    if not frames:
        return "an unknown place"
    site = _frame(frames[-1])
    return site if not own or own[-1] is frames[-1] else f"{site}, reached from {_frame(own[-1])}"


def _frame(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename)
    return f"{path.parent.name}/{path.name}:{frame.lineno} ({frame.name}: {frame.line})"


def _check_inputs_first(traced: fx.GraphModule, example: torch.Tensor) -> None:
    """Route the graph's input through ``refuse_other_inputs`` (a recorded graph fits its example's shape only)."""
    graph = traced.graph
    images = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(images):
        checked = graph.call_function(refuse_other_inputs,
                                      (images, tuple(example.shape), example.dtype, str(example.device)))
    images.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)


class CallPath(enum.Enum):
    """How a decomposer's call ran."""

    GRAPH = "graph"              # a recorded ``DecompositionGraph``
    INTERPRETER = "interpreter"  # the pass walking the fx graph node by node


class GraphFallbackWarning(UserWarning):
    """A decomposer made with ``graphs=True`` ran a call in the interpreter: it cannot be one graph."""


class RecordedGraphs:
    """The graphs of a decomposer made with ``graphs=True``, one per call signature (images' shape, dtype and
    device, level, directions object), the last ``LIMIT`` kept. A signature that cannot be recorded
    (``GraphCaptureError``) runs in the interpreter, with one ``GraphFallbackWarning`` when first met.

    recordings: graphs recorded so far; last_path: the ``CallPath`` of the last call
    """

    LIMIT = 8

    def __init__(self):
        self.graphs: OrderedDict[tuple, tuple[DecompositionGraph | None, object]] = OrderedDict()
        self.recordings = 0
        self.last_path: CallPath | None = None

    def decompose(self, decomposer, images: torch.Tensor, level: Level, table: Directions | None,
                  given: object) -> Decomposition:
        """The call through its signature's graph (recorded now if new); ``given``: the directions as the
        user passed them (a graph holds them as constants: a changed tensor needs a new recording)."""
        version = getattr(given, "_version", getattr(getattr(given, "table", None), "_version", None))
        key = (tuple(images.shape), images.dtype, str(images.device), level, id(given), version)
        entry = self.graphs.get(key)
        if entry is None or entry[1] is not given:
            entry = (self._record(decomposer, images, level, table), given)
            self.graphs[key] = entry
            while len(self.graphs) > self.LIMIT:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph = entry[0]
        self.last_path = CallPath.GRAPH if graph is not None else CallPath.INTERPRETER
        return graph.decompose(images) if graph is not None else decomposer.interpret(images, level, table)

    def _record(self, decomposer, images: torch.Tensor, level: Level, table: Directions | None
                ) -> DecompositionGraph | None:
        try:
            graph = compile_decomposition(decomposer, level, images, table)
        except GraphCaptureError as error:
            warnings.warn(f"{error}. Calls with images {tuple(images.shape)} at level {level} run in the "
                          "interpreter (decomposer.last_path says which path a call ran)", GraphFallbackWarning,
                          stacklevel=4)
            return None
        self.recordings += 1
        return graph
