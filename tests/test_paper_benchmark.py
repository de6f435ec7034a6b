"""``benchmarks/paper.py`` end to end on tiny datasets written in the real formats (tests/paper_datasets.py):
Waterbirds' metadata.csv tree, ImageNet-Segmentation's MATLAB v7.3 gtsegs_ijcv.mat and an ImageNet ImageFolder,
with a random-weight tiny timm ViT and a tiny CLIP, both given as local weight files as an offline user would."""
import json
import math

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from align import load_clip
from benchmarks.paper import main
from decompose import DecompositionStore, decompose_dataset
from tests.paper_datasets import toy_segmentation_pairs, write_gtsegs, write_image_folder, write_waterbirds
from tests.test_align_clip import TINY_CLIP
from vit_decompose import decompose_commands

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 48, "num_heads": 3}
SEGMENT_IMAGES = 5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **KWARGS).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    clip = load_clip(config=TINY_CLIP)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    write_gtsegs(root / "gtsegs_ijcv.mat", *toy_segmentation_pairs(SEGMENT_IMAGES))
    return {"root": root, "birds": write_waterbirds(root / "waterbird_complete95_forest2water2"),
            "imagenet": write_image_folder(root / "imagenet_val"),
            "common": ["--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--checkpoint",
                       str(root / "vit.safetensors"), "--clip-config", str(root / "clip.json"), "--clip-checkpoint",
                       str(root / "clip.safetensors"), "--device", "cpu", "--batch-size", "8", "--align-epochs", "2"]}


def _accuracy(value) -> bool:
    return math.isfinite(value) and 0 <= value <= 1


class Interrupted(Exception):
    """Stands for a run killed during decomposition."""


def _interrupt_after_first_batch(monkeypatch):
    def decompose_then_die(*args, **kwargs):
        def on_batch(done):
            if done == 1:
                raise Interrupted
        return decompose_dataset(*args, **dict(kwargs, on_batch=on_batch))

    monkeypatch.setattr(decompose_commands, "decompose_dataset", decompose_then_die)


def test_waterbirds_runs_end_to_end_and_reports_group_accuracies(inputs, capsys, monkeypatch):
    out = inputs["root"] / "waterbirds-run"
    arguments = ["waterbirds", "--root", str(inputs["birds"]), *inputs["common"], "--max-k", "3", "--out", str(out)]
    with monkeypatch.context() as patch:      # a run killed after one batch leaves an incomplete store ...
        _interrupt_after_first_batch(patch)
        with pytest.raises(Interrupted):
            main(arguments)
    assert not json.loads((out / "store" / "manifest.json").read_text())["complete"]
    assert main(arguments) == 0               # ... which the next run completes rather than skips
    assert len(DecompositionStore(out / "store")) == 24
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == "waterbirds" and results["paper"]["worst-group accuracy, DeiT-B"]["after"] == 0.815
    ours = results["ours"]
    assert ours["images_listed"] == 24 and 0 <= ours["k"] <= 3 and len(ours["ablated"]) == ours["k"]
    groups = {f"{b} on {p}" for b in ("landbird", "waterbird") for p in ("land", "water")}
    for when in ("before", "after"):
        assert set(ours["per_group"][when]) == groups and all(map(_accuracy, ours["per_group"][when].values()))
        assert all(_accuracy(ours[name][when]) for name in ("worst", "average", "overall"))
        assert ours["worst"][when] == min(ours["per_group"][when].values())
    assert (out / "store" / "manifest.json").is_file() and (out / "aligner" / "aligner.json").is_file()
    printed = capsys.readouterr().out
    assert "vit-decompose decompose" in printed and "worst-group accuracy" in printed
    rerun = [word if word != "cpu" else "cpu:0" for word in arguments]       # another device: same results
    assert main(rerun) == 0                             # a second run skips every step
    assert capsys.readouterr().out.count("skip (done)") == 3


def test_imagenet_segmentation_runs_end_to_end_and_scores_both_methods(inputs, capsys):
    out = inputs["root"] / "segmentation-run"
    arguments = ["imagenet-seg", "--mat", str(inputs["root"] / "gtsegs_ijcv.mat"), "--align-images",
                 str(inputs["imagenet"]), *inputs["common"], "--segment-batch-size", "2", "--text", "a shape",
                 "--out", str(out)]
    assert main(arguments) == 0
    results = json.loads((out / "results.json").read_text())
    assert main([*arguments[:-2], "--text", "a circle", "--out", str(out)]) == 2     # not the run that is in OUT
    assert "its segment step was run as" in capsys.readouterr().err
    assert results["experiment"] == "imagenet-seg" and results["paper"]["DeiT-B"]["mean_iou"] == 0.529
    assert set(results["ours"]) == {"decomposition", "attention (last layer)"}
    for scores in results["ours"].values():
        assert scores["images"] == SEGMENT_IMAGES
        assert all(_accuracy(scores[name]) for name in ("pixel_accuracy", "foreground_iou", "mean_iou",
                                                         "mean_average_precision"))
        assert scores["mean_average_precision"] > 0


def test_missing_or_malformed_datasets_are_named(inputs, tmp_path, capsys):
    common = inputs["common"]

    def refused(experiment: list[str]) -> str:
        assert main([*experiment, *common, "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    assert "no such folder" in refused(["waterbirds", "--root", str(tmp_path / "nowhere")])
    assert "a file, not a folder" in refused(["waterbirds", "--root", str(inputs["birds"] / "metadata.csv")])
    (tmp_path / "birds").mkdir()
    assert "no metadata.csv in it" in refused(["waterbirds", "--root", str(tmp_path / "birds")])
    (tmp_path / "birds" / "metadata.csv").write_text("image,label\na.jpg,1\n")
    assert "lacks the columns" in refused(["waterbirds", "--root", str(tmp_path / "birds")])
    (tmp_path / "birds" / "metadata.csv").write_text((inputs["birds"] / "metadata.csv").read_text())
    error = refused(["waterbirds", "--root", str(tmp_path / "birds")])
    assert "24 images metadata.csv lists are missing" in error and "017.Cardinal/" in error
    seg = ["--align-images", str(inputs["imagenet"])]
    assert "does not exist" in refused(["imagenet-seg", "--mat", str(tmp_path / "gtsegs_ijcv.mat"), *seg])
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    assert "not an HDF5" in refused(["imagenet-seg", "--mat", str(tmp_path / "v5.mat"), *seg])
    with h5py.File(tmp_path / "other.mat", "w") as f:       # HDF5, but another layout
        f["images"] = np.zeros((2, 8, 8, 3), np.uint8)
    assert "not ImageNet-Segmentation: expected datasets /value/img" in refused(
        ["imagenet-seg", "--mat", str(tmp_path / "other.mat"), *seg])
    mat = str(inputs["root"] / "gtsegs_ijcv.mat")
    assert "--align-images" in refused(["imagenet-seg", "--mat", mat, "--align-images", str(tmp_path / "none")])
    birds = ["waterbirds", "--root", str(inputs["birds"]), "--out", str(tmp_path / "out")]
    missing_weights = [*common[:4], "--checkpoint", str(tmp_path / "vit.safetensors"), *common[6:]]
    assert main([*birds, *missing_weights]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()               # refused before any step ran
