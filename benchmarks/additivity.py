"""Additivity error and trace time for every model of the test matrix (random weights, tiny configs).

    python -m benchmarks.additivity                  # table: model, trace s, error per level, f32 and f64
    python -m benchmarks.additivity --device cuda    # the same on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import timm
import torch

sys.path.insert(0, ".")
from decompose import trace_and_decompose  # noqa: E402
from tests.models import TIMM_MODELS, input_size, tiny_open_clip_vision  # noqa: E402

LEVELS = ("branch", "head", "token")


def _models():
    for name, kwargs in TIMM_MODELS.items():
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        yield name, model, input_size(model, kwargs)
    yield "open_clip ViT-B-32 tower (tiny)", tiny_open_clip_vision().eval(), (3, 64, 64)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    device = torch.device(parser.parse_args(argv).device)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"{'model':34s} {'trace s':>7s}  " + "  ".join(f"{level + ' f32':>11s} {level + ' f64':>11s}"
                                                      for level in LEVELS))
    for name, model, size in _models():
        cells = []
        started = time.perf_counter()
        decomposer = trace_and_decompose(model.to(device))
        traced = time.perf_counter() - started
        double = trace_and_decompose(model.double())
        for level in LEVELS:
            for dtype, decomp in ((torch.float32, decomposer), (torch.float64, double)):
                images = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                cells.append(f"{decomp(images, level=level).relative_error():11.1e}")
        print(f"{name:34s} {traced:7.2f}  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
