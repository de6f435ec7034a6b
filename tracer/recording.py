"""Values the decomposition reads back from tensors, and what they become when it is recorded as a graph.

The interpreter reads a few values back from the device while it walks the graph. When the walk is
recorded as one graph (``decompose.compiled``), each such read is one of two things:

* **structural**: fixed by the plan, the weights and the shapes, not by the images (which block of
  input features each head's components use: ``linear_rules.blockwise_linear``). ``structural`` reads it
  from the example batch outside the recording, so it becomes a constant of the graph, and notes where;
* a **check** of the values (``check``): it runs on the example while recording and is left out of the
  graph; on other batches the sum check of the graph's outputs covers what it guarded.

Any other read stops the recording (torch's proxy tracer refuses it), so nothing batch-dependent
becomes a constant unseen.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing


@dataclass
class Recording:
    """What one recording read from the example: sites whose values became constants, and the checks
    that ran on the example only."""

    structural: set[str] = field(default_factory=set)
    checks: set[str] = field(default_factory=set)


_active: list[Recording] = []
T = TypeVar("T")


@contextlib.contextmanager
def recording() -> Iterator[Recording]:
    """While the decomposition is traced into a graph: reads go through ``structural`` and ``check``."""
    record = Recording()
    _active.append(record)
    try:
        yield record
    finally:
        _active.pop()


def is_recording() -> bool:
    return bool(_active)


def structural(compute: Callable[[], T], site: str) -> T:
    """``compute()``, for a value that the plan, the weights and the shapes fix, not the images (``site``
    names the rule). While recording it runs on the example outside the graph: what it returns is a
    constant of the graph, and its ops are not part of it."""
    if not _active:
        return compute()
    with disable_proxy_modes_tracing():
        value = compute()
    _active[-1].structural.add(site)
    return value


def check(run: Callable[[], None], site: str) -> None:
    """Run a check of the values (it may raise); while recording, on the example only, outside the graph."""
    if not _active:
        run()
        return
    with disable_proxy_modes_tracing():
        run()
    _active[-1].checks.add(site)
