"""The synthetic world with known factors (shape, colour, pattern, scene, position, size), its object
classes, and its tiny models."""
from .classes import OBJECT_CLASSES, class_image
from .dataset import ToyWorld
from .generator import FACTORS, ToyImage, toy_image
from .models import (
    TARGET_NAMES,
    load_target,
    load_toy_clip,
    shipped_metrics,
    spurious_labels,
    spurious_split,
    target_preprocess,
    toy_clip_preprocess,
    zero_shot_prompts,
)

__all__ = ["FACTORS", "OBJECT_CLASSES", "TARGET_NAMES", "ToyImage", "ToyWorld", "class_image", "load_target",
           "load_toy_clip", "shipped_metrics", "spurious_labels", "spurious_split", "target_preprocess",
           "toy_clip_preprocess", "toy_image", "zero_shot_prompts"]
