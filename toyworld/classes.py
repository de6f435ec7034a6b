"""The toy world's ImageNet-like label space: object classes, each a typical look, seen on several scenes.

A class is one combination of (shape, colour, pattern), like a species with its typical colouring,
with a typical size, seen on three of the four scenes. ``OBJECT_CLASSES`` has 128 of the 256
combinations: every (shape, colour) pair in the two patterns its colour comes in (each colour
has its own pair of patterns, so all eight shapes compete within every colour and pattern, and
every two patterns compete within some colour). Telling the classes apart needs all three
factors. Scene, position and size are nuisances the class does not fix: the scene and the size
only lean towards the class's own. ``class_image`` draws an image of a uniformly drawn class;
the supervised targets are trained on these labels, never on the factors.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .generator import COLOURS, FACTORS, PATTERNS, POSITIONS, SCENES, SHAPES, SIZES, ToyImage, caption, render

CLASS_STREAM = 1  # class images draw from the random stream [seed, index, CLASS_STREAM] (factor images: [seed, index])
TYPICAL_SIZE_PROBABILITY = 0.75  # a class image shows the class's typical size this often, else the other one
# the two patterns each colour comes in (indices into PATTERNS): every pair of patterns is some colour's
COLOUR_PATTERNS = ((0, 1), (2, 3), (1, 3), (1, 2), (0, 3), (0, 2), (0, 1), (2, 3))


@dataclass(frozen=True)
class ObjectClass:
    """One class: the object's shape, colour and pattern, and the scenes it is seen on."""

    shape: str
    colour: str
    pattern: str
    scenes: tuple[str, ...]
    size: str            # the typical size

    @property
    def name(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"

    def object_factors(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern}


def object_classes() -> tuple[ObjectClass, ...]:
    """128 classes: shape s, colour c, each of colour c's two patterns (``COLOUR_PATTERNS``, slot k);
    scenes all but (s + 2c + p) % 4; typical size (s + c + k) % 2."""
    classes = []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for k, p in enumerate(COLOUR_PATTERNS[c]):
                left_out = (s + 2 * c + p) % len(SCENES)
                classes.append(ObjectClass(shape, colour, PATTERNS[p],
                                           tuple(scene for i, scene in enumerate(SCENES) if i != left_out),
                                           tuple(SIZES)[(s + c + k) % len(SIZES)]))
    return tuple(classes)


OBJECT_CLASSES = object_classes()
_BY_OBJECT = {(c.shape, c.colour, c.pattern): i for i, c in enumerate(OBJECT_CLASSES)}


def class_of(factors: Mapping[str, str | int]) -> int | None:
    """The class whose object these factors show (value names or indices into ``FACTORS``), or None.

    The scene is not asked: a class seen off its usual scenes is still that class.
    """
    names = tuple(FACTORS[f][int(factors[f])] if not isinstance(factors[f], str) else factors[f]
                  for f in ("shape", "colour", "pattern"))
    return _BY_OBJECT.get(names)


def draw_class_factors(rng: np.random.Generator) -> tuple[int, dict[str, str]]:
    """(class index, factors): a uniform class, one of its scenes, its typical size with probability
    ``TYPICAL_SIZE_PROBABILITY`` (else the other), a uniform position."""
    label = int(rng.integers(len(OBJECT_CLASSES)))
    chosen = OBJECT_CLASSES[label]
    other_size = next(size for size in SIZES if size != chosen.size)
    factors = {**chosen.object_factors(), "scene": chosen.scenes[int(rng.integers(len(chosen.scenes)))],
               "position": tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))],
               "size": chosen.size if rng.random() < TYPICAL_SIZE_PROBABILITY else other_size}
    return label, {name: factors[name] for name in FACTORS}


def class_image(seed: int, index: int, size: int = 64) -> ToyImage:
    """The ``index``-th image of the class world ``seed`` (deterministic), with its class as ``label``."""
    rng = np.random.default_rng([seed, index, CLASS_STREAM])
    label, factors = draw_class_factors(rng)
    image, mask = render(factors, size, rng)
    return ToyImage(image, mask, factors, caption(factors, rng), label)


