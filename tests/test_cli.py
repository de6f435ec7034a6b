"""The command line: local checkpoints, clear errors (the demo: test_demo.py)."""
import timm
import torch
from safetensors.torch import save_file

from decompose.models import load_model
from vit_decompose.cli import main


def test_local_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    kwargs = dict(depth=1, img_size=32)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    for path in ("w.safetensors", "w.pth"):
        loaded = load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / path), **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


def test_cli_reports_bad_checkpoint_and_unknown_model(tmp_path, capsys):
    assert main(["trace", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["trace", "--model", "not_a_model_xyz"]) == 2
    assert "unknown timm model" in capsys.readouterr().err


def test_cli_device_option(capsys):
    tiny = ["--model", "vit_tiny_patch16_224", "--model-kwargs", '{"depth": 1, "img_size": 32}']
    assert main(["trace", *tiny, "--device", "cpu"]) == 0
    assert '"relative_error"' in capsys.readouterr().out
    assert main(["trace", *tiny, "--device", "gpu0"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["trace", *tiny, "--device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
