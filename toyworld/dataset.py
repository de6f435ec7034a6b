"""The toy world as a torch Dataset."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .generator import FACTORS, toy_image


class ToyWorld(Dataset):
    """``length`` images of world ``seed``: (image [3, size, size] float in [0, 1], mask [size, size]
    bool, factor indices {name: int}, caption)."""

    def __init__(self, length: int, seed: int = 0, size: int = 64):
        self.length, self.seed, self.size = length, seed, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        item = toy_image(self.seed, index, self.size)
        image = torch.from_numpy(item.image).permute(2, 0, 1).float() / 255
        labels = {name: FACTORS[name].index(value) for name, value in item.factors.items()}
        return image, torch.from_numpy(item.mask), labels, item.caption
