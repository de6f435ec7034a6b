"""The class world: an ImageNet-like label space whose classes need shape, colour, pattern, size and position."""
from collections import Counter

import numpy as np
import pytest

from toyworld.classes import CLASS_FACTORS, OBJECT_CLASSES, class_image, class_of
from toyworld.generator import FACTORS, toy_image
from toyworld.pools import World, image_pool


def test_every_value_of_the_class_factors_is_in_equally_many_classes():
    for factor in CLASS_FACTORS:
        counts = Counter(getattr(c, factor) for c in OBJECT_CLASSES)
        assert set(counts) == set(FACTORS[factor]) and len(set(counts.values())) == 1, factor
    assert len({tuple(c.object_factors().values()) for c in OBJECT_CLASSES}) == len(OBJECT_CLASSES) == 2560
    assert len({c.name for c in OBJECT_CLASSES}) == len(OBJECT_CLASSES)


@pytest.mark.parametrize("factor", CLASS_FACTORS)
def test_telling_classes_apart_needs_each_class_factor(factor):
    """For every factor, every class has a twin that differs in it alone: a model that ignores it confuses them."""
    others = [f for f in CLASS_FACTORS if f != factor]
    groups = Counter(tuple(getattr(c, f) for f in others) for c in OBJECT_CLASSES)
    assert set(groups.values()) == {len(FACTORS[factor])}


def test_the_same_look_is_another_class_in_another_region():
    look = ("shape", "colour", "pattern", "size")
    regions = {}
    for index, c in enumerate(OBJECT_CLASSES):
        regions.setdefault(tuple(getattr(c, f) for f in look), set()).add(index)
    assert {len(r) for r in regions.values()} == {len(FACTORS["position"])}


def test_classes_are_seen_on_several_scenes():
    for c in OBJECT_CLASSES:
        assert 1 < len(c.scenes) < len(FACTORS["scene"]) and set(c.scenes) <= set(FACTORS["scene"])
    assert Counter(scene for c in OBJECT_CLASSES for scene in c.scenes).keys() == set(FACTORS["scene"])


def test_class_images_carry_their_label_and_are_deterministic():
    labels = []
    for index in range(600):
        item = class_image(5, index, size=16)
        chosen = OBJECT_CLASSES[item.label]
        assert class_of(item.factors) == item.label
        assert item.factors["scene"] in chosen.scenes
        assert {f: item.factors[f] for f in CLASS_FACTORS} == chosen.object_factors()
        labels.append(item.label)
    again = class_image(5, 17)
    assert np.array_equal(again.image, class_image(5, 17).image) and again.label == labels[17]
    assert len(set(labels)) > 0.2 * len(OBJECT_CLASSES)                     # 600 draws of 2560 classes: ~0.21


def test_the_object_factors_of_class_images_are_uniform():
    items = [class_image(6, i, size=16) for i in range(2000)]
    for factor in CLASS_FACTORS:
        counts = np.array([sum(item.factors[factor] == v for item in items) for v in FACTORS[factor]]) / len(items)
        assert np.abs(counts - 1 / len(FACTORS[factor])).max() < 0.04, factor


def test_every_factor_image_shows_a_class_and_pools_say_which():
    assert toy_image(0, 3).label is None
    pool = image_pool(0, range(400), size=16)
    for row, found in zip(pool.factors.tolist(), pool.classes.tolist()):
        assert found == class_of(dict(zip(FACTORS, row))) >= 0
    assert class_of({"shape": "circle", "colour": "red", "pattern": "solid", "size": "small"} | {"position": "nowhere"}) is None
    classes = image_pool(0, range(50), size=16, kind=World.CLASSES).classes
    assert bool((classes >= 0).all())
