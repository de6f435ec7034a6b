"""The application commands end to end on tiny stores: a tiny timm ViT decomposed at levels head and
token, a head-level aligner into a tiny open_clip model (random weights), files keyed by image id."""
import argparse
import csv
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from align import (
    CompAlign,
    encode_descriptions,
    head_selector,
    image_retrieval_scores,
    load_clip,
    map_components_by_parent,
    property_basis,
    property_descriptions,
    text_contributions,
    token_heatmaps,
)
from decompose import decompose_dataset, trace_and_decompose
from decompose.dataset import evaluation_transform
from decompose.models import load_model
from tests.test_align_clip import TINY_CLIP
from vit_decompose.cli import main
from vit_decompose.heatmap_sources import labels_with_positions
from vit_decompose.keyed_files import read_table

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 1, "img_size": 32, "patch_size": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("applications")
    images, masks = root / "images", root / "masks"
    masks.mkdir()
    generator = np.random.default_rng(0)
    ids, mask_files = [], {}
    for index in range(24):
        folder = images / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        picture = np.kron(generator.integers(0, 255, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
        Image.fromarray(picture).save(folder / f"{index:03d}.png")
        image_id = f"{folder.name}/{index:03d}.png"
        ids.append(image_id)
        if index < 6:
            mask = np.zeros((32, 32), np.uint8)
            mask[8 * (index % 3): 8 * (index % 3) + 16, 8:24] = 255
            Image.fromarray(mask).save(masks / f"{index:03d}.png")
            mask_files[image_id] = f"masks/{index:03d}.png"
    (root / "masks.json").write_text(json.dumps(mask_files))
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=0, **KWARGS).eval()
    decomposer = trace_and_decompose(model)
    transform, preprocessing = evaluation_transform(dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0))
    stores = {level: decompose_dataset(decomposer, images, root / f"store-{level}", level=level, transform=transform,
                                       preprocessing=preprocessing, model_name=MODEL, batch_size=8,
                                       shard_megabytes=0.2, progress=False)
              for level in ("head", "token")}
    clip = load_clip(config=TINY_CLIP)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    spec = {"config": TINY_CLIP, "checkpoint": str(root / "clip.safetensors")}
    aligner = CompAlign(stores["head"].labels, 192, 32, model=MODEL, level="head",
                        clip={"identity": "", "spec": spec}, generator=torch.Generator().manual_seed(0))
    aligner.save(root / "aligner")
    with open(root / "groups.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "group", "split"])
        for k, image_id in enumerate(stores["head"].image_ids()):
            label = image_id.split("/")[0]
            writer.writerow([image_id, label, f"{label}-{k % 2}", ("train", "val", "test")[k % 3]])
    (root / "classes.json").write_text(json.dumps({"a": ["a photo of a cat"], "b": ["a photo of a dog"]}))
    return {"root": root, "images": images, "stores": stores, "clip": clip, "aligner": aligner, "ids": ids,
                "model_options": ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS)]}


def common(world, level="head"):
    return ["--store", str(world["stores"][level].root), "--aligner", str(world["root"] / "aligner"),
            "--templates", "raw", "--device", "cpu"]


