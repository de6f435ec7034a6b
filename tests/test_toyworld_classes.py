"""The class world: an ImageNet-like label space whose classes need shape, colour and pattern together."""
from collections import Counter

import numpy as np
import pytest

from toyworld.classes import OBJECT_CLASSES, TYPICAL_SIZE_PROBABILITY, class_image, class_of
from toyworld.generator import FACTORS, toy_image
from toyworld.pools import World, image_pool


def test_every_shape_colour_and_pattern_is_in_equally_many_classes():
    for factor in ("shape", "colour", "pattern"):
        counts = Counter(getattr(c, factor) for c in OBJECT_CLASSES)
        assert set(counts) == set(FACTORS[factor]) and len(set(counts.values())) == 1, factor
    assert len({(c.shape, c.colour, c.pattern) for c in OBJECT_CLASSES}) == len(OBJECT_CLASSES)


@pytest.mark.parametrize("factor", ["shape", "colour", "pattern"])
def test_telling_classes_apart_needs_each_object_factor(factor):
    """For every factor, some two classes differ in it alone: a model that ignores it confuses them."""
    others = [f for f in ("shape", "colour", "pattern") if f != factor]
    groups = Counter(tuple(getattr(c, f) for f in others) for c in OBJECT_CLASSES)
    assert max(groups.values()) > 1


def test_classes_are_seen_on_several_scenes():
    for c in OBJECT_CLASSES:
        assert 1 < len(c.scenes) < len(FACTORS["scene"]) and set(c.scenes) <= set(FACTORS["scene"])


def test_class_images_carry_their_label_and_are_deterministic():
    labels = []
    for index in range(400):
        item = class_image(5, index, size=16)
        chosen = OBJECT_CLASSES[item.label]
        assert class_of(item.factors) == item.label
        assert item.factors["scene"] in chosen.scenes
        assert {f: item.factors[f] for f in ("shape", "colour", "pattern")} == chosen.object_factors()
        labels.append(item.label)
    again = class_image(5, 17)
    assert np.array_equal(again.image, class_image(5, 17).image) and again.label == labels[17]
    assert len(set(labels)) > 0.9 * len(OBJECT_CLASSES)                     # uniform over 128 classes


def test_position_is_uniform_and_size_leans_to_the_class_s_own():
    items = [class_image(6, i, size=16) for i in range(2000)]
    counts = np.array([sum(item.factors["position"] == v for item in items) for v in FACTORS["position"]]) / len(items)
    assert np.abs(counts - 1 / len(FACTORS["position"])).max() < 0.04
    typical = np.mean([item.factors["size"] == OBJECT_CLASSES[item.label].size for item in items])
    assert abs(typical - TYPICAL_SIZE_PROBABILITY) < 0.04
    sizes = Counter(item.factors["size"] for item in items)                   # classes' typical sizes are balanced
    assert abs(sizes["small"] / len(items) - 0.5) < 0.04


def test_all_shapes_compete_within_every_colour_and_pattern():
    """A class-trained model must tell every two shapes apart: each (colour, pattern) has a class of every shape."""
    by_look = Counter((c.colour, c.pattern) for c in OBJECT_CLASSES)
    assert set(by_look.values()) == {len(FACTORS["shape"])}
    patterns_by_colour = {colour: {c.pattern for c in OBJECT_CLASSES if c.colour == colour} for colour in FACTORS["colour"]}
    pairs = {frozenset(p) for p in patterns_by_colour.values()}
    assert all(len(p) == 2 for p in pairs) and len(pairs) == 6                # every two patterns compete somewhere


def test_factor_images_have_no_label_but_a_class_when_their_object_is_one():
    assert toy_image(0, 3).label is None
    pool = image_pool(0, range(300), size=16)
    for row, found in zip(pool.factors.tolist(), pool.classes.tolist()):
        expected = class_of(dict(zip(FACTORS, row)))
        assert found == (-1 if expected is None else expected)
    assert 0.3 < float((pool.classes >= 0).float().mean()) < 0.7            # half the (shape, colour, pattern) triples
    classes = image_pool(0, range(50), size=16, kind=World.CLASSES).classes
    assert bool((classes >= 0).all())
