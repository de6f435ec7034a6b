"""Writing what training produced: weights files and ``models.json``, each replaced atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from decompose.store import atomic_write_text

from .models import CLIP_NAME, TARGET_NAMES


def rounded(metrics: dict) -> dict:
    """``metrics`` with every float rounded to 4 decimals (nested dicts too)."""
    return {k: rounded(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}


def save_weights(model: nn.Module, path: Path) -> None:
    """Atomically: a killed run leaves the previous file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()}, str(temporary))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def write_manifest(manifest: dict, path: Path) -> None:
    """``models.json``: the models in ``TARGET_NAMES`` order, then the CLIP."""
    order = [*TARGET_NAMES, CLIP_NAME]
    manifest["models"] = dict(sorted(manifest["models"].items(), key=lambda item: order.index(item[0])))
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")
