"""Progress bars for planning stages that can take a while on large models.

A bar names its stage and appears on stderr only once the stage has run for
``PROGRESS_DELAY`` seconds, so fast plans (tests, small models) print nothing.
``VIT_DECOMPOSE_PROGRESS=0`` turns every bar off.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

PROGRESS_DELAY = 5.0  # seconds a stage runs before its bar is shown


def progress(items: Iterable, stage: str, total: int | None = None) -> Iterable:
    """``items``, with a bar named ``stage`` once the loop has taken ``PROGRESS_DELAY`` seconds."""
    disabled = os.environ.get("VIT_DECOMPOSE_PROGRESS", "1") == "0"
    return tqdm(items, desc=stage, total=total, delay=PROGRESS_DELAY, disable=disabled, leave=False,
                file=sys.stderr)
