"""A toy Waterbirds: the label is a group of shapes, and the background agrees with it in training.

label             0: circle, square, triangle, star     1: ring, diamond, hexagon, cross
background group  0: land (grass, sand)                 1: water-like (water, sky)

Each label group pairs every shape with a look-alike in the other group (circle / ring,
square / diamond, ...), so shape is harder to read than the background. A training split has
label == background group for ``TRAIN_AGREEMENT`` of its images; a test split has all four
(label, background) groups equally often (agreement 50%).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from .generator import FACTORS, draw_factors, toy_image

SHAPE_GROUPS = (("circle", "square", "triangle", "star"), ("ring", "diamond", "hexagon", "cross"))
BACKGROUND_GROUPS = (("grass", "sand"), ("water", "sky"))
TRAIN_AGREEMENT = 0.95


def spurious_labels(factors: Mapping[str, str | int]) -> tuple[int, int]:
    """(label, background group) of one image's factors (value names, or indices into ``FACTORS``)."""
    shape, scene = (_value_name(name, factors[name]) for name in ("shape", "scene"))
    label = next(g for g, shapes in enumerate(SHAPE_GROUPS) if shape in shapes)
    return label, next(g for g, scenes in enumerate(BACKGROUND_GROUPS) if scene in scenes)


def _value_name(factor: str, value: str | int) -> str:
    return FACTORS[factor][int(value)] if isinstance(value, (int, np.integer)) else value


def group_quotas(length: int, train: bool) -> dict[tuple[int, int], int]:
    """Images per (label, background group): agreement ``TRAIN_AGREEMENT`` (train) or 50% (test)."""
    agreeing = round(length * TRAIN_AGREEMENT) if train else length // 2
    quotas = {(0, 0): agreeing // 2, (1, 1): agreeing - agreeing // 2}
    disagreeing = length - agreeing
    quotas.update({(0, 1): disagreeing // 2, (1, 0): disagreeing - disagreeing // 2})
    return quotas


def split_indices(length: int, seed: int, train: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """The first images of world ``seed`` that fill each group's quota: (world indices, groups)."""
    quotas, indices, groups = group_quotas(length, train), [], []
    index = 0
    while len(indices) < length:
        group = spurious_labels(draw_factors(np.random.default_rng([seed, index])))  # toy_image's first draws
        if quotas[group] > 0:
            quotas[group] -= 1
            indices.append(index)
            groups.append(group)
        index += 1
    return indices, groups


class SpuriousToyWorld(Dataset):
    """``length`` images of world ``seed`` with the train / test (label, background) correlation.

    Items: (image [3, size, size] float in [0, 1], label, background group).
    ``indices`` are the images' indices in the world (``toy_image(seed, index)``);
    ``labels`` / ``background_groups`` are [length] int64 tensors.
    """

    def __init__(self, length: int, seed: int, train: bool, size: int = 64):
        self.seed, self.train, self.size = seed, train, size
        self.indices, groups = split_indices(length, seed, train)
        self.labels, self.background_groups = torch.tensor(groups, dtype=torch.long).reshape(length, 2).T

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        image = toy_image(self.seed, self.indices[item], self.size).image
        return (torch.from_numpy(image).permute(2, 0, 1).float() / 255, int(self.labels[item]),
                int(self.background_groups[item]))


def spurious_split(length: int, seed: int, train: bool, size: int = 64) -> SpuriousToyWorld:
    """A training (95% agreement) or test (balanced groups) split of the toy Waterbirds."""
    return SpuriousToyWorld(length, seed, train, size)
