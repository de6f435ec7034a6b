"""The paper's datasets read in their own file formats, each from a small file written in the real layout by
tests/paper_datasets.py (which says where each layout comes from):

* Waterbirds ``metadata.csv``: columns ``img_id,img_filename,y,split,place,place_filename`` (the file shipped with
  waterbird_complete95_forest2water2; split 0/1/2 = train/val/test, y 1 = waterbird, place 1 = water);
* ImageNet-Segmentation ``gtsegs_ijcv.mat`` (MATLAB v7.3 = HDF5 after a 512-byte header): ``/value/img`` and
  ``/value/gt`` hold [N, 1] object references; an image reference points to uint8 [3, W, H], a mask reference to
  a [1, 1] cell of references whose one reference points to the mask [W, H];
* ImageNet-style ImageFolder class folders (WordNet ids named from timm's ImageNet metadata).
"""
import json

import h5py
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from align import CompAlign, load_clip
from align.datasets import ImageNetSegmentation, class_texts, image_folder_labels, read_class_names, read_waterbirds
from decompose import decompose_dataset, trace_and_decompose
from decompose.dataset import evaluation_transform
from tests.paper_datasets import SPECIES, write_gtsegs, write_waterbirds
from vit_decompose.cli import main

MODEL = "vit_tiny_patch16_224"
KWARGS = {"depth": 1, "img_size": 32, "patch_size": 8}
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    birds = write_waterbirds(root / "waterbirds")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, **KWARGS).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    transform, preprocessing = evaluation_transform(dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0))
    store = decompose_dataset(trace_and_decompose(model), birds, root / "store", level="head", transform=transform,
                              preprocessing=preprocessing, model_name=MODEL, batch_size=8, progress=False)
    clip = load_clip(config=TINY_CLIP)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    spec = {"config": TINY_CLIP, "checkpoint": str(root / "clip.safetensors")}
    aligner = CompAlign(store.labels, 192, 32, model=MODEL, level="head", clip={"identity": "", "spec": spec},
                        generator=torch.Generator().manual_seed(0))
    aligner.save(root / "aligner")
    return {"root": root, "birds": birds, "store": store}


def test_waterbirds_metadata_gives_labels_groups_and_splits(world):
    table = read_waterbirds(world["birds"])
    assert len(table) == 24
    record = table[f"{SPECIES[1]}/Black_Footed_Albatross_0013_113.jpg"]     # img_id 13: y 1, place 0, split 1
    assert record == {"label": "waterbird", "place": "land", "group": "waterbird on land", "split": "val"}
    assert {r["group"] for r in table.values()} == {f"{b} on {p}" for b in ("landbird", "waterbird")
                                                    for p in ("land", "water")}
    assert {r["split"] for r in table.values()} == {"train", "val", "test"}


def test_debias_reads_waterbirds_and_refuses_other_csvs(world, capsys):
    root = world["root"]
    common = ["debias", "--store", str(world["store"].root), "--aligner", str(root / "aligner"), "--templates", "raw",
              "--device", "cpu", "--spurious", "water", "--core", "a bird", "--max-k", "2"]
    assert main([*common, "--waterbirds", str(world["birds"]), "--out", str(root / "debias")]) == 0
    assert "waterbird on water" in capsys.readouterr().out
    result = json.loads((root / "debias" / "debias.json").read_text())
    assert set(result["before"]["per_group"]) == {"landbird on land", "landbird on water", "waterbird on land",
                                                  "waterbird on water"}
    assert main([*common, "--waterbirds", str(world["birds"]), "--zero-shot"]) == 0
    assert "zero-shot CLIP over 2 class texts" in capsys.readouterr().out
    other = root / "other"
    other.mkdir()
    (other / "metadata.csv").write_text("image,label,split\na.jpg,1,0\n")
    assert main([*common, "--waterbirds", str(other)]) == 2
    error = capsys.readouterr().err
    assert "not Waterbirds metadata" in error and "'img_filename'" in error and "'place'" in error


