"""The tiny models of the toy world: their configs, and loading the shipped weights.

Targets (timm, trained to read the toy images; inputs ``target_preprocess(images)``):

    deit      class-token ViT (vit_tiny_patch16_224 layout, patch 8, 64 px)     2560 object classes
    swin      windowed, average-pooled Swin (window 4)                         2560 object classes
    maxvit    MBConv + block / grid attention MaxViT (window 4)                 2560 object classes
    dino      the deit layout, self-supervised (DINO: student / teacher, multi-crop, no labels)
    spurious  a linear head on the frozen deit, trained on the toy Waterbirds (``toyworld.spurious``)

The supervised targets learn the ImageNet-like label space of ``toyworld.classes`` (each class a
look, i.e. shape, colour, pattern and size, in one region of the frame, seen on several scenes),
never the factors themselves. A toy CLIP (open_clip ``CLIP`` from a config, word-level
``Vocabulary``) is trained contrastively on the captions. ``weights/models.json`` records every
build config, training recipe and the metrics reached (for the targets: which factors a held-out
linear probe reads, ``toyworld.encoding``); ``vit-decompose toyworld train`` writes it and the weights.
"""
from __future__ import annotations

import json
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .classes import OBJECT_CLASSES
from .generator import FACTORS, SCENE_WORDS
from .spurious import SHAPE_GROUPS, spurious_labels, spurious_split
from .vocabulary import PATTERN_WORDS, Vocabulary

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = "models.json"
TARGET_NAMES = ("deit", "swin", "maxvit", "dino", "spurious")
CLIP_NAME = "clip"
IMAGE_SIZE = 64

# what the targets were trained on: timm's ImageNet mean / std
TARGET_MEAN, TARGET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# what the toy CLIP was trained on: open_clip's (OpenAI) mean / std, also set as its preprocess_cfg
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)



class Task(str, Enum):
    """What a target was trained on (``models.json``'s ``task``)."""

    OBJECT_CLASSES = "object classes (supervised)"   # the 2560 classes of ``toyworld.classes``
    SELF_SUPERVISED = "self-supervised (DINO)"       # no labels (``toyworld.dino``)
    SPURIOUS = "spurious"                            # shape group with a correlated background

    def __str__(self) -> str:
        return self.value


_DEIT = {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
_CLASS_NAMES = [c.name for c in OBJECT_CLASSES]
_CLASSES = len(_CLASS_NAMES)
TARGET_CONFIGS: dict[str, dict[str, Any]] = {
    "deit": {"timm_name": "vit_tiny_patch16_224", "kwargs": {**_DEIT, "num_classes": _CLASSES},
             "task": Task.OBJECT_CLASSES, "classes": _CLASS_NAMES},
    # 8 x 8 patches of 8 pixels, then 4 x 4 after patch merging; 4 x 4 windows
    "swin": {"timm_name": "swin_tiny_patch4_window7_224",
             "kwargs": {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 64, "depths": [2, 2],
                        "num_heads": [2, 4], "window_size": 4, "num_classes": _CLASSES},
             "task": Task.OBJECT_CLASSES, "classes": _CLASS_NAMES},
    # stem to 32 x 32, stages at 16 x 16 (one block) and 8 x 8 (two); block and grid partitions of 4 x 4
    "maxvit": {"timm_name": "maxvit_tiny_tf_224",
               "kwargs": {"img_size": IMAGE_SIZE, "embed_dim": [32, 64], "depths": [1, 2], "stem_width": 16,
                          "head_hidden_size": 96, "transformer_window_size": 4, "transformer_dim_head": 16,
                          "conv_expand_ratio": 2.0, "num_classes": _CLASSES},
               "task": Task.OBJECT_CLASSES, "classes": _CLASS_NAMES},
    # the teacher's backbone; its representation is the class token after the final norm
    "dino": {"timm_name": "vit_tiny_patch16_224", "kwargs": {**_DEIT, "num_classes": 0},
             "task": Task.SELF_SUPERVISED, "classes": []},
    "spurious": {"timm_name": "vit_tiny_patch16_224", "kwargs": {**_DEIT, "num_classes": 2},
                 "task": Task.SPURIOUS, "classes": ["/".join(group) for group in SHAPE_GROUPS]},
}
CLIP_CONFIG: dict[str, Any] = {  # text_cfg.vocab_size is set from the vocabulary
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 96, "layers": 4, "head_width": 24,
                   "pool_type": "avg", "pos_embed_type": "sin_cos_2d"},
    "text_cfg": {"context_length": 24, "width": 64, "heads": 4, "layers": 2},
}

# zero-shot prompts: one per factor value, in the captions' own words
_PROMPT_FORMS = {"shape": "a {}", "colour": "a {} object", "pattern": "a {} object", "scene": "on {}",
                 "position": "in the {}", "size": "a {} object"}


def zero_shot_prompts(factor: str) -> list[str]:
    """One prompt per value of ``factor``, in ``FACTORS`` order ("a red object", "on the sky", ...)."""
    words = {"pattern": PATTERN_WORDS, "scene": SCENE_WORDS}.get(factor, {})
    return [_PROMPT_FORMS[factor].format(words.get(value, value)) for value in FACTORS[factor]]


def target_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> the targets' input [B, 3, H, W] (ImageNet mean / std)."""
    return _normalise(images, TARGET_MEAN, TARGET_STD)


