"""``vit-decompose attribute``: per-image totals are the model's own logit (or ⟨representation, v⟩) and the listed
scores add up to them; ``--image-folder`` picks each image's own class; a killed run keeps what it wrote; bad
targets are refused naming what is wrong.

The images, the tiny random-weight ViT without a classifier (a local checkpoint) and its head-level aligner into a
tiny CLIP are ``tests/test_heatmap_streaming.py``'s; a classifier of the same shape is saved here."""
import csv
import json
from argparse import Namespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from decompose.dataset import evaluation_transform
from tests.test_heatmap_streaming import IMAGES, KWARGS, MODEL, world  # noqa: F401  (the module fixture)
from vit_decompose import attribute_command
from vit_decompose.attribution_targets import classifier_classes
from vit_decompose.cli import main

CLASSES = {"b": "bird", "a": "cat", "c": "dog"}          # the classifier's order: b = 0, a = 1, c = 2


@pytest.fixture(scope="module")
def classifier(world):  # noqa: F811
    root = world["root"]
    kwargs = dict(KWARGS, num_classes=len(CLASSES))
    torch.manual_seed(3)
    model = timm.create_model(MODEL, pretrained=False, **kwargs).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "classifier.safetensors"))
    (root / "classes.json").write_text(json.dumps(CLASSES))
    options = ["--model", MODEL, "--model-kwargs", json.dumps(kwargs), "--checkpoint",
               str(root / "classifier.safetensors"), "--device", "cpu"]
    return {"model": model, "options": options, "names": str(root / "classes.json")}


def model_outputs(model, folder, ids) -> torch.Tensor:
    """[N, ...]: ``model`` on the images ``ids`` through its evaluation preprocessing at 32 px."""
    transform, _ = evaluation_transform(dict(model.pretrained_cfg, input_size=(3, 32, 32)))
    images = []
    for image_id in ids:
        with Image.open(folder / image_id) as image:
            images.append(transform(image.convert("RGB")))
    with torch.no_grad():
        return model(torch.stack(images))


def run(out, *arguments) -> dict:
    assert main(["attribute", *arguments, "--out", str(out)]) == 0
    return json.loads((out / "attribution.json").read_text())


def check_sums(result, expected_totals):
    """Each image's total is the expected value, and its listed scores plus the rest add up to it."""
    totals = torch.tensor([image["total"] for image in result["images"]])
    listed = torch.tensor([sum(c["score"] for c in image["top_components"]) + image["rest"]
                           for image in result["images"]])
    scale = float(expected_totals.abs().max())
    assert torch.allclose(totals, expected_totals.float(), atol=1e-5 * scale, rtol=0)
    assert torch.allclose(listed, totals, atol=1e-4 * scale, rtol=0)   # the decomposition's float32 sum


def test_class_totals_are_the_models_logits(world, classifier, tmp_path, capsys):  # noqa: F811
    images = world["images"]
    by_name = run(tmp_path / "name", *classifier["options"], "--images", str(images), "--class", "dog",
                  "--class-names", classifier["names"], "--batch-size", "3", "--top", "5")
    ids = [image["id"] for image in by_name["images"]]
    assert len(ids) == IMAGES and by_name["images_done"] == IMAGES and by_name["level"] == "token"
    logits = model_outputs(classifier["model"], images, ids)                                       # [N, 3]
    check_sums(by_name, logits[:, 2])
    first = by_name["images"][0]
    assert first["target"] == {"class": 2, "key": "c", "name": "dog"}
    assert len(first["top_components"]) == 5 and len(first["top_positions"]) == 5
    scores = [c["score"] for c in first["top_components"]]
    assert scores == sorted(scores, reverse=True)
    with open(tmp_path / "name" / "attribution.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == IMAGES * (1 + 5 + 1 + 5) and {row["kind"] for row in rows} == {"total", "component", "rest",
                                                                                        "position"}
    assert len(list((tmp_path / "name" / "heatmaps").glob("*.png"))) == 4
    assert (tmp_path / "name" / "attribution.png").stat().st_size > 0

    every = run(tmp_path / "index", *classifier["options"], "--images", str(images), "--class", "2", "--level",
                "head", "--top", "1000")                                 # every component listed: the rest is 0
    check_sums(every, logits[:, 2])
    assert all(abs(image["rest"]) < 1e-6 and "top_positions" not in image for image in every["images"])
    capsys.readouterr()


def test_a_vector_target_is_the_representation_along_it(world, tmp_path, capsys):  # noqa: F811
    vector = torch.randn(192, generator=torch.Generator().manual_seed(4))
    np.save(tmp_path / "v.npy", vector.numpy())
    torch.save(vector.double(), tmp_path / "v.pt")
    model = timm.create_model(MODEL, pretrained=False, **KWARGS).eval()
    model.load_state_dict(load_file(world["model_options"][-1]))
    folder = run(tmp_path / "folder", *world["model_options"], "--device", "cpu", "--images", str(world["images"]),
                 "--vector", str(tmp_path / "v.npy"), "--level", "head", "--batch-size", "4")
    ids = [image["id"] for image in folder["images"]]
    check_sums(folder, model_outputs(model, world["images"], ids) @ vector)
    files = [str(world["images"] / image_id) for image_id in ids[:2]]
    single = run(tmp_path / "files", *world["model_options"], "--device", "cpu", "--image", files[0], "--image",
                 files[1], "--vector", str(tmp_path / "v.pt"))
    assert [image["id"] for image in single["images"]] == files and single["target"] == f"vector {tmp_path}/v.pt"
    check_sums(single, model_outputs(model, world["images"], ids[:2]) @ vector)
    capsys.readouterr()


