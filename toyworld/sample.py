"""A batch of toy-world images with their ground truth, and the texts that name each factor."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .classes import class_of
from .generator import FACTORS, SCENE_WORDS, toy_image

# one short phrase per factor value, in the captions' own words (what a text tower trained on them reads)
PATTERN_WORDS = {"solid": "plain", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
FACTOR_TEXTS: dict[str, dict[str, str]] = {
    "shape": {shape: f"a {shape}" for shape in FACTORS["shape"]},
    "colour": {colour: f"a {colour} object" for colour in FACTORS["colour"]},
    "pattern": {pattern: f"a {PATTERN_WORDS[pattern]} object" for pattern in FACTORS["pattern"]},
    "scene": {scene: f"on {SCENE_WORDS[scene]}" for scene in FACTORS["scene"]},
    "position": {position: f"in the {position}" for position in FACTORS["position"]},
    "size": {size: f"a {size} object" for size in FACTORS["size"]},
}


@dataclass
class ToySample:
    """images [N, 3, S, S] float in [0, 1]; masks [N, S, S] bool; factors [N, F] value indices
    (columns in ``FACTORS`` order); captions N strings; ids N strings (``seed/index``)."""

    images: torch.Tensor
    masks: torch.Tensor
    factors: torch.Tensor
    captions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def factor(self, name: str) -> torch.Tensor:
        """[N] value indices of one factor."""
        return self.factors[:, list(FACTORS).index(name)]

    def value_names(self, name: str) -> list[str]:
        """N value names of one factor (``"red"``, ``"water"`` ...)."""
        return [FACTORS[name][i] for i in self.factor(name).tolist()]

    def object_classes(self) -> torch.Tensor:
        """[N] object class of each image (``classes.class_of``), -1 where the object is no class."""
        found = [class_of(dict(zip(FACTORS, row))) for row in self.factors.tolist()]
        return torch.tensor([-1 if c is None else c for c in found])

    def rows(self, index) -> ToySample:
        index = torch.as_tensor(index)
        picked = index.tolist()
        return ToySample(self.images[index], self.masks[index], self.factors[index],
                         [self.captions[i] for i in picked], [self.ids[i] for i in picked])


def toy_sample(seed: int, count: int, size: int = 64, start: int = 0) -> ToySample:
    """Images ``start .. start + count - 1`` of world ``seed``."""
    items = [toy_image(seed, index, size) for index in range(start, start + count)]
    images = torch.from_numpy(np.stack([item.image for item in items])).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(np.stack([item.mask for item in items]))
    factors = torch.tensor([[FACTORS[name].index(item.factors[name]) for name in FACTORS] for item in items])
    return ToySample(images, masks, factors, [item.caption for item in items],
                     [f"{seed}/{index}" for index in range(start, start + count)])
