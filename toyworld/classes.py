"""The toy world's ImageNet-like label space: object classes, each a typical look, seen on several scenes.

A class is one look of an object: a shape in a colour, pattern and size (like a species with
its colouring and build), seen on three of the four scenes. ``OBJECT_CLASSES`` has 256 of the
512 looks: each colour comes in its own two patterns (``COLOUR_PATTERNS``; every two patterns
are some colour's pair), and every shape in every size is a class in each of them. So all eight
shapes compete within every (colour, pattern, size), and telling the classes apart needs shape,
colour, pattern and size; scene and position are nuisances the class does not fix (the scene
only narrows it down). ``class_image`` draws an image of a uniformly drawn class; the
supervised targets are trained on these labels, never on the factors.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .generator import COLOURS, FACTORS, PATTERNS, POSITIONS, SCENES, SHAPES, SIZES, ToyImage, caption, render

CLASS_STREAM = 1  # class images draw from the random stream [seed, index, CLASS_STREAM] (factor images: [seed, index])
# the two patterns each colour comes in (indices into PATTERNS): every pair of patterns is some colour's
COLOUR_PATTERNS = ((0, 1), (2, 3), (1, 3), (1, 2), (0, 3), (0, 2), (0, 1), (2, 3))


@dataclass(frozen=True)
class ObjectClass:
    """One class: the object's shape, colour and pattern, and the scenes it is seen on."""

    shape: str
    colour: str
    pattern: str
    size: str
    scenes: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.size} {self.colour} {self.pattern} {self.shape}"

    def object_factors(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "pattern": self.pattern, "size": self.size}


def object_classes() -> tuple[ObjectClass, ...]:
    """256 classes: shape s, colour c, each pattern p of ``COLOUR_PATTERNS[c]``, each size z; scenes all
    but (s + 2c + p + z) % 4."""
    classes = []
    for s, shape in enumerate(SHAPES):
        for c, colour in enumerate(COLOURS):
            for p in COLOUR_PATTERNS[c]:
                for z, size in enumerate(SIZES):
                    left_out = (s + 2 * c + p + z) % len(SCENES)
                    classes.append(ObjectClass(shape, colour, PATTERNS[p], size,
                                               tuple(scene for i, scene in enumerate(SCENES) if i != left_out)))
    return tuple(classes)


OBJECT_CLASSES = object_classes()
_OBJECT_FACTORS = ("shape", "colour", "pattern", "size")
_BY_OBJECT = {tuple(c.object_factors()[f] for f in _OBJECT_FACTORS): i for i, c in enumerate(OBJECT_CLASSES)}


def class_of(factors: Mapping[str, str | int]) -> int | None:
    """The class whose object these factors show (value names or indices into ``FACTORS``), or None.

    The scene is not asked: a class seen off its usual scenes is still that class.
    """
    names = tuple(FACTORS[f][int(factors[f])] if not isinstance(factors[f], str) else factors[f]
                  for f in _OBJECT_FACTORS)
    return _BY_OBJECT.get(names)


def draw_class_factors(rng: np.random.Generator) -> tuple[int, dict[str, str]]:
    """(class index, factors): a uniform class, one of its scenes, a uniform position."""
    label = int(rng.integers(len(OBJECT_CLASSES)))
    chosen = OBJECT_CLASSES[label]
    factors = {**chosen.object_factors(), "scene": chosen.scenes[int(rng.integers(len(chosen.scenes)))],
               "position": tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]}
    return label, {name: factors[name] for name in FACTORS}


def class_image(seed: int, index: int, size: int = 64) -> ToyImage:
    """The ``index``-th image of the class world ``seed`` (deterministic), with its class as ``label``."""
    rng = np.random.default_rng([seed, index, CLASS_STREAM])
    label, factors = draw_class_factors(rng)
    image, mask = render(factors, size, rng)
    return ToyImage(image, mask, factors, caption(factors, rng), label)


