"""The synthetic world with known factors (shape, colour, pattern, scene, position, size) and its tiny models."""
from .dataset import ToyWorld
from .generator import FACTORS, ToyImage, toy_image
from .models import (TARGET_NAMES, load_target, load_toy_clip, shipped_metrics, spurious_labels, spurious_split,
                     target_preprocess, toy_clip_preprocess, zero_shot_prompts)

__all__ = ["ToyWorld", "toy_image", "ToyImage", "FACTORS", "TARGET_NAMES", "load_target", "load_toy_clip",
           "target_preprocess", "toy_clip_preprocess", "shipped_metrics", "spurious_labels", "spurious_split",
           "zero_shot_prompts"]
