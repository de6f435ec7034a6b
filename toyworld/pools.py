"""Stacked generated images for training and evaluation, from either world.

* the **factor world** (``generator.toy_image``): every factor independent and uniform; the
  demo, the probes and the CLIP read it;
* the **class world** (``classes.class_image``): an object class per image (``classes``); the
  supervised and self-supervised targets train on it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from .classes import class_image, class_of
from .generator import FACTORS, ToyImage, scene_textures, toy_image


class World(str, Enum):
    """Which generator a pool's images come from."""

    FACTORS = "factors"   # toy_image: independent factors
    CLASSES = "classes"   # class_image: one object class per image

    def __str__(self) -> str:
        return self.value

    def draw(self, seed: int, index: int, size: int = 64) -> ToyImage:
        return (class_image if self is World.CLASSES else toy_image)(seed, index, size)


@dataclass
class ImagePool:
    """images [N, 3, S, S] uint8; factors [N, F] value indices (``FACTORS`` order); N captions;
    classes [N] object class per image (``classes.class_of``; -1 where the object is no class);
    masks [N, S, S] bool, the object's pixels."""

    images: torch.Tensor
    factors: torch.Tensor
    captions: list[str]
    classes: torch.Tensor
    masks: torch.Tensor

    def factor(self, name: str) -> torch.Tensor:
        """[N] value indices of one factor."""
        return self.factors[:, list(FACTORS).index(name)]

    def __len__(self) -> int:
        return len(self.captions)


def image_pool(world: int, indices: Sequence[int], size: int = 64, kind: World = World.FACTORS) -> ImagePool:
    """The images ``indices`` of world seed ``world`` of generator ``kind``, stacked."""
    items = [World(kind).draw(world, index, size) for index in indices]
    images = torch.from_numpy(np.stack([item.image for item in items])).permute(0, 3, 1, 2).contiguous()
    factors = torch.tensor([[FACTORS[name].index(item.factors[name]) for name in FACTORS] for item in items])
    classes = [item.label if item.label is not None else class_of(item.factors) for item in items]
    return ImagePool(images, factors, [item.caption for item in items],
                     torch.tensor([-1 if c is None else c for c in classes]),
                     torch.from_numpy(np.stack([item.mask for item in items])))


def background_textures(size: int) -> torch.Tensor:
    """[V, 3, size, size] in [0, 1]: every object-free scene texture (``generator.scene_textures``), rounded
    to the 8-bit values a generated image's background holds."""
    return torch.from_numpy(scene_textures(size)).permute(0, 3, 1, 2).round() / 255


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return images.float() / 255


class PoolCache:
    """Generated image pools shared by the models of one run, keyed by (generator, world seed, count)."""

    def __init__(self, log: Callable[[str], None] = print):
        self.pools: dict[tuple[World, int, int], ImagePool] = {}
        self.log = log

    def world(self, world: int, count: int, kind: World = World.FACTORS) -> ImagePool:
        key = (World(kind), world, count)
        if key not in self.pools:
            started = time.perf_counter()
            self.pools[key] = image_pool(world, range(count), kind=kind)
            self.log(f"  generated {count} images of the {kind} world {world} in {time.perf_counter() - started:.0f} s")
        return self.pools[key]
