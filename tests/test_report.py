"""`vit-decompose report` on a model that is not one of the toy world's: a random-weight timm ViT decomposed from
the shell on generated images in an ImageFolder layout, an aligner trained here into a random tiny CLIP; the
page renders in headless Chromium without errors and refuses mismatched inputs."""
import json

import numpy as np
import pytest
import timm
import torch
from browser import find_browser, render_page
from PIL import Image
from safetensors.torch import save_file

from align import load_clip
from vit_decompose.cli import main

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 2, "img_size": 32, "patch_size": 8}
OTHER_KWARGS = {"depth": 1, "img_size": 32, "patch_size": 8}
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}
SECTIONS = {"overview", "additivity", "rankings", "textspan", "top-images", "heatmaps", "ablation"}


def model_options(world, kwargs=KWARGS):
    """The random-weight ViT (its weights saved once, so that every command sees the same model)."""
    name = f"vit-depth{kwargs['depth']}.safetensors"
    if not (world / name).is_file():
        model = timm.create_model(MODEL, pretrained=False, **kwargs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(world / name))
    return ["--model", MODEL, "--model-kwargs", json.dumps(kwargs), "--checkpoint", str(world / name)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """24 images ROOT/{train,val}/{red,blue}/k.png (a coloured square on noise), head stores of two ViTs, an
    aligner of the first one trained by `vit-decompose align`."""
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    generator = np.random.default_rng(1)
    for k in range(24):
        split, colour = ("train", "val")[k % 2], list(COLOURS)[(k // 2) % 2]
        folder = images / split / colour
        folder.mkdir(parents=True, exist_ok=True)
        picture = generator.integers(0, 120, (32, 32, 3), dtype=np.uint8)
        row, col = generator.integers(0, 16, 2)
        picture[row:row + 16, col:col + 16] = COLOURS[colour]
        Image.fromarray(picture).save(folder / f"{k:03d}.png")
    torch.manual_seed(0)
    clip = load_clip(config=TINY_CLIP)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    for name, kwargs in (("store", KWARGS), ("other-store", OTHER_KWARGS)):
        assert main(["decompose", *model_options(root, kwargs), "--images", str(images), "--out", str(root / name),
                     "--level", "head", "--batch-size", "8", "--device", "cpu"]) == 0
    assert main(["align", "--store", str(root / "store"), "--images", str(images), "--out", str(root / "aligner"),
                 "--clip-config", str(root / "clip.json"), "--clip-checkpoint", str(root / "clip.safetensors"),
                 "--epochs", "3", "--batch-size", "8", "--heldout", "0.25", "--device", "cpu"]) == 0
    return root


def report_arguments(world, *extra, store="store"):
    return ["report", "--store", str(world / store), "--aligner", str(world / "aligner"), "--images",
            str(world / "images"), "--templates", "raw", "--device", "cpu", "--property", "colour",
            "--property", "shape", "--top", "2", *extra]


def test_report_of_any_model_renders_in_headless_chromium(world, capsys):
    out = world / "out"
    assert main(report_arguments(world, "--out", str(out), *model_options(world), "--image-folder",
                                 "--heatmap-images", "2")) == 0
    assert "wrote" in capsys.readouterr().out
    summary = json.loads((out / "report.json").read_text())
    assert summary["images"] == 24 and summary["max_relative_error"] < 1e-4
    assert set(summary["top"]) == {"colour", "shape"}
    text = (out / "report.html").read_text()
    assert "linear probe fitted on 12 train images" in text and "scored at level token along the texts here" in text
    assert find_browser(), "install Chromium (Debian: apt-get install chromium; `make test` does it)"
    page = render_page(out / "report.html")
    assert set(page["sections"]) >= SECTIONS, SECTIONS - set(page["sections"])
    # top images: 2 properties × 6; heatmaps: 2 images × (the image + one overlay per text)
    assert len(page["images"]) >= 12 + 2 * 2
    assert all(image["complete"] and image["width"] > 0 for image in page["images"])
    assert page["svgs"] >= 3                                  # two ranking charts and the ablation curve
    assert not page["console_errors"] and not page["exceptions"] and not page["log_errors"]
    assert not page["failed_loads"]


def test_report_refuses_mismatched_inputs(world, capsys):
    out = world / "refused"
    assert main(report_arguments(world, "--out", str(out), store="other-store")) == 2
    assert "aligner" in capsys.readouterr().err               # a store and an aligner of different models
    assert main(report_arguments(world, "--out", str(out), *model_options(world, OTHER_KWARGS))) == 2
    error = capsys.readouterr().err
    assert "--model" in error and ("not the store's model" in error or "components" in error)
    assert not (out / "report.html").exists()
