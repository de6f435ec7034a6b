"""The CLIP side: an open_clip model (by name + pretrained tag, local file, or config) and its encoders.

``load_clip`` returns a ``ClipModel``: the open_clip module, its tokenizer and image
preprocessing, and an ``identity`` string that names exactly these weights (text-embedding
caches are keyed by it). ``ClipModel.spec`` is the JSON-able recipe to load it again, which
aligners record so that ``rank`` / ``describe`` can reload the same CLIP.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ClipLoadError(ValueError):
    """The requested CLIP model cannot be built or its weights cannot be read."""


@dataclass
class ClipModel:
    """An open_clip model with what encoding needs.

    model:      open_clip ``CLIP`` / ``CustomTextCLIP`` (eval mode)
    tokenizer:  list of texts -> token ids [T, context_length]
    preprocess: PIL image -> tensor [3, H, W] (CLIP's own eval transform)
    identity:   names the weights exactly (cache key); see ``weights_digest``
    spec:       ``load_clip`` keyword arguments that rebuild this model (JSON-able)
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable
    identity: str
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        """d_clip: width of the joint image-text space."""
        projection = getattr(self.model.visual, "output_dim", None)
        if projection is None:
            with torch.no_grad():
                projection = self.encode_texts(["a"]).shape[-1]
        return int(projection)

    @property
    def description(self) -> str:
        """A name a reader can interpret: the architecture and pretrained tag, or an open_clip config's main sizes;
        the weights file's name; the precision unless fp32. ``identity`` when ``spec`` is empty (``wrap_clip``)."""
        spec = self.spec
        if "config" in spec:
            parts = ["open_clip config", *_config_sizes(spec["config"])]
        elif spec.get("name"):
            parts = [f"{spec['name']} ({spec['pretrained']})" if spec.get("pretrained") else spec["name"]]
        else:
            return self.identity
        if spec.get("checkpoint"):
            parts.append(f"weights {Path(spec['checkpoint']).name}")
        elif not spec.get("pretrained"):
            parts.append("random weights")
        if spec.get("precision"):
            parts.append(spec["precision"])
        return ", ".join(parts)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, d_clip] of preprocessed images [B, 3, H, W]."""
        dtype = next(self.model.parameters()).dtype
        embeddings = self.model.encode_image(images.to(self.device, dtype))
        return nn.functional.normalize(embeddings.float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [T, d_clip] (no templates; see ``text_bank``)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


def load_clip(name: str | None = None, pretrained: str | None = None, checkpoint: str | Path | None = None,
              config: dict | str | Path | None = None, device: str | torch.device = "cpu",
              precision: str = "fp32") -> ClipModel:
    """Build an open_clip model.

    name:       open_clip architecture (``ViT-B-32``; see ``open_clip.list_models()``)
    pretrained: pretrained tag (``openai``, ``laion2b_s34b_b79k``; downloads, needs the network)
    checkpoint: local weights file: safetensors, or a torch file read with ``weights_only=True``
    config:     instead of ``name``: an open_clip model config (dict or JSON file) with
                ``embed_dim``, ``vision_cfg``, ``text_cfg`` (how toy CLIPs are built)
    """
    if (name is None) == (config is None):
        raise ClipLoadError("give exactly one of an open_clip model name or a model config")
    if pretrained and checkpoint:
        raise ClipLoadError("give a pretrained tag or a local checkpoint file, not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ClipLoadError(f"CLIP checkpoint file {str(checkpoint)!r} does not exist")
    if config is not None:
        config_dict = _read_config(config)
        model = build_clip_from_config(config_dict)
        spec: dict[str, Any] = {"config": config_dict}
        identity = "config:" + hashlib.sha1(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:16]
    else:
        model = _named_clip(name, pretrained)
        spec = {"name": name, "pretrained": pretrained}
        identity = f"open_clip:{name}" + (f":{pretrained}" if pretrained else "")
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint))
        spec["checkpoint"] = str(Path(checkpoint).resolve())
        identity += ":file-" + file_digest(Path(checkpoint))
    elif config is not None or not pretrained:
        identity += ":weights-" + weights_digest(model)  # random init: the weights themselves
    if precision != "fp32":
        spec["precision"] = precision
        identity += f":{precision}"
    model = model.to(device=device, dtype={"fp32": torch.float32, "fp16": torch.float16,
                                           "bf16": torch.bfloat16}[precision]).eval()
    tokenizer = _tokenizer(name, model)
    return ClipModel(model, tokenizer, clip_preprocess(model), identity, spec)


def _config_sizes(config: dict) -> list[str]:
    """The main sizes of an open_clip config: the image tower's width and depth, the joint embedding's width."""
    vision = config.get("vision_cfg", {})
    layers = vision.get("layers")            # an int for a ViT tower, a list of stage depths for a ResNet
    depth = f"{layers} layer{'' if layers == 1 else 's'}" if isinstance(layers, int) else f"layers {layers}"
    sizes = [f"width {vision['width']}" if "width" in vision else "", depth if layers is not None else "",
             f"embed {config['embed_dim']}" if "embed_dim" in config else ""]
    return [size for size in sizes if size]


def wrap_clip(model: nn.Module, tokenizer: Callable | None = None, identity: str | None = None) -> ClipModel:
    """A ``ClipModel`` around an open_clip model you built yourself (identity: its weights' digest)."""
    model = model.eval()
    return ClipModel(model, tokenizer or _tokenizer(None, model), clip_preprocess(model),
                     identity or "module:weights-" + weights_digest(model), {})


def build_clip_from_config(config: dict) -> nn.Module:
    """``open_clip.CLIP`` (or ``CustomTextCLIP`` for custom / Hugging Face text towers) from a config."""
    import open_clip

    config = dict(config)
    custom_text = config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(config)
    if missing:
        raise ClipLoadError(f"CLIP config lacks {sorted(missing)}; it needs embed_dim, vision_cfg and text_cfg "
                            "(the layout of open_clip's model_configs/*.json)")
    builder = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return builder(**config)
    except TypeError as error:
        raise ClipLoadError(f"invalid open_clip config: {error}") from error


def clip_preprocess(model: nn.Module) -> Callable:
    """open_clip's eval transform for ``model`` (its preprocess_cfg, else OpenAI mean/std)."""
    import open_clip

    image_size = getattr(model.visual, "image_size", 224)
    settings = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    settings.pop("size", None)
    return open_clip.image_transform(image_size, is_train=False, **{k: v for k, v in settings.items()
                                                                   if k in ("mean", "std", "interpolation",
                                                                            "resize_mode", "fill_color")})


def weights_digest(model: nn.Module) -> str:
    """sha1 of all parameters and buffers (names, dtypes, bytes), 16 hex digits."""
    digest = hashlib.sha1()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _read_config(config: dict | str | Path) -> dict:
    if isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise ClipLoadError(f"CLIP config file {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ClipLoadError(f"CLIP config file {path} is not valid JSON: {error}") from error


def _named_clip(name: str, pretrained: str | None) -> nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise ClipLoadError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    if pretrained and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ClipLoadError(f"open_clip has no pretrained tag {pretrained!r} for {name}; known tags: "
                            f"{open_clip.list_pretrained_tags_by_model(name)}")
    try:
        return open_clip.create_model(name, pretrained=pretrained or None)
    except (OSError, ConnectionError, RuntimeError) as error:
        if pretrained:
            raise ClipLoadError(
                f"could not download open_clip weights {name}:{pretrained} ({type(error).__name__}: {error}). "
                f"Without network access, download the weights file elsewhere and pass it as a local "
                f"checkpoint instead of the tag: load_clip({name!r}, checkpoint='FILE') or "
                "--clip-checkpoint FILE (safetensors, or a torch file loadable with weights_only=True)") from error
        raise


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    import open_clip

    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except Exception as error:  # unpickling refused, wrong keys, wrong shapes
        raise ClipLoadError(f"could not load CLIP weights from {path} ({type(error).__name__}: {error}); "
                            "it must be a safetensors file or a torch state dict that loads with "
                            "weights_only=True and matches the architecture") from error


def _tokenizer(name: str | None, model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    import open_clip

    if name is not None:
        return open_clip.get_tokenizer(name)
    context_length = getattr(model, "context_length", None) or getattr(getattr(model, "text", None),
                                                                       "context_length", 77)
    vocab_size = getattr(model, "vocab_size", None)
    tokenizer = open_clip.SimpleTokenizer(context_length=context_length)
    if vocab_size is not None and vocab_size < len(tokenizer.encoder):
        raise ClipLoadError(f"the CLIP text tower has vocab_size={vocab_size}, open_clip's SimpleTokenizer needs "
                            f"{len(tokenizer.encoder)}; pass your own tokenizer (wrap_clip(model, tokenizer=...))")
    return tokenizer
