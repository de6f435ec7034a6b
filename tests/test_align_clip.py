"""The CLIP side: configs, local checkpoints, offline errors, text banks and their cache."""
import pytest
import torch
from safetensors.torch import save_file

import align.text_bank as text_bank
from align import ClipLoadError, TextEmbeddingCache, encode_descriptions, imagenet_templates, load_clip

TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
                 text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return load_clip(config=TINY_CLIP)


def test_imagenet_templates_ship_with_the_package():
    templates = imagenet_templates()
    assert len(templates) == 80 and all(t.count("{}") == 1 for t in templates)
    assert "a photo of a {}." in templates


def test_config_model_encodes_normalised_images_and_texts(tiny_clip):
    images = tiny_clip.encode_images(torch.randn(3, 3, 32, 32))
    texts = tiny_clip.encode_texts(["a red car", "a dog"])
    assert images.shape == (3, 32) and texts.shape == (2, 32) and tiny_clip.embed_dim == 32
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    assert tiny_clip.spec == {"config": TINY_CLIP} and tiny_clip.identity.startswith("config:")


def test_local_checkpoints_load_and_name_their_weights(tiny_clip, tmp_path):
    state = tiny_clip.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    torch.save(state, tmp_path / "clip.pt")
    reloaded = [load_clip(config=TINY_CLIP, checkpoint=tmp_path / name) for name in ("clip.safetensors", "clip.pt")]
    for clip in reloaded:
        assert all(torch.equal(a, b) for a, b in zip(clip.model.state_dict().values(), state.values()))
        assert clip.spec["checkpoint"].endswith(("clip.safetensors", "clip.pt"))
    assert reloaded[0].identity.split(":file-")[0] == tiny_clip.identity.split(":weights-")[0]
    torch.save({"weights": state, "code": object()}, tmp_path / "pickled.pt")
    with pytest.raises(ClipLoadError, match="weights_only=True"):
        load_clip(config=TINY_CLIP, checkpoint=tmp_path / "pickled.pt")
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_clip(config=TINY_CLIP, checkpoint=tmp_path / "missing.safetensors")


def test_offline_pretrained_tag_says_how_to_pass_a_local_file(monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("Failed to download file (open_clip_pytorch_model.bin): no connection")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ClipLoadError, match="checkpoint") as error:
        load_clip("ViT-B-32", pretrained="openai")
    assert "--clip-checkpoint FILE" in str(error.value) and "weights_only=True" in str(error.value)
    with pytest.raises(ClipLoadError, match="no pretrained tag"):
        load_clip("ViT-B-32", pretrained="not_a_tag")
    with pytest.raises(ClipLoadError, match="unknown open_clip model"):
        load_clip("not-a-clip")


def test_descriptions_are_template_averages(tiny_clip):
    templates = ["a photo of a {}.", "a drawing of the {}."]
    embeddings = encode_descriptions(tiny_clip, ["cat", "beach"], templates, cache=TextEmbeddingCache())
    per_template = tiny_clip.encode_texts(["a photo of a cat.", "a drawing of the cat."])
    torch.testing.assert_close(embeddings[0], torch.nn.functional.normalize(per_template.mean(0), dim=0))
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="exactly one"):
        encode_descriptions(tiny_clip, ["cat"], ["no placeholder"])


def test_text_cache_is_keyed_by_model_and_texts(tiny_clip, tmp_path, monkeypatch):
    encoded = []
    original = text_bank._encode_with_templates
    monkeypatch.setattr(text_bank, "_encode_with_templates",
                        lambda clip, texts, *rest: encoded.append(list(texts)) or original(clip, texts, *rest))
    cache = TextEmbeddingCache(tmp_path)
    first = encode_descriptions(tiny_clip, ["red object", "dog"], cache=cache)
    again = encode_descriptions(tiny_clip, ["dog", "bus", "red object"], cache=cache)
    assert encoded == [["red object", "dog"], ["bus"]]
    torch.testing.assert_close(again[[2, 0]], first)
    from_disk = encode_descriptions(tiny_clip, ["bus", "dog"], cache=TextEmbeddingCache(tmp_path))
    assert len(encoded) == 2
    torch.testing.assert_close(from_disk, again[[1, 0]])
    torch.manual_seed(1)
    other_clip = load_clip(config=TINY_CLIP)  # other weights: other identity, encoded again
    encode_descriptions(other_clip, ["dog"], cache=cache)
    assert encoded[-1] == ["dog"]
