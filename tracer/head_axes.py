"""Which axes of an attention birth are heads and which are batches of windows.

An attention birth ``weights @ values`` (or SDPA) has an output ``[rows, *middle, Nq, d]`` whose
``rows`` are ``B`` images times ``R`` rows per image. Each (row, middle index) is one attention
(one softmax matrix); it belongs to a **head** and to a **window**:

* a middle axis is a head axis when it comes from splitting a projection's channels: pushed back
  to the output of a channel-mixing op of the branch (``F.linear``: its last axis; a convolution:
  its channel axis), the index along the axis is a function of that op's channel index alone and
  every index is reached. A middle axis that follows other positions of that output (outlook
  attention's spatial positions, unfolded from the feature map) is a window axis: a batch of
  attentions that sum into the same head.
* the ``R`` rows of one image may fold heads and windows together (SAM's ``B·windows·heads``):
  rows read by the same channels are the same head, rows read at the same positions the same
  window (``RowLayout``).

Indices are pushed back with the integer-code trick of ``tracer.positions`` (exact in float64):
no layout or module name is assumed. An axis with no evidence either way is not counted as a
head but split like a window axis (``unproven``): every level stays exact and no mixture of
heads is named as one head.

Heads are numbered ``row head · (middle heads) + flat middle head index``, windows likewise,
and at level ``token`` source ``window · Nk + key``.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from .node_calls import node_arguments
from .positions import codes_from_graph, subgraph_function, value_input
from .roles import TrunkPlan
from .vocabulary import ComponentKind

# channel-mixing ops; a convolution's channel axis is 1 when its input is batched (rank N + 2)
_LINEAR = {F.linear}
_CONVOLUTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
ROWS = 0  # the rows axis in ``AttentionAxes.unproven``
# random directions per code (float64): an element whose gradient cancels in every one reads as feeding
# nothing, which neither verdict needs (a head is all channels that feed an index, not each one)
DIRECTIONS = 2


@dataclass(frozen=True)
class RowLayout:
    """Head and window of each of the ``R`` rows of one image (row ``b·R + r`` of image ``b``)."""

    heads: tuple[int, ...]
    windows: tuple[int, ...]

    @staticmethod
    def all_windows(rows: int) -> RowLayout:
        return RowLayout((0,) * rows, tuple(range(rows)))


@dataclass(frozen=True)
class AttentionAxes:
    """Heads and windows of an attention birth's output ``[B·R, *middle, Nq, d]``.

    heads:    middle axes that split a projection's channels (size-1 middle axes count here)
    windows:  the other middle axes (outlook positions): batches of attentions
    rows:     head and window of each row of one image
    unproven: axes split as windows for want of evidence either way (``ROWS`` for the rows)
    """

    rank: int
    heads: tuple[int, ...]
    windows: tuple[int, ...]
    rows: RowLayout
    unproven: tuple[int, ...] = ()

    @property
    def plain(self) -> bool:
        """Heads only on middle axes, rows only windows in order (``b·R + w``): the layout that
        ``decompose.pooling`` splits by token."""
        return not self.windows and self.rows == RowLayout.all_windows(len(self.rows.heads))

    def head_index(self, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """Long [B·R, *middle (1 off head axes), 1, 1]: the head of every attention of a value of ``shape``."""
        return self._index(shape, self.rows.heads, self.heads, device)

    def window_index(self, shape: torch.Size, device: torch.device | str) -> torch.Tensor:
        """Long [B·R, *middle (1 off window axes), 1, 1]: the window of every attention."""
        return self._index(shape, self.rows.windows, self.windows, device)

    def head_count(self, shape: torch.Size) -> int:
        return (max(self.rows.heads) + 1) * math.prod(shape[a] for a in self.heads)

    def window_count(self, shape: torch.Size) -> int:
        return (max(self.rows.windows) + 1) * math.prod(shape[a] for a in self.windows)

    def splits_heads(self, shape: torch.Size) -> bool:
        """Whether there is a head axis at all (labels carry ``head=None`` otherwise)."""
        return bool(self.heads) or self.head_count(shape) > 1

    def source_codes(self, out_shape: torch.Size, value_shape: torch.Size, key_axis: int,
                     device: torch.device | str) -> tuple[torch.Tensor | None, int]:
        """(``window · Nk + key + 1`` at every element of the attention's values, sources): the source
        numbering of level ``token``; codes None where the values do not hold every window."""
        keys = value_shape[key_axis]
        sources = self.window_count(out_shape) * keys
        key_axis = key_axis % len(value_shape)
        if len(value_shape) != self.rank or key_axis != self.rank - 2 or value_shape[0] != out_shape[0] \
                or any(value_shape[a] != out_shape[a] for a in self.windows):
            return None, sources
        windows = self.window_index(value_shape, device).double()
        key = torch.arange(keys, dtype=torch.float64, device=device).view(keys, 1)
        return (windows * keys + key + 1).expand(value_shape), sources

    def _index(self, shape: torch.Size, per_row: tuple[int, ...], axes: tuple[int, ...],
               device: torch.device | str) -> torch.Tensor:
        if len(shape) != self.rank or shape[0] % len(per_row):
            raise ValueError(f"attention value of shape {tuple(shape)} does not match the planned layout "
                             f"({len(per_row)} rows per image, rank {self.rank})")
        view = [shape[0]] + [1] * (self.rank - 1)
        index = torch.tensor(per_row, dtype=torch.long, device=device).repeat(shape[0] // len(per_row)).view(view)
        for axis in axes:
            along = [1] * self.rank
            along[axis] = shape[axis]
            index = index * shape[axis] + torch.arange(shape[axis], device=device).view(along)
        return index


def plan_attention_axes(gm: fx.GraphModule, plan: TrunkPlan, values: dict, data_nodes: set[fx.Node]
                        ) -> dict[fx.Node, AttentionAxes]:
    """Per attention birth (not ``nn.MultiheadAttention``, whose heads are its own), its axes.

    values: the probe's node values for one image, best in float64 with the model in float64.
    """
    axes = {}
    for node, birth in plan.births.items():
        value = values.get(node)
        if birth.kind is ComponentKind.ATTENTION and node.op != "call_module" and isinstance(value, torch.Tensor) \
                and value.dim() >= 3:
            axes[node] = attention_axes(gm, plan, values, data_nodes, node)
    return axes


def attention_axes(gm: fx.GraphModule, plan: TrunkPlan, values: dict, data_nodes: set[fx.Node],
                   birth: fx.Node) -> AttentionAxes:
    """Head and window axes of the attention birth ``birth`` (see the module doc).

    The codes are pushed back from the attention's values operand where it has the output's leading
    axes (no backward pass through the attention itself, the costly part), and from the output where
    the values leave an axis unsettled."""
    out = values[birth]
    found = value_input(gm, birth)
    value = found[0] if found is not None else None
    if isinstance(values.get(value), torch.Tensor) and values[value].shape[:-2] == out.shape[:-2]:
        from_values = _attention_axes(gm, plan, values, data_nodes, birth, value)
        if not from_values.unproven:
            return from_values
    return _attention_axes(gm, plan, values, data_nodes, birth, birth)


def _attention_axes(gm: fx.GraphModule, plan: TrunkPlan, values: dict, data_nodes: set[fx.Node],
                    birth: fx.Node, target: fx.Node) -> AttentionAxes:
    """``attention_axes`` from codes pushed back from ``target`` (the birth, or its values operand,
    whose axes before the last two are the output's)."""
    out = values[birth]
    shape = values[target].shape
    middle = [axis for axis in range(1, out.dim() - 2) if out.shape[axis] > 1]
    rows = out.shape[0]
    verdicts: dict[int, set] = {axis: set() for axis in middle}
    layouts: list[RowLayout] = []

    def read(mixer: fx.Node, channel_axis: int) -> bool:
        """Collect what ``mixer`` says; True if it settles every axis (no need to look behind it)."""
        x = values[mixer].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = subgraph_function(gm, values, mixer, target)(x)
            found = [_verdict(codes_from_graph(x, y, axis_codes(shape, axis, out.device), DIRECTIONS),
                              channel_axis % x.dim(), out.shape[axis]) for axis in middle]
            layout = None
            if rows > 1:
                layout = _row_layout(codes_from_graph(x, y, axis_codes(shape, 0, out.device), DIRECTIONS),
                                     channel_axis % x.dim(), rows)
        for axis, verdict in zip(middle, found):
            verdicts[axis].add(verdict)
        layouts.extend([layout] if layout is not None else [])
        return None not in found and (rows == 1 or layout is not None)

    _nearest_mixers(plan, data_nodes, birth.all_input_nodes if target is birth else [target], values, read)
    heads = tuple(a for a in range(1, out.dim() - 2)
                  if a not in middle or ("channels" in verdicts[a] and "positions" not in verdicts[a]))
    windows = tuple(a for a in middle if a not in heads)
    unproven = tuple(a for a in windows if "positions" not in verdicts[a])
    layout = max(layouts, key=lambda found: len(set(found.heads)), default=None)
    if layout is None:
        layout = RowLayout.all_windows(rows)
        unproven = ((ROWS,) if rows > 1 else ()) + unproven
    return AttentionAxes(out.dim(), heads, windows, layout, unproven)


def _nearest_mixers(plan: TrunkPlan, data_nodes: set[fx.Node], first: list[fx.Node], values: dict, read) -> None:
    """Call ``read(node, channel axis of its output)`` on the channel-mixing ops from ``first`` back,
    nearest first, looking behind one only when ``read`` returns False; never past a residual add
    (a join) or another branch's birth. Trunk ops are looked through: a stream may feed the attention
    (MViTv2 adds its pooled query back to the attention's output, so the query projection is on the
    trunk)."""
    order = {node: i for i, node in enumerate(plan.target.graph.nodes)}
    stops = set(plan.joins) | set(plan.births)
    heap = [(-order[n], id(n), n) for n in first]
    heapq.heapify(heap)
    seen: set[fx.Node] = set()
    while heap:
        node = heapq.heappop(heap)[2]
        if node in seen or node not in data_nodes or node in stops:
            continue
        seen.add(node)
        axis = _channel_axis(node, values)
        if axis is not None and read(node, axis):
            continue
        for source in node.all_input_nodes:
            heapq.heappush(heap, (-order[source], id(source), source))


def _channel_axis(node: fx.Node, values: dict) -> int | None:
    if node.op != "call_function" or not isinstance(values.get(node), torch.Tensor):
        return None
    if node.target in _LINEAR:
        return -1
    if node.target in _CONVOLUTIONS:
        args, _ = node_arguments(node, values)
        batched = isinstance(args[0], torch.Tensor) and args[0].dim() == _CONVOLUTIONS[node.target] + 2
        return 1 if batched else 0
    return None


def axis_codes(shape: torch.Size, axis: int, device: torch.device | str) -> torch.Tensor:
    """``index along axis + 1`` at every element of a tensor of ``shape`` (float64)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return (torch.arange(shape[axis], dtype=torch.float64, device=device) + 1).view(view).expand(shape)


def _verdict(codes: torch.Tensor | None, channel_axis: int, size: int) -> str | None:
    """What the codes at a mixer's output (index + 1 along one attention axis, 0: feeds nothing) say:
    ``positions`` if they vary along an axis other than its channel and leading (batch) axes,
    ``channels`` if they are a function of the channel index alone and reach every index, else None."""
    if codes is None or not bool((codes > 0).any()):
        return None
    kept = {channel_axis, 0} if codes.dim() >= 3 else {channel_axis}
    others = tuple(d for d in range(codes.dim()) if d not in kept)
    fed = codes > 0
    if others and bool((fed & (codes != codes.amax(others, keepdim=True))).any()):
        return "positions"
    by_channel = codes.movedim(channel_axis, -1).reshape(-1, codes.shape[channel_axis])  # [rest, C]
    top = by_channel.amax(0)
    if not bool(((by_channel == 0) | (by_channel == top)).all()):
        return None  # varies along the leading axis only (heads folded into a batch there)
    return "channels" if set(top[top > 0].tolist()) == set(range(1, size + 1)) else None


def _row_layout(codes: torch.Tensor | None, channel_axis: int, rows: int) -> RowLayout | None:
    """Rows that read a common channel of a mixer are one head, rows that read at a common position
    one window; None unless every row is reached and no two rows share both."""
    if codes is None:
        return None
    by_channel = codes.movedim(channel_axis, -1).reshape(-1, codes.shape[channel_axis])  # [positions, C]
    position, channel = (by_channel > 0).nonzero().unbind(1)
    row = by_channel[position, channel].long() - 1
    reads_channel = torch.zeros(rows, by_channel.shape[1], dtype=torch.bool, device=codes.device)
    reads_position = torch.zeros(rows, by_channel.shape[0], dtype=torch.bool, device=codes.device)
    reads_channel[row, channel] = True
    reads_position[row, position] = True
    if not bool(reads_channel.any(1).all()):
        return None
    heads, windows = _sharing_classes(reads_channel), _sharing_classes(reads_position)
    if len(set(zip(heads, windows))) != rows:
        return None
    return RowLayout(tuple(heads), tuple(windows))


def _sharing_classes(reads: torch.Tensor) -> list[int]:
    """Class of each row of ``reads`` [rows, inputs]: rows linked by a common input (transitively) are
    one class, numbered by their first row. Shared inputs, not equal sets: an element whose gradient
    vanishes on the probe cannot split a class."""
    shares = (reads.double() @ reads.double().T) > 0                      # [rows, rows]
    label = torch.arange(len(reads), device=reads.device)
    while True:  # each row takes the smallest label among the rows it shares an input with
        spread = torch.where(shares, label.unsqueeze(0), len(reads)).amin(1)
        if torch.equal(spread, label):
            break
        label = spread
    first = sorted(set(label.tolist()))
    return [first.index(value) for value in label.tolist()]
