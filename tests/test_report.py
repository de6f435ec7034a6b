"""`vit-decompose report` on a model that is not one of the toy world's: a random-weight timm ViT decomposed from
the shell on generated images in an ImageFolder layout, an aligner trained here into a random tiny CLIP; the
page renders in headless Chromium without errors and refuses mismatched inputs."""
import json
import re

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


def section_html(text, section_id):
    return re.search(f"<section id='{section_id}'>(.*?)</section>", text, re.DOTALL).group(1)


def column_alignments(table):
    """Per row of an HTML table: whether each cell (th or td) is left-aligned (class 'text')."""
    return [[" class='text'" in cell for cell in re.findall("<t[hd][^>]*>", row)]
            for row in re.findall("<tr>(.*?)</tr>", table, re.DOTALL)]


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
    assert_readable(text, out / "report.html", world / "narrow.png")


def assert_readable(text, path, screenshot):
    """What a reader needs: headers aligned like their columns, a named CLIP, a heatmap legend, a chart with tick
    labels, and at a narrow window a margin on both sides (wide tables scroll inside the page)."""
    assert text.count("<table>") == text.count("<div class='scroll'><table>")    # wide tables scroll in their box
    for table in re.findall("<table>(.*?)</table>", text, re.DOTALL):
        header, *rows = column_alignments(table)
        assert all(row == header for row in rows), table[:300]
    clip_cell = re.search("<td>CLIP model of the aligner</td><td[^>]*title='([^']*)'>([^<]*)</td>",
                          text.replace(" class='text'", ""))
    key, label = clip_cell.groups()
    assert key.startswith("config:") and label == "open_clip config, width 32, 1 layer, embed 32, weights clip.safetensors"
    assert "class='legend'" in section_html(text, "heatmaps") and "low" in section_html(text, "heatmaps")
    ticks = re.findall("<text class='tick'[^>]*>([^<]*)</text>", section_html(text, "ablation"))
    assert {"0", "0.5", "1", "2"} <= set(ticks), ticks        # y: accuracy 0 to 1; x: 0 to 2 blocks ablated
    line = re.search("<polyline[^>]*points='([^']*)'/>", section_html(text, "ablation")).group(1)
    name_y = float(re.search("<text class='series'[^>]*y='([^']*)'", section_html(text, "ablation")).group(1))
    assert abs(name_y - float(line.split()[-1].split(",")[1])) < 12      # the series is named by its last point
    render_page(path, screenshot=screenshot, screenshot_width=800)
    picture = np.asarray(Image.open(screenshot).convert("L"))
    assert picture.shape[1] <= 800 and (picture[:, :8] == 255).all() and (picture[:, -8:] == 255).all()


def test_report_refuses_mismatched_inputs(world, capsys):
    out = world / "refused"
    assert main(report_arguments(world, "--out", str(out), store="other-store")) == 2
    assert "aligner" in capsys.readouterr().err               # a store and an aligner of different models
    assert main(report_arguments(world, "--out", str(out), *model_options(world, OTHER_KWARGS))) == 2
    error = capsys.readouterr().err
    assert "--model" in error and ("not the store's model" in error or "components" in error)
    assert not (out / "report.html").exists()
