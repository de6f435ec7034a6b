"""The shipped toy-world models: they load, decompose, encode the factors, and still reach the metrics
models.json records.

Fresh images come from world seeds no recipe trains or evaluates on; tolerances are binomial
noise of the two samples (recorded and fresh) at four standard deviations.
"""
import math

import pytest
import torch

from decompose import trace_and_decompose
from toyworld import (
    TARGET_NAMES,
    load_target,
    load_toy_clip,
    shipped_metrics,
    spurious_split,
    target_preprocess,
    toy_clip_preprocess,
)
from toyworld.classes import OBJECT_CLASSES
from toyworld.clip_training import zero_shot_accuracy
from toyworld.encoding import encoded_threshold, factor_probes, representation
from toyworld.generator import FACTORS, toy_image
from toyworld.models import Task, build_target, read_manifest
from toyworld.pools import World, as_float, image_pool
from toyworld.training import RECIPES, group_accuracy, predict
from toyworld.vocabulary import UNK, Vocabulary, toy_words, words_of

FRESH_WORLD = 7  # no recipe uses it
FRESH_IMAGES = 300
PROBE_FIT, PROBE_TEST = 2000, 1000  # fresh factor-world images for the probes: as many as the record's (a probe
# fit on fewer images reads less: 1000 fit images read MaxViT's scene at 0.92 where 2000 read 0.97)
MANIFEST = read_manifest()["models"]
CLASS_TARGETS = [name for name in TARGET_NAMES if MANIFEST[name]["task"] == Task.OBJECT_CLASSES]
ENCODING_TARGETS = [name for name in TARGET_NAMES if MANIFEST[name]["task"] != Task.SPURIOUS]
WEIGHTS_LIMIT = 25 * 2 ** 20  # bytes: every shipped file together


def noise(p: float, n_recorded: int, n_fresh: int) -> float:
    """Four standard deviations of the difference of two binomial proportions around ``p``."""
    p = min(max(p, 0.02), 0.98)
    return 4 * math.sqrt(p * (1 - p) * (1 / n_recorded + 1 / n_fresh))


@pytest.fixture(scope="module")
def fresh_pool():
    return image_pool(FRESH_WORLD, range(FRESH_IMAGES))


def test_every_model_is_recorded_with_its_recipe():
    manifest = read_manifest()
    assert set(manifest["models"]) == {*TARGET_NAMES, "clip"} == set(RECIPES)
    for name, record in manifest["models"].items():
        assert record["recipe"]["train_world"] != FRESH_WORLD and record["recipe"]["eval_world"] != FRESH_WORLD
        assert record["metrics"], name


def test_at_least_four_targets_besides_the_spurious_one_and_a_self_supervised_one():
    assert len(ENCODING_TARGETS) >= 4 and "spurious" in TARGET_NAMES
    assert [MANIFEST[name]["task"] for name in ENCODING_TARGETS].count(Task.SELF_SUPERVISED) == 1
    assert MANIFEST["dino"]["task"] == "self-supervised (DINO)" and MANIFEST["dino"]["recipe"]["dino"]
    for name in CLASS_TARGETS:
        assert MANIFEST[name]["recipe"]["world"] == World.CLASSES and len(MANIFEST[name]["classes"]) == len(OBJECT_CLASSES)


def test_shipped_weights_stay_small():
    from toyworld.models import WEIGHTS_DIR

    assert sum(path.stat().st_size for path in WEIGHTS_DIR.iterdir()) <= WEIGHTS_LIMIT


@pytest.fixture(scope="module")
def fresh_classes():
    return image_pool(FRESH_WORLD, range(FRESH_IMAGES), kind=World.CLASSES)


@pytest.mark.parametrize("name", CLASS_TARGETS)
def test_target_reaches_its_recorded_class_accuracy(name, fresh_classes):
    recorded = shipped_metrics()[name]
    accuracy = (predict(load_target(name), fresh_classes.images) == fresh_classes.classes).float().mean().item()
    expected = recorded["class_accuracy"]
    assert abs(accuracy - expected) <= noise(expected, recorded["eval_images"], FRESH_IMAGES)
    assert accuracy > recorded["chance"] + noise(recorded["chance"], 10 ** 9, FRESH_IMAGES)


@pytest.fixture(scope="module")
def probe_pool():
    return image_pool(FRESH_WORLD + 1000, range(PROBE_FIT + PROBE_TEST))


@pytest.mark.parametrize("name", ENCODING_TARGETS)
def test_target_probes_agree_with_the_recorded_ones(name, probe_pool):
    """Fresh probes agree with each recorded one (the README's table of encoded factors reads the record;
    how many factors each target encodes is a measured result there, not asserted here)."""
    recorded = shipped_metrics()[name]
    assert sorted(recorded["encoded"]) == sorted(f for f, p in recorded["probes"].items() if p["encoded"])
    features = representation(load_target(name), target_preprocess(as_float(probe_pool.images)))
    fresh = factor_probes(features, {f: probe_pool.factor(f) for f in FACTORS}, torch.arange(PROBE_FIT),
                          torch.arange(PROBE_FIT, PROBE_FIT + PROBE_TEST))
    assert recorded["probe_images"] == {"fit": PROBE_FIT, "test": PROBE_TEST}
    for factor, probe in recorded["probes"].items():
        assert probe["threshold"] == pytest.approx(encoded_threshold(len(FACTORS[factor])), abs=1e-4)
        assert abs(fresh[factor]["probe"] - probe["probe"]) <= noise(probe["probe"], PROBE_TEST, PROBE_TEST), factor


