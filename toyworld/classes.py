"""The toy world's ImageNet-like label space: object classes, each a look seen in one region of the frame.

A class is one look of an object (a shape in a colour, pattern and size, like a species with its
colouring and build) in one region of the frame (``POSITIONS``): where a thing is can decide
what it is, as ImageNet tells a kite in the sky from a sail on the water or a bird in flight from
one on the ground. ``OBJECT_CLASSES`` pairs every look (8 shapes x 8 colours x 4 patterns x 2
sizes = 512) with every region: 2560 classes, ImageNet's order of magnitude. Telling the classes
apart needs shape, colour, pattern, size and position; each class is seen on three of the four
scenes, so the scene is a nuisance that only narrows the class down. ``class_image`` draws an
image of a uniformly drawn class; the supervised targets are trained on these labels, never on
the factors.

An earlier label space (256 looks, position free) left position unread by every class-trained
target (held-out probe 0.22-0.39, 5 values) while the tiny CLIP reads it, which capped
CompAlign's held-out cosine below 0.85 (``toyworld.alignment_bounds``; 2026-12-05).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .generator import COLOURS, FACTORS, PATTERNS, POSITIONS, SCENES, SHAPES, SIZES, ToyImage, caption, render

CLASS_STREAM = 1  # class images draw from the random stream [seed, index, CLASS_STREAM] (factor images: [seed, index])
CLASS_FACTORS = ("shape", "colour", "pattern", "size", "position")  # what a class fixes; the scene it does not


@dataclass(frozen=True)
class ObjectClass:
    """One class: the object's shape, colour, pattern and size, the region it is in, and the scenes it is seen on."""

    shape: str
    colour: str
    pattern: str
    size: str
    position: str
    scenes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.pattern} {self.shape} at the {self.position}"

    def object_factors(self) -> dict[str, str]:
        """The factors the class fixes (``CLASS_FACTORS``), value names."""
        return {name: getattr(self, name) for name in CLASS_FACTORS}


def object_classes() -> tuple[ObjectClass, ...]:
    """2560 classes: every shape s, colour c, pattern p, size z and position q; scenes all but
    (s + 2c + p + z + q) % 4."""
    classes = []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for p, pattern in enumerate(PATTERNS):
                for z, size in enumerate(SIZES):
                    for q, position in enumerate(POSITIONS):
                        left_out = (s + 2 * c + p + z + q) % len(SCENES)
                        scenes = tuple(scene for i, scene in enumerate(SCENES) if i != left_out)
                        classes.append(ObjectClass(shape, colour, pattern, size, position, scenes))
    return tuple(classes)


OBJECT_CLASSES = object_classes()
_BY_FACTORS = {tuple(c.object_factors().values()): i for i, c in enumerate(OBJECT_CLASSES)}


def class_of(factors: Mapping[str, str | int]) -> int | None:
    """The class these factors show (value names or indices into ``FACTORS``), or None.

    The scene is not asked: a class seen off its usual scenes is still that class.
    """
    names = tuple(FACTORS[f][int(factors[f])] if not isinstance(factors[f], str) else factors[f]
                  for f in CLASS_FACTORS)
    return _BY_FACTORS.get(names)


def draw_class_factors(rng: np.random.Generator) -> tuple[int, dict[str, str]]:
    """(class index, factors): a uniform class, one of its scenes."""
    label = int(rng.integers(len(OBJECT_CLASSES)))
    chosen = OBJECT_CLASSES[label]
    factors = {**chosen.object_factors(), "scene": chosen.scenes[int(rng.integers(len(chosen.scenes)))]}
    return label, {name: factors[name] for name in FACTORS}


def class_image(seed: int, index: int, size: int = 64) -> ToyImage:
    """The ``index``-th image of the class world ``seed`` (deterministic), with its class as ``label``."""
    rng = np.random.default_rng([seed, index, CLASS_STREAM])
    label, factors = draw_class_factors(rng)
    image, mask = render(factors, size, rng)
    return ToyImage(image, mask, factors, caption(factors, rng), label)
