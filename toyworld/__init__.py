"""The synthetic world with known factors (shape, colour, pattern, scene, position, size)."""
from .dataset import ToyWorld
from .generator import FACTORS, ToyImage, toy_image

__all__ = ["ToyWorld", "toy_image", "ToyImage", "FACTORS"]