def test_image_folder_targets_each_images_own_class(world, classifier, tmp_path, capsys):  # noqa: F811
    images = world["images"]
    result = run(tmp_path / "logits", *classifier["options"], "--images", str(images), "--image-folder",
                 "--class-names", classifier["names"], "--level", "head", "--batch-size", "4")
    ids = [image["id"] for image in result["images"]]
    own = [list(CLASSES).index(image_id.split("/")[0]) for image_id in ids]
    assert [image["target"]["class"] for image in result["images"]] == own and len(set(own)) == 2
    check_sums(result, model_outputs(classifier["model"], images, ids)[torch.arange(len(ids)), own])

    texts = ["--aligner", str(world["root"] / "aligner"), "--templates", "raw", "--level", "head"]
    by_folder = run(tmp_path / "texts", *world["model_options"], "--device", "cpu", "--images", str(images),
                    "--image-folder", "--class-names", classifier["names"], *texts)
    assert [image["target"]["text"] for image in by_folder["images"]] == [CLASSES[i.split("/")[0]] for i in ids]
    cats = run(tmp_path / "cat", *world["model_options"], "--device", "cpu", "--images", str(images), "--text",
               "cat", *texts)
    for mixed, alone in zip(by_folder["images"], cats["images"]):
        if mixed["target"]["text"] == "cat":
            assert mixed["total"] == pytest.approx(alone["total"], rel=1e-5, abs=1e-6)
    capsys.readouterr()


def test_a_killed_run_keeps_the_images_written(world, classifier, tmp_path, monkeypatch, capsys):  # noqa: F811
    calls, attribute = [], attribute_command.attribute

    def killed_at_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return attribute(*args, **kwargs)

    monkeypatch.setattr(attribute_command, "attribute", killed_at_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        main(["attribute", *classifier["options"], "--images", str(world["images"]), "--class", "1", "--level",
              "head", "--batch-size", "3", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "attribution.json").read_text())
    assert len(written["images"]) == 6 and "images_done" not in written
    with open(tmp_path / "attribution.csv", newline="") as handle:
        assert len({row["image"] for row in csv.DictReader(handle)}) == 6
    capsys.readouterr()


def test_bad_targets_are_refused_naming_the_problem(world, classifier, tmp_path, capsys):  # noqa: F811
    root, images = world["root"], ["--images", str(world["images"])]
    np.save(tmp_path / "short.npy", np.ones(5, np.float32))
    np.save(tmp_path / "matrix.npy", np.ones((2, 192), np.float32))
    (tmp_path / "foreign.pt").write_text("not a tensor")
    (tmp_path / "two.json").write_text(json.dumps({"a": "cat", "b": "bird"}))
    (tmp_path / "other.json").write_text(json.dumps({"b": "bird", "c": "dog", "d": "fish"}))
    features = [*world["model_options"], "--device", "cpu"]
    cases = [
        ([*classifier["options"], *images, "--class", "zebra", "--class-names", classifier["names"]],
         "'zebra' is not among the 3 classes of --class-names"),
        ([*classifier["options"], *images, "--class", "zebra"], "records no class names"),
        ([*classifier["options"], *images, "--class", "7"], "--class 7 is outside the 3 classes"),
        ([*classifier["options"], *images, "--class", "1", "--class-names", str(tmp_path / "two.json")],
         "lists 2 classes, the classifier"),
        ([*classifier["options"], *images, "--image-folder", "--class-names", str(tmp_path / "other.json")],
         "'a' is not among the 3 classes"),
        ([*classifier["options"], *images, "--image-folder"], "give --class-names FILE"),
        ([*features, *images, "--class", "1"], "has no classifier"),
        ([*features, *images, "--vector", str(tmp_path / "short.npy")], "has width 5, but the representation"),
        ([*features, *images, "--vector", str(tmp_path / "matrix.npy")], "must be one direction [D]"),
        ([*features, *images, "--vector", str(tmp_path / "absent.npy")], "absent.npy does not exist"),
        ([*features, *images, "--vector", str(tmp_path / "foreign.pt")], "foreign.pt could not be read"),
        ([*features, *images, "--text", "a dog"], "give --aligner ALIGNER"),
        ([*features, "--image", str(root / "absent.png"), "--class", "1"], "absent.png does not exist"),
        ([*features, "--class", "1"], "give --images DIR"),
    ]
    for arguments, message in cases:
        assert main(["attribute", *arguments, "--out", str(tmp_path / "out")]) == 2, message
        error = capsys.readouterr().err
        assert message in error, error


def test_class_names_come_from_the_file_or_the_model(classifier):
    imagenet = timm.create_model(MODEL, pretrained=False, **dict(KWARGS, num_classes=1000))
    names = classifier_classes(Namespace(class_names=None), imagenet)        # timm's ImageNet names
    assert [names.index(name, "--class") for name in ("tench", "n01443537", "Goldfish")] == [0, 1, 1]
    with pytest.raises(ValueError, match=r"names several classes .*134 \(n02012849\), 517 \(n03126707\)"):
        names.index("crane", "--class")
    assert classifier_classes(Namespace(class_names=None), classifier["model"]) is None       # 3 classes: none
    listed = classifier_classes(Namespace(class_names=classifier["names"]), classifier["model"])
    assert listed.keys == list(CLASSES) and listed.index("cat", "--class") == 1