def test_imagenet_segmentation_file_is_read_in_its_real_layout(tmp_path):
    generator = np.random.default_rng(0)
    images = [generator.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((40, 56), (48, 32))]
    masks = [generator.random(image.shape[:2]) > 0.5 for image in images]
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    data = ImageNetSegmentation(tmp_path / "gtsegs_ijcv.mat")
    assert len(data) == 2
    for k in range(2):
        image, mask = data[k]
        np.testing.assert_array_equal(image, images[k])
        np.testing.assert_array_equal(mask, masks[k])
    with h5py.File(tmp_path / "other.mat", "w") as f:       # another layout: plain arrays
        f["images"], f["masks"] = np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ValueError, match=r"not ImageNet-Segmentation: expected datasets /value/img"):
        ImageNetSegmentation(tmp_path / "other.mat")
    (tmp_path / "v5.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(200))
    with pytest.raises(ValueError, match="not an HDF5"):
        ImageNetSegmentation(tmp_path / "v5.mat")


def test_segment_scores_the_mat_files_images_against_its_masks(world, tmp_path, capsys):
    generator = np.random.default_rng(1)
    images = [generator.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((40, 48), bool) for _ in range(3)]
    for k, mask in enumerate(masks):
        mask[5 * k:5 * k + 20, 10:30] = True
    write_gtsegs(tmp_path / "gtsegs_ijcv.mat", images, masks)
    root = world["root"]
    arguments = ["segment", "--aligner", str(root / "aligner"), "--templates", "raw", "--device", "cpu",
                 "--model", MODEL, "--model-kwargs", json.dumps(KWARGS), "--checkpoint", str(root / "vit.safetensors"),
                 "--text", "a bird", "--batch-size", "2", "--baseline"]
    mat = str(tmp_path / "gtsegs_ijcv.mat")
    assert main([*arguments, "--imagenet-seg", mat, "--out", str(tmp_path / "s.json")]) == 0
    assert "zero-shot segmentation of 3 images" in capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())["scores"]
    for method in ("decomposition", "attention (last layer)"):
        assert scores[method]["images"] == 3 and 0 <= scores[method]["pixel_accuracy"] <= 1
        assert 0 < scores[method]["mean_average_precision"] <= 1
    with h5py.File(tmp_path / "other.mat", "w") as f:
        f["value/img"] = np.zeros((3, 1), np.uint8)
    assert main([*arguments, "--imagenet-seg", str(tmp_path / "other.mat")]) == 2
    assert "not ImageNet-Segmentation" in capsys.readouterr().err


def test_image_folder_class_names_feed_ablate(world, tmp_path, capsys):
    ids = ["train/n01440764/a.JPEG", "val/n01443537/b.JPEG", "golden_retriever/c.jpg"]
    assert image_folder_labels(ids) == {ids[0]: {"label": "n01440764", "split": "train"},
                                        ids[1]: {"label": "n01443537", "split": "val"},
                                        ids[2]: {"label": "golden_retriever"}}
    assert class_texts(["n01440764", "golden_retriever", "n99999999"]) == {
        "n01440764": ["tench"], "golden_retriever": ["golden retriever"], "n99999999": ["n99999999"]}
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n")
    assert read_class_names(tmp_path / "LOC_synset_mapping.txt")["n01443537"] == ["goldfish", "Carassius"]
    with pytest.raises(ValueError, match="not inside a class folder"):
        image_folder_labels(["loose.jpg"])
    root = world["root"]
    names = tmp_path / "names.json"
    names.write_text(json.dumps({SPECIES[1]: "albatross", SPECIES[0]: "cardinal"}))
    out = tmp_path / "ablate"
    assert main(["ablate", "--store", str(world["store"].root), "--aligner", str(root / "aligner"), "--image-folder",
                 "--class-names", str(names), "--zero-shot", "--templates", "raw", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "zero-shot CLIP over 2 class texts; 24 images evaluated" in capsys.readouterr().out
    curve = json.loads((out / "ablation.json").read_text())
    assert curve["steps"] == ["none", "layer 0"] and all(0 <= a <= 1 for a in curve["accuracy"])
