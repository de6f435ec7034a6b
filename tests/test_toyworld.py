"""The toy world's generator: deterministic, independent factors, masks that match the object."""
import numpy as np
import pytest

from toyworld import FACTORS, ToyWorld, toy_image
from toyworld.generator import COLOURS


def test_deterministic_from_seed():
    a, b, c = toy_image(3, 17), toy_image(3, 17), toy_image(4, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.factors == b.factors
    assert not np.array_equal(a.image, c.image)


def test_factors_are_uniform_and_pairwise_independent():
    sample = [toy_image(0, i, size=16).factors for i in range(3000)]
    names = list(FACTORS)
    for name in names:  # each value's frequency near 1/k
        counts = np.array([sum(f[name] == v for f in sample) for v in FACTORS[name]]) / len(sample)
        assert np.abs(counts - 1 / len(FACTORS[name])).max() < 0.04, name
    for i, first in enumerate(names):
        for second in names[i + 1:]:  # chi-square test of independence for every pair
            table = np.zeros((len(FACTORS[first]), len(FACTORS[second])))
            for f in sample:
                table[FACTORS[first].index(f[first]), FACTORS[second].index(f[second])] += 1
            expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
            statistic = ((table - expected) ** 2 / expected).sum()
            dof = (table.shape[0] - 1) * (table.shape[1] - 1)
            assert statistic < dof + 5 * np.sqrt(2 * dof), (first, second, statistic, dof)


@pytest.mark.parametrize("index", range(40))
def test_mask_is_the_drawn_object(index):
    item = toy_image(1, index)
    rng = np.random.default_rng([1, index])
    from toyworld.generator import draw_factors, scene

    factors = draw_factors(rng)
    background = np.round(scene(factors["scene"], 64, rng)).astype(np.uint8)
    outside = ~item.mask
    assert item.mask.sum() > 20
    assert np.array_equal(item.image[outside], background[outside])  # outside the mask: the scene only
    colour = np.array(COLOURS[factors["colour"]])
    inside = item.image[item.mask].astype(int)
    shade = np.round(colour * 0.45 + 20).astype(int)
    assert np.all((inside == colour).all(1) | (inside == shade).all(1))  # inside: object colours only
    if factors["pattern"] == "solid":
        assert (inside == colour).all()


def test_captions_name_true_factors():
    for i in range(200):
        item = toy_image(2, i)
        words = item.caption.replace(",", "").split()
        named = [v for name in ("shape", "colour", "size", "position") for v in FACTORS[name] if v in words]
        assert named and all(v in item.factors.values() for v in named), (item.caption, item.factors)


def test_dataset_items():
    world = ToyWorld(5, seed=0, size=32)
    image, mask, labels, caption = world[3]
    assert image.shape == (3, 32, 32) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert mask.shape == (32, 32) and mask.dtype.is_floating_point is False
    assert set(labels) == set(FACTORS) and isinstance(caption, str)
    with pytest.raises(IndexError):
        world[5]
