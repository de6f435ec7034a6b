"""End to end: a tiny timm model decomposed into a store, a tiny open_clip model built from a
config (random weights), aligned, ranked and described through the command line."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from align import CompAlign, StreamingAlignmentData, TrainingOptions, load_clip, train_compalign
from decompose import decompose_dataset, trace_and_decompose
from decompose.dataset import evaluation_transform
from vit_decompose.cli import main

MODEL = "vit_tiny_patch16_224"
TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Image folder, tiny model + decomposer, stores at levels head and branch, CLIP config and weights."""
    root = tmp_path_factory.mktemp("world")
    images = root / "images"
    generator = np.random.default_rng(0)
    for index in range(40):
        folder = images / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        coarse = generator.integers(0, 255, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.BILINEAR).save(folder / f"{index:03d}.png")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, depth=1, img_size=32, num_classes=0).eval()
    decomposer = trace_and_decompose(model)
    transform, preprocessing = evaluation_transform(dict(model.pretrained_cfg, input_size=(3, 32, 32), crop_pct=1.0))
    stores = {level: decompose_dataset(decomposer, images, root / f"store-{level}", level=level, transform=transform,
                                       preprocessing=preprocessing, model_name=MODEL, batch_size=16,
                                       shard_megabytes=0.05, progress=False)
              for level in ("head", "branch")}
    clip = load_clip(config=TINY_CLIP)
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(root / "clip.safetensors"))
    return dict(root=root, images=images, decomposer=decomposer, stores=stores, clip=clip)


def test_align_rank_describe_from_the_command_line(world, capsys):
    root, store = world["root"], world["stores"]["head"]
    assert len(store.shards) > 1  # batches cross shards
    aligner_dir = root / "aligner"
    assert main(["align", "--store", str(store.root), "--images", str(world["images"]), "--out", str(aligner_dir),
                 "--clip-config", str(root / "clip.json"), "--clip-checkpoint", str(root / "clip.safetensors"),
                 "--lr", "1e-2", "--epochs", "4", "--batch-size", "8", "--heldout", "0.25", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "held-out cosine" in output and "blocks.0.attn.h1" in output

    aligner = CompAlign.load(aligner_dir, model=MODEL, level="head", labels=store.labels)
    assert aligner.weights.shape == (len(store.labels), 192, 32) and aligner.weights.dtype == torch.float32
    assert aligner.training_summary["data"]["heldout_images"] == 10
    assert aligner.clip["identity"] == load_clip(config=TINY_CLIP, checkpoint=root / "clip.safetensors").identity
    assert (aligner_dir / "clip-targets").is_dir()

    assert main(["rank", "--store", str(store.root), "--aligner", str(aligner_dir), "--property", "colour",
                 "--top", "5", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line[:3].strip().isdigit()]
    assert len(rows) == 5 and all(line.split()[1] in aligner.keys for line in rows)

    user_properties = root / "mine.json"
    user_properties.write_text(json.dumps({"stripes": ["zebra stripes", "striped shirt", "barcode"]}))
    assert main(["rank", "--store", str(store.root), "--aligner", str(aligner_dir), "--property", "stripes",
                 "--properties", str(user_properties), "--only-given", "--plain", "--device", "cpu"]) == 0
    assert "property 'stripes': 3 descriptions" in capsys.readouterr().out

    assert main(["describe", "--store", str(store.root), "--aligner", str(aligner_dir), "--component",
                 "blocks.0.attn.h1", "--count", "3", "--templates", "raw", "--device", "cpu"]) == 0
    output = capsys.readouterr().out
    assert "TextSpan over 40 images" in output and len([l for l in output.splitlines() if l[:3].strip() in "123"]) >= 3
    assert any((aligner_dir / "text-embeddings").iterdir())  # text encodings cached next to the aligner


def test_aligner_refuses_other_level_and_unknown_component(world, capsys):
    root = world["root"]
    head, branch = world["stores"]["head"], world["stores"]["branch"]
    aligner = CompAlign(head.labels, 192, 32, model=MODEL, level="head",
                        clip={"identity": "x", "spec": {"config": TINY_CLIP,
                                                        "checkpoint": str(root / "clip.safetensors")}})
    aligner.save(root / "untrained")
    assert main(["rank", "--store", str(branch.root), "--aligner", str(root / "untrained"),
                 "--property", "colour", "--device", "cpu"]) == 2
    assert "level='head'" in capsys.readouterr().err
    assert main(["describe", "--store", str(head.root), "--aligner", str(root / "untrained"),
                 "--component", "blocks.7.attn.h0", "--device", "cpu"]) == 2
    assert "no component 'blocks.7.attn.h0'" in capsys.readouterr().err


def test_alignment_on_the_fly_from_a_dataloader(world):
    clip, decomposer = world["clip"], world["decomposer"]
    images = torch.randn(24, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=4)
    data = StreamingAlignmentData(loader, decomposer, clip.encode_images, level="head", model=MODEL, heldout_every=3)
    assert [l.key for l in data.labels] == [l.key for l in decomposer(images[:1], level="head").labels]
    aligner, report = train_compalign(data, TrainingOptions(lr=1e-2, max_epochs=2, progress=False, device="cpu"),
                                      clip={"identity": clip.identity})
    assert report.epochs == 2 and -1 <= report.heldout_cosine <= 1
    assert data.summary()["images_decomposed"] == {"train": 2 * 16, "heldout": 2 * 8}
    assert aligner.level == "head" and aligner.model_name == MODEL


def test_store_batches_pair_components_with_their_own_targets(world):
    from align import StoreAlignmentData

    store = world["stores"]["head"]
    projection = torch.randn(192, 32, generator=torch.Generator().manual_seed(0))
    representation = torch.cat([r for _, r, _ in store.iter_shards()])              # [N, 192]
    targets = torch.nn.functional.normalize(representation @ projection, dim=-1)     # a known function of x
    data = StoreAlignmentData(store, targets, batch_size=3, heldout_fraction=0.25)
    seen = {}
    for split in ("train", "heldout"):
        for components, batch_targets in data.batches(split, epoch=5 if split == "train" else None):
            expected = torch.nn.functional.normalize(components.sum(0) @ projection, dim=-1)
            torch.testing.assert_close(batch_targets, expected, atol=1e-4, rtol=0)
            seen[split] = seen.get(split, 0) + components.shape[1]
    assert seen == {"train": 30, "heldout": 10}
