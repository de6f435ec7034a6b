"""Seconds per step of a long report run (shown in its overview)."""
from __future__ import annotations

import time


class Stopwatch:
    """``lap(name)`` records the seconds since the previous lap (or the start) under ``name``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.started
        self.started = now
