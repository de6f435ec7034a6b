"""The class world: an ImageNet-like label space whose classes need shape, colour, pattern and size."""
from collections import Counter
from itertools import combinations

import numpy as np
import pytest

from toyworld.classes import OBJECT_CLASSES, class_image, class_of
from toyworld.generator import FACTORS, toy_image
from toyworld.pools import World, image_pool

OBJECT = ("shape", "colour", "pattern", "size")


def test_every_value_of_the_object_factors_is_in_equally_many_classes():
    for factor in OBJECT:
        counts = Counter(getattr(c, factor) for c in OBJECT_CLASSES)
        assert set(counts) == set(FACTORS[factor]) and len(set(counts.values())) == 1, factor
    assert len({tuple(c.object_factors().values()) for c in OBJECT_CLASSES}) == len(OBJECT_CLASSES) == 256


@pytest.mark.parametrize("factor", OBJECT)
def test_telling_classes_apart_needs_each_object_factor(factor):
    """For every factor, some two classes differ in it alone: a model that ignores it confuses them."""
    others = [f for f in OBJECT if f != factor]
    groups = Counter(tuple(getattr(c, f) for f in others) for c in OBJECT_CLASSES)
    assert max(groups.values()) > 1


def test_all_shapes_compete_within_every_look_and_every_two_patterns_compete():
    shapes_by_look = {}
    for c in OBJECT_CLASSES:
        shapes_by_look.setdefault((c.colour, c.pattern, c.size), set()).add(c.shape)
    assert len(shapes_by_look) == 8 * 2 * 2 and all(s == set(FACTORS["shape"]) for s in shapes_by_look.values())
    patterns = {}
    for c in OBJECT_CLASSES:
        patterns.setdefault(c.colour, set()).add(c.pattern)
    assert {len(p) for p in patterns.values()} == {2}
    assert {frozenset(p) for p in patterns.values()} == {frozenset(p) for p in combinations(FACTORS["pattern"], 2)}


def test_classes_are_seen_on_several_scenes():
    for c in OBJECT_CLASSES:
        assert 1 < len(c.scenes) < len(FACTORS["scene"]) and set(c.scenes) <= set(FACTORS["scene"])


def test_class_images_carry_their_label_and_are_deterministic():
    labels = []
    for index in range(600):
        item = class_image(5, index, size=16)
        chosen = OBJECT_CLASSES[item.label]
        assert class_of(item.factors) == item.label
        assert item.factors["scene"] in chosen.scenes
        assert {f: item.factors[f] for f in OBJECT} == chosen.object_factors()
        labels.append(item.label)
    again = class_image(5, 17)
    assert np.array_equal(again.image, class_image(5, 17).image) and again.label == labels[17]
    assert len(set(labels)) > 0.8 * len(OBJECT_CLASSES)                     # uniform over 256 classes


def test_position_is_drawn_independently_of_the_class():
    items = [class_image(6, i, size=16) for i in range(2000)]
    counts = np.array([sum(item.factors["position"] == v for item in items) for v in FACTORS["position"]]) / len(items)
    assert np.abs(counts - 1 / len(FACTORS["position"])).max() < 0.04


def test_factor_images_have_no_label_but_a_class_when_their_object_is_one():
    assert toy_image(0, 3).label is None
    pool = image_pool(0, range(400), size=16)
    for row, found in zip(pool.factors.tolist(), pool.classes.tolist()):
        expected = class_of(dict(zip(FACTORS, row)))
        assert found == (-1 if expected is None else expected)
    assert 0.4 < float((pool.classes >= 0).float().mean()) < 0.6            # half the objects are a class
    classes = image_pool(0, range(50), size=16, kind=World.CLASSES).classes
    assert bool((classes >= 0).all())
