"""Streaming a folder to a store: resume, refusal of mixed stores, skipped files, torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms as T
from PIL import Image
from safetensors import safe_open

from decompose import DecompositionStore, decompose_dataset, trace_and_decompose
from decompose.store import StoreMismatch

ROOT = Path(__file__).resolve().parents[1]
KWARGS = dict(depth=1, img_size=32, embed_dim=48, num_heads=2)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(13):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()


TRANSFORM = T.Compose([T.Resize((32, 32)), T.ToTensor()])


def _run(model, images, out, **kwargs):
    return decompose_dataset(trace_and_decompose(model), images, out, level="head", transform=TRANSFORM,
                             model_name="vit_tiny", batch_size=2, shard_megabytes=0.002, progress=False,
                             **kwargs)


def _contents(root: Path) -> dict:
    contents = {}
    for path in sorted((root / "shards").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            contents[path.name] = ({k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata())
    return contents


def test_store_round_trip_and_skipped_file(model, image_folder, tmp_path):
    store = _run(model, image_folder, tmp_path / "store")
    assert len(store) == 13 and store.manifest["skipped_count"] == 1
    assert store.manifest["skipped"][0]["id"] == "cats/notes.txt"
    assert len(store.shards) > 1 and store.manifest["complete"]
    image = TRANSFORM(Image.open(image_folder / store.image_ids()[4]).convert("RGB")).unsqueeze(0)
    dec = trace_and_decompose(model)(image, level="head")
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(image), pre_logits=True)
        torch.testing.assert_close(dec.representation, expected, rtol=0, atol=0)
    assert dec.relative_error() <= 1e-5
    torch.testing.assert_close(store.components(4), dec.components[:, 0])
    torch.testing.assert_close(store.representation(4), dec.representation[0])
    assert [l.key for l in store.labels] == dec.keys


def test_interrupted_run_resumes_to_identical_store(model, image_folder, tmp_path):
    reference = tmp_path / "reference"
    _run(model, image_folder, reference)

    def interrupt(batches):
        if batches == 3:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _run(model, image_folder, resumed, on_batch=interrupt)
    assert 0 < len(list((resumed / "shards").glob("*.safetensors"))) < len(list((reference / "shards").glob("*.safetensors")))
    assert not list(resumed.rglob(".*tmp*")), "no half-written files"
    _run(model, image_folder, resumed)
    expected, got = _contents(reference), _contents(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name][1] == got[name][1]
        for key, tensor in expected[name][0].items():
            assert torch.equal(tensor, got[name][0][key]), (name, key)
    assert json.loads((resumed / "manifest.json").read_text())["shards"] == \
        json.loads((reference / "manifest.json").read_text())["shards"]


def test_store_of_another_model_or_level_is_refused(model, image_folder, tmp_path):
    out = tmp_path / "store"
    _run(model, image_folder, out)
    with pytest.raises(StoreMismatch, match="level"):
        decompose_dataset(trace_and_decompose(model), image_folder, out, level="branch", transform=TRANSFORM,
                          model_name="vit_tiny", batch_size=2, shard_megabytes=0.002, progress=False)
    with pytest.raises(StoreMismatch, match="model"):
        decompose_dataset(trace_and_decompose(model), image_folder, out, level="head", transform=TRANSFORM,
                          model_name="other_model", batch_size=2, shard_megabytes=0.002, progress=False)


def test_torchrun_two_ranks_write_one_store(model, image_folder, tmp_path):
    checkpoint = tmp_path / "weights.pth"
    torch.save(model.state_dict(), checkpoint)
    common = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--model-kwargs",
              json.dumps(KWARGS), "--images", str(image_folder), "--level", "head", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    single, double = tmp_path / "single", tmp_path / "double"
    subprocess.run([sys.executable, "-m", "vit_decompose", "decompose", "--out", str(single), *common],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
                    "-m", "vit_decompose", "decompose", "--out", str(double), *common],
                   check=True, env=env, cwd=ROOT, capture_output=True)
    one, two = DecompositionStore(single), DecompositionStore(double)
    assert len(one) == len(two) == 13 and one.image_ids() == two.image_ids()
    for (c1, r1, i1), (c2, r2, i2) in zip(one.iter_shards(), two.iter_shards()):
        assert i1 == i2 and torch.equal(c1, c2) and torch.equal(r1, r2)