def toy_clip_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 64, 64] in [0, 1] -> what ``load_toy_clip().encode_images`` takes (CLIP mean / std).

    The same as ``clip.preprocess`` (open_clip's eval transform) on 64-pixel PIL images.
    """
    return _normalise(images, CLIP_MEAN, CLIP_STD)


def _normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    shape = (1, 3, 1, 1)
    return (images - torch.tensor(mean, dtype=images.dtype).view(shape)) / torch.tensor(std, dtype=images.dtype).view(shape)


def build_target(name: str, config: dict | None = None, **overrides) -> nn.Module:
    """A randomly initialised target ``name`` (``config``: a ``TARGET_CONFIGS`` entry; default the code's).

    overrides: timm keyword arguments over the config's (e.g. ``dynamic_img_size=True`` while
    training on crops of other sizes; the weights are the same).
    """
    import timm

    config = config or _target_config(name)
    kwargs = {key: tuple(value) if isinstance(value, list) else value
              for key, value in {**config["kwargs"], **overrides}.items()}
    return timm.create_model(config["timm_name"], pretrained=False, **kwargs)


def clip_config(vocabulary: Vocabulary) -> dict:
    """``CLIP_CONFIG`` with the text tower sized for ``vocabulary`` (the exact build config)."""
    return dict(CLIP_CONFIG, text_cfg=dict(CLIP_CONFIG["text_cfg"], vocab_size=len(vocabulary),
                                           context_length=vocabulary.context_length))


def build_toy_clip(vocabulary: Vocabulary, config: dict | None = None) -> nn.Module:
    """A randomly initialised toy ``open_clip.CLIP`` that reads ``vocabulary``'s ids (``config``: as
    recorded by ``clip_config``; default the code's)."""
    from align.clip_models import build_clip_from_config

    config = config or clip_config(vocabulary)
    if config["text_cfg"].get("vocab_size") != len(vocabulary):
        raise ValueError(f"the CLIP config's vocab_size {config['text_cfg'].get('vocab_size')} does not match the "
                         f"vocabulary ({len(vocabulary)} tokens)")
    model = build_clip_from_config(config)
    model.visual.preprocess_cfg = {"size": IMAGE_SIZE, "mean": CLIP_MEAN, "std": CLIP_STD,
                                   "interpolation": "bicubic", "resize_mode": "shortest"}
    return model


def load_target(name: str, weights_dir: str | Path | None = None) -> nn.Module:
    """The trained target ``name`` (one of ``TARGET_NAMES``), in eval mode, built from the recorded config."""
    record = _record(name, weights_dir)
    model = build_target(name, record)
    model.load_state_dict(load_file(str(_weights_file(record, weights_dir))))
    return model.eval()


def load_toy_clip(weights_dir: str | Path | None = None):
    """The trained toy CLIP as an ``align.ClipModel`` (eval mode, word-level tokenizer).

    ``encode_images`` takes normalised images [B, 3, 64, 64]: ``toy_clip_preprocess(images_0_1)``,
    or ``clip.preprocess`` applied to 64-pixel PIL images. ``encode_texts`` takes plain strings.
    """
    from align.clip_models import file_digest, wrap_clip

    record = _record(CLIP_NAME, weights_dir)
    vocabulary = Vocabulary(record["vocabulary"]["words"], record["vocabulary"]["context_length"])
    model = build_toy_clip(vocabulary, record["config"])
    path = _weights_file(record, weights_dir)
    model.load_state_dict(load_file(str(path)))
    return wrap_clip(model, vocabulary, identity=f"toyworld-clip:file-{file_digest(path)}")


def shipped_metrics(weights_dir: str | Path | None = None) -> dict[str, dict]:
    """{model name: metrics recorded at training} for the targets and ``"clip"``."""
    return {name: record["metrics"] for name, record in read_manifest(weights_dir)["models"].items()}


def read_manifest(weights_dir: str | Path | None = None) -> dict:
    """The parsed ``models.json`` of ``weights_dir`` (default: the shipped weights)."""
    return _read_manifest(str(Path(weights_dir or WEIGHTS_DIR).resolve()))


@lru_cache(maxsize=8)
def _read_manifest(directory: str) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no toy-world model manifest {path}; train the models with "
                                f"`vit-decompose toyworld train --out {directory}`")
    return json.loads(path.read_text())


def _record(name: str, weights_dir: str | Path | None) -> dict:
    models = read_manifest(weights_dir)["models"]
    if name not in models:
        raise KeyError(f"no toy-world model {name!r} in {Path(weights_dir or WEIGHTS_DIR) / MANIFEST}; "
                       f"it has {sorted(models)}")
    return models[name]


def _weights_file(record: dict, weights_dir: str | Path | None) -> Path:
    path = Path(weights_dir or WEIGHTS_DIR) / record["file"]
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing; `vit-decompose toyworld train` writes it")
    return path


def _target_config(name: str) -> dict:
    if name not in TARGET_CONFIGS:
        raise KeyError(f"unknown toy-world target {name!r}; choose from {TARGET_NAMES}")
    return TARGET_CONFIGS[name]


__all__ = [
    "CLIP_CONFIG",
    "TARGET_CONFIGS",
    "TARGET_NAMES",
    "WEIGHTS_DIR",
    "Task",
    "build_target",
    "build_toy_clip",
    "clip_config",
    "load_target",
    "load_toy_clip",
    "read_manifest",
    "shipped_metrics",
    "spurious_labels",
    "spurious_split",
    "target_preprocess",
    "toy_clip_preprocess",
    "zero_shot_prompts",
]