@pytest.mark.parametrize("name", ENCODING_TARGETS)
def test_probed_representation_is_what_the_decomposition_sums_to(name, probe_pool):
    """The encoded gate reads the decomposed node: for MaxViT the one before its tanh head, not the tanh's output."""
    model = load_target(name)
    images = target_preprocess(as_float(probe_pool.images[:8]))
    dec = trace_and_decompose(model)(images, level="head")
    features = representation(model, images)
    torch.testing.assert_close(features, dec.components.sum(0), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(features, pre_logits, atol=1e-4) == (dec.stopped_before is None)


def test_spurious_group_accuracies_match_the_recorded_ones():
    recorded = shipped_metrics()["spurious"]
    test = spurious_split(400, seed=FRESH_WORLD + 1, train=False)
    images = torch.stack([test[i][0] for i in range(len(test))])
    measured = group_accuracy(predict(load_target("spurious"), images), test.labels, test.background_groups)
    per_group_recorded = recorded["eval_images"] // 4
    for group, accuracy in measured["groups"].items():
        expected = recorded["groups"][group]
        assert abs(accuracy - expected) <= noise(expected, per_group_recorded, len(test) // 4), group


def test_toy_clip_zero_shot_beats_chance_for_every_factor(fresh_pool):
    recorded = shipped_metrics()["clip"]
    clip = load_toy_clip()
    measured = zero_shot_accuracy(clip, fresh_pool)
    for factor, accuracy in measured.items():
        chance, expected = recorded["chance"][factor], recorded["zero_shot"][factor]
        assert accuracy > chance + noise(chance, 10 ** 9, FRESH_IMAGES), factor
        assert abs(accuracy - expected) <= noise(expected, recorded["eval_images"], FRESH_IMAGES), factor


def test_toy_clip_preprocess_matches_its_own_transform():
    from PIL import Image

    clip = load_toy_clip()
    item = toy_image(FRESH_WORLD, 0)
    by_transform = clip.preprocess(Image.fromarray(item.image))
    by_tensor = toy_clip_preprocess(torch.from_numpy(item.image).permute(2, 0, 1)[None].float() / 255)[0]
    torch.testing.assert_close(by_transform, by_tensor, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_shipped_target_decomposes_exactly(name, fresh_pool):
    images = target_preprocess(fresh_pool.images[:2].float() / 255)
    decomposer = trace_and_decompose(load_target(name))
    for level in ("head", "token"):
        assert decomposer(images, level=level).relative_error() < 1e-5, level


def test_tokenizer_round_trips_caption_words_and_maps_unknown_words_to_unk():
    vocabulary = Vocabulary(toy_words(), context_length=24)
    captions = [toy_image(FRESH_WORLD, i).caption for i in range(50)]
    ids = vocabulary(captions)  # [50, 24]
    for caption, row in zip(captions, ids):
        assert vocabulary.decode(row) == " ".join(words_of(caption))
        assert row.argmax().item() == len(vocabulary.encode(caption)) - 1  # argmax pooling reads the end token
    unknown = vocabulary(["a zebra-striped circle"])[0]
    assert vocabulary.decode(unknown) == f"a {UNK} striped circle"
    assert vocabulary(["word " * 40])[0, -1].item() == vocabulary.end_id  # cut, keeping the end token


def test_shipped_clip_reads_the_recorded_vocabulary():
    record = read_manifest()["models"]["clip"]
    clip = load_toy_clip()
    assert clip.tokenizer.words == tuple(record["vocabulary"]["words"])
    assert clip.model.token_embedding.num_embeddings == len(clip.tokenizer)


def test_train_command_writes_loadable_models(tmp_path):
    from vit_decompose.cli import main

    assert main(["toyworld", "train", "--out", str(tmp_path), "--only", "deit", "--only", "clip", "--steps", "2",
                 "--eval-images", "64"]) == 0
    assert set(shipped_metrics(tmp_path)) == {"deit", "clip"}
    assert not load_target("deit", tmp_path).training
    assert load_toy_clip(tmp_path).encode_texts(["a red circle"]).shape == (1, 64)


def test_a_rerun_of_training_writes_the_same_bytes(tmp_path, shortened_toy_weights, train_shortened):
    """Every model, trained again from its recipe (shortened), gives byte-identical weights and models.json."""
    train_shortened(tmp_path)
    files = sorted(path.name for path in shortened_toy_weights.iterdir())
    assert set(files) >= {f"{name}.safetensors" for name in TARGET_NAMES} | {"models.json"}
    assert files == sorted(path.name for path in tmp_path.iterdir())
    for name in files:
        assert (shortened_toy_weights / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_spurious_model_keeps_the_frozen_deit_backbone(tmp_path):
    from safetensors.torch import load_file

    from vit_decompose.cli import main

    assert RECIPES["spurious"].init_lr_scale == 0.0
    assert main(["toyworld", "train", "--out", str(tmp_path), "--only", "deit", "--only", "spurious", "--steps", "3",
                 "--eval-images", "64"]) == 0
    deit, spurious = load_file(str(tmp_path / "deit.safetensors")), load_file(str(tmp_path / "spurious.safetensors"))
    backbone = [key for key in deit if key in spurious and deit[key].shape == spurious[key].shape]
    assert len(backbone) > 10
    for key in backbone:
        assert torch.equal(deit[key], spurious[key]), key
    assert spurious["head.weight"].shape[0] == 2
    torch.manual_seed(RECIPES["spurious"].seed)  # as train_target does before building it
    initial_head = build_target("spurious").head.weight.detach()
    assert not torch.equal(spurious["head.weight"], initial_head)  # the head alone was trained