def test_retrieve_by_text_matches_the_python_api_and_reports_precision(world, capsys):
    root, store = world["root"], world["stores"]["head"]
    out = root / "retrieve.json"
    assert main(["retrieve", *common(world), "--text", "a red square", "--component", "blocks.0.attn.h1",
                 "--component", "blocks.0.mlp", "--labels", str(root / "groups.csv"), "--relevant", "a",
                 "--top", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "precision@5" in printed
    result = json.loads(out.read_text())
    assert len(result["ranking"]) == 5 and result["components"] == ["blocks.0.attn.h1", "blocks.0.mlp"]
    rows = [store.labels.index(next(l for l in store.labels if l.key == k)) for k in result["components"]]
    components, _ = store.load_rows(list(range(len(store))))
    text = torch.nn.functional.normalize(encode_descriptions(world["clip"], ["a red square"], "raw")[0], dim=0)
    expected = text_contributions(world["aligner"], components[rows], [store.labels[r] for r in rows], text).sum(0)
    ids = store.image_ids()
    assert [r["id"] for r in result["ranking"]] == [ids[i] for i in expected.argsort(descending=True)[:5]]
    relevant = [r["id"].startswith("a/") for r in result["ranking"]]
    assert result["precision_at_k"] == pytest.approx(sum(relevant) / 5)


def test_retrieve_by_query_image_never_returns_the_query(world, capsys):
    query = world["ids"][3]
    for extra in ([], ["--raw"], ["--property", "colour", "--components", "2"]):
        assert main(["retrieve", *common(world), "--query", query, "--labels",
                     str(world["root"] / "groups.csv"), "--top", "23", *extra]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line[:3].strip().isdigit()]
        assert len(lines) == 23 and all(line.split()[2] != query for line in lines)
    assert main(["retrieve", *common(world)]) == 2                                      # neither --text nor --query
    assert "give --text" in capsys.readouterr().err


def test_retrieve_within_a_property_matches_the_python_api(world, capsys):
    root, store = world["root"], world["stores"]["head"]
    query, out = world["ids"][3], root / "within.json"
    assert main(["retrieve", *common(world), "--query", query, "--property", "colour", "--components", "99",
                 "--within-property", "--top", "7", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    components, _ = store.load_rows(list(range(len(store))))
    features = map_components_by_parent(world["aligner"], components, store.labels)
    texts = property_descriptions(None)["colour"]
    basis = property_basis(encode_descriptions(world["clip"], texts, "raw"))
    position = store.image_ids().index(query)
    expected = image_retrieval_scores(features, [position], subspace=basis)[0]
    ids = store.image_ids()
    assert [r["id"] for r in result["ranking"]] == [ids[i] for i in expected.argsort(descending=True)[:7]]
    assert [r["id"] for r in result["ranking"]] != [ids[i] for i in
                                                    image_retrieval_scores(features, [position])[0].argsort(
                                                        descending=True)[:7]]
    assert main(["retrieve", *common(world), "--query", query, "--within-property"]) == 2   # no --property
    assert "--within-property" in capsys.readouterr().err


def test_heatmap_writes_overlays_equal_to_the_python_heatmaps(world, capsys):
    root, store = world["root"], world["stores"]["token"]
    out = root / "heatmaps"
    picked = world["ids"][:2]
    assert main(["heatmap", *common(world, "token"), *world["model_options"], "--text", "a dog", "--images",
                 str(world["images"]), "--out", str(out), "--head", "blocks.0.attn.h2",
                 "--image", picked[0], "--image", picked[1]]) == 0
    assert "wrote 2 overlays" in capsys.readouterr().out
    for image_id in picked:
        with Image.open(out / f"{image_id.replace('/', '_')}.png") as image:
            assert image.size == (32, 32)
    with safe_open(str(out / "heatmaps.safetensors"), framework="pt") as handle:
        written = handle.get_tensor("heatmaps")
    options = argparse.Namespace(model=MODEL, model_kwargs=json.dumps(KWARGS), pretrained=False, checkpoint=None)
    labels, _ = labels_with_positions(store, options)
    components, _ = store.load_rows([store.image_ids().index(i) for i in picked])
    text = torch.nn.functional.normalize(encode_descriptions(world["clip"], ["a dog"], "raw")[0], dim=0)
    contributions = text_contributions(world["aligner"], components, labels, text)
    expected = token_heatmaps(contributions, labels, (32, 32), head_selector(["blocks.0.attn.h2"]))
    torch.testing.assert_close(written, expected)
    # the store records each token's position, the same the traced model gives: no --model needed
    traced = trace_and_decompose(load_model(MODEL, **KWARGS))(components.new_zeros(1, 3, 32, 32), level="token")
    assert [l.position for l in store.labels] == [l.position for l in traced.labels]
    assert any(isinstance(l.position, tuple) for l in store.labels)
    again = root / "heatmaps-recorded"
    assert main(["heatmap", *common(world, "token"), "--text", "a dog", "--images", str(world["images"]),
                 "--out", str(again), "--head", "blocks.0.attn.h2", "--image", picked[0], "--image", picked[1]]) == 0
    with safe_open(str(again / "heatmaps.safetensors"), framework="pt") as handle:
        torch.testing.assert_close(handle.get_tensor("heatmaps"), written)


def test_segment_scores_decomposition_and_attention_baseline(world, capsys):
    root = world["root"]
    out = root / "segment.json"
    assert main(["segment", *common(world, "token"), *world["model_options"], "--text", "an object", "--masks",
                 str(root / "masks.json"), "--baseline", "--images", str(world["images"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot segmentation of 6 images" in printed and "attention (last layer)" in printed
    scores = json.loads(out.read_text())["scores"]
    for method in ("decomposition", "attention (last layer)"):
        values = scores[method]
        assert 0 <= values["pixel_accuracy"] <= 1 and 0 <= values["foreground_iou"] <= 1
        assert 0 < values["mean_average_precision"] <= 1 and values["images"] == 6
    assert read_table(root / "masks.json", "mask")[world["ids"][0]] == {"mask": "masks/000.png"}


def test_ablate_writes_curve_png_and_json(world, capsys):
    root = world["root"]
    for extra, classifier in (([], "linear probe"), (["--aligner", str(root / "aligner"), "--classes",
                                                      str(root / "classes.json"), "--templates", "raw"], "zero-shot")):
        out = root / f"ablate-{classifier.split()[0]}"
        assert main(["ablate", "--store", str(world["stores"]["head"].root), "--labels", str(root / "groups.csv"),
                     "--out", str(out), "--device", "cpu", *extra]) == 0
        assert classifier in capsys.readouterr().out
        curve = json.loads((out / "ablation.json").read_text())
        in_block = sum(label.layer == 0 for label in world["stores"]["head"].labels)   # heads, mlp, their biases
        assert curve["steps"] == ["none", "layer 0"] and curve["ablated"] == [0, in_block]
        assert all(0 <= a <= 1 for a in curve["accuracy"]) and curve["images"] == 16
        with Image.open(out / "ablation.png") as image:
            assert image.size == (640, 420)
    assert main(["ablate", "--store", str(world["stores"]["head"].root), "--labels", str(root / "groups.csv"),
                 "--out", str(root / "x"), "--order", "property", "--device", "cpu"]) == 2
    assert "--aligner" in capsys.readouterr().err


def test_debias_chooses_k_on_validation_and_reports_test_groups(world, capsys):
    root = world["root"]
    out = root / "debias"
    assert main(["debias", *common(world), "--groups", str(root / "groups.csv"), "--spurious", "water",
                 "--spurious", "a lake", "--core", "a bird", "--max-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "worst group" in printed and "chosen on 8 validation images" in printed
    result = json.loads((out / "debias.json").read_text())
    assert 0 <= result["k"] <= 3 and len(result["validation"]) == 4 and len(result["ablated_keys"]) == result["k"]
    best = max(range(4), key=lambda k: (result["validation"][k]["worst"], result["validation"][k]["average"], -k))
    assert result["k"] == best
    assert set(result["before"]["per_group"]) == {"a-0", "a-1", "b-0", "b-1"}
    assert (out / "debias-validation.png").is_file()
