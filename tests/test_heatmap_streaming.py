"""``heatmap`` / ``segment`` with ``--model --checkpoint --images``: the folder is decomposed here batch by batch
with scores along the aligner's directions, and gives the heatmaps and scores of the token-store path.

A tiny random-weight timm ViT saved as a local checkpoint, a head-level random aligner into a tiny open_clip
model (random weights, saved too), images of two sizes (so resize and crop matter) in an ImageFolder layout."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from align import CompAlign, load_clip
from decompose import trace_and_decompose
from decompose.decomposer import Decomposer
from tests.test_align_clip import TINY_CLIP
from vit_decompose.cli import main

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 1, "img_size": 32, "patch_size": 8, "num_classes": 0}
IMAGES = 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    images, masks = root / "images", root / "masks"
    masks.mkdir()
    generator = np.random.default_rng(1)
    mask_files = {}
    for index in range(IMAGES):
        height, width = (40, 48) if index % 2 else (36, 36)
        folder = images / ("a" if index % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        picture = generator.integers(0, 255, (height // 4, width // 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(picture, np.ones((4, 4, 1), np.uint8))).save(folder / f"{index:02d}.png")
        if index < 6:
            mask = np.zeros((height, width), np.uint8)
            mask[4 * index % 16: 4 * index % 16 + 20, 8:28] = 255
            Image.fromarray(mask).save(masks / f"{index:02d}.png")
            mask_files[f"{folder.name}/{index:02d}.png"] = f"masks/{index:02d}.png"
    (root / "masks.json").write_text(json.dumps(mask_files))
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **KWARGS).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    model_options = ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--checkpoint",
                     str(root / "vit.safetensors")]
    assert main(["decompose", *model_options, "--images", str(images), "--out", str(root / "store"), "--level",
                 "token", "--device", "cpu", "--batch-size", "4"]) == 0
    clip = load_clip(config=TINY_CLIP)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    heads = trace_and_decompose(model)(torch.zeros(1, 3, 32, 32), level="head").labels
    CompAlign(heads, 192, 32, model=MODEL, level="head",
              clip={"identity": "", "spec": {"config": TINY_CLIP, "checkpoint": str(root / "clip.safetensors")}},
              generator=torch.Generator().manual_seed(0)).save(root / "aligner")
    return {"root": root, "images": images, "model_options": model_options}


def text_options(world, text="a dog"):
    return ["--aligner", str(world["root"] / "aligner"), "--templates", "raw", "--device", "cpu", "--text", text]


def written_heatmaps(folder):
    with safe_open(str(folder / "heatmaps.safetensors"), framework="pt") as handle:
        return handle.get_tensor("heatmaps"), json.loads(handle.metadata()["ids"])


@pytest.fixture
def decomposer_calls(monkeypatch):
    """(batch size, directions given) of every decomposer call."""
    calls, forward = [], Decomposer.forward

    def recorded(self, images, level="head", directions=None):
        calls.append((images.shape[0], directions is not None))
        return forward(self, images, level, directions)

    monkeypatch.setattr(Decomposer, "forward", recorded)
    return calls


def test_streamed_heatmaps_equal_the_store_heatmaps(world, decomposer_calls, capsys):
    root = world["root"]
    for extra, name in (([], "all"), (["--head", "blocks.0.attn.h1", "--image", "a/05.png", "--image", "b/00.png"],
                                      "one-head")):
        from_store, streamed = root / f"store-{name}", root / f"streamed-{name}"
        assert main(["heatmap", "--store", str(root / "store"), *text_options(world), "--images",
                     str(world["images"]), "--out", str(from_store), "--max-images", str(IMAGES), *extra]) == 0
        decomposer_calls.clear()
        assert main(["heatmap", *world["model_options"], *text_options(world), "--images", str(world["images"]),
                     "--out", str(streamed), "--max-images", str(IMAGES), "--batch-size", "3", *extra]) == 0
        assert decomposer_calls and all(size <= 3 and scored for size, scored in decomposer_calls)
        expected, expected_ids = written_heatmaps(from_store)
        heatmaps, ids = written_heatmaps(streamed)
        assert ids == expected_ids and len(ids) == (IMAGES if name == "all" else 2)
        scale = float(expected.abs().max())
        assert scale > 0 and float((expected - expected.mean(0)).abs().max()) > 1e-3 * scale   # images differ
        assert float((heatmaps - expected).abs().max()) <= 1e-5 * scale   # float32: ~3e-7 measured
        index = json.loads((streamed / "heatmaps.json").read_text())["images"]
        assert [entry["id"] for entry in index] == ids
        for entry in index:
            with Image.open(streamed / entry["file"]) as overlay:
                assert overlay.size == (32, 32)
    capsys.readouterr()


def test_segment_streams_a_folder_with_scores_of_the_store_path(world, decomposer_calls, capsys):
    root = world["root"]
    runs = {}
    for name, source in (("store", ["--store", str(root / "store"), *world["model_options"]]),
                         ("streamed", world["model_options"])):
        out = root / f"segment-{name}.json"
        assert main(["segment", *source, *text_options(world, "an object"), "--images", str(world["images"]),
                     "--masks", str(root / "masks.json"), "--baseline", "--batch-size", "4", "--out", str(out)]) == 0
        runs[name] = json.loads(out.read_text())["scores"]
    assert "zero-shot segmentation of 6 images" in capsys.readouterr().out
    streamed_calls = [call for call in decomposer_calls if call[1]]
    assert sum(size for size, _ in streamed_calls) == 6 and max(size for size, _ in streamed_calls) <= 4
    for method in ("decomposition", "attention (last layer)"):
        scores = runs["streamed"][method]
        assert scores["images"] == 6
        for metric in ("pixel_accuracy", "foreground_iou", "mean_iou", "mean_average_precision"):
            assert 0 <= scores[metric] <= 1
            assert scores[metric] == pytest.approx(runs["store"][method][metric], abs=2e-3)


def test_bad_input_is_refused_naming_the_problem(world, tmp_path, capsys):
    options = world["model_options"]
    empty, unreadable = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    unreadable.mkdir()
    (unreadable / "readme.txt").write_text("not an image")
    kwargs = dict(KWARGS)
    cases = [
        (options, empty, f"no images under {empty}"),
        (options, unreadable, "readme.txt"),
        (options, tmp_path / "absent", "does not exist"),
        (["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--checkpoint", str(tmp_path / "missing.pth")],
         world["images"], "missing.pth"),
        (["--model", MODEL, "--model-kwargs", json.dumps(dict(kwargs, depth=2))], world["images"], "blocks.1."),
        (["--model", MODEL, "--model-kwargs", json.dumps(dict(kwargs, embed_dim=96, num_heads=3))], world["images"],
         "d_model 192"),
        (["--model", "vit_small_patch16_224", "--model-kwargs", json.dumps(KWARGS)], world["images"],
         "model='vit_tiny_patch16_224'"),
    ]
    for model_options, folder, message in cases:
        assert main(["heatmap", *model_options, *text_options(world), "--images", str(folder),
                     "--out", str(tmp_path / "out")]) == 2
        error = capsys.readouterr().err
        assert message in error, error
    assert main(["heatmap", *text_options(world), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "--store" in error and "--images" in error
    assert main(["heatmap", *options, *text_options(world), "--out", str(tmp_path / "out")]) == 2
    assert "give --images DIR" in capsys.readouterr().err
    assert main(["segment", *options, *text_options(world), "--images", str(world["images"])]) == 2
    assert "give --masks" in capsys.readouterr().err
