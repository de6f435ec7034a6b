"""Loading the model to decompose: timm names, open_clip image towers, local checkpoints."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

OPEN_CLIP_PREFIX = "open_clip:"


class ModelLoadError(RuntimeError):
    pass


def load_model(name: str, pretrained: bool = False, checkpoint: str | None = None,
               **model_kwargs: Any) -> nn.Module:
    """``timm`` model ``name`` (or ``open_clip:ARCH[:TAG]`` for an open_clip image tower), in eval mode.

    pretrained: download the named weights (needs network access to the model hub)
    checkpoint: local weights file (safetensors, or a torch file loaded with weights_only=True)
    """
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ModelLoadError(f"checkpoint file {checkpoint!r} does not exist")
    if name.startswith(OPEN_CLIP_PREFIX):
        return _open_clip_tower(name.removeprefix(OPEN_CLIP_PREFIX), pretrained, checkpoint).eval()
    import timm

    if name not in timm.list_models() and not timm.is_model(name):
        raise ModelLoadError(f"unknown timm model {name!r}; see timm.list_models('*vit*') for names")
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **model_kwargs)
    except (OSError, ConnectionError, RuntimeError) as error:
        if pretrained and checkpoint is None:
            raise ModelLoadError(
                f"could not download pretrained weights for {name!r} ({type(error).__name__}: {error}). "
                "Without network access, pass a local weights file with --checkpoint FILE "
                "(safetensors or .pth)") from error
        raise
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a safetensors file or a torch file (``weights_only=True``) strictly into ``model``."""
    import torch

    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ModelLoadError(f"{checkpoint} does not match the model's architecture: {error}") from error


def _open_clip_tower(spec: str, pretrained: bool, checkpoint: str | None) -> nn.Module:
    import open_clip

    arch, _, tag = spec.partition(":")
    try:
        model = open_clip.create_model(arch, pretrained=checkpoint or (tag if pretrained or tag else None))
    except (OSError, ConnectionError, RuntimeError) as error:
        raise ModelLoadError(
            f"could not load open_clip weights {spec!r} ({type(error).__name__}: {error}). Without "
            "network access pass a local file: --checkpoint FILE") from error
    return model.visual
