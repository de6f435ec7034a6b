"""``vit-decompose`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from .decomposer import trace_and_decompose
from .models import ModelLoadError, load_model


def _synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images [count, 3, size, size] (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _decompose_and_report(model, images, level: str) -> tuple[dict, str]:
    started = time.perf_counter()
    decomposer = trace_and_decompose(model)
    traced = time.perf_counter() - started
    started = time.perf_counter()
    dec = decomposer(images, level=level)
    elapsed = time.perf_counter() - started
    summary = {"components": len(dec.labels), "relative_error": dec.relative_error(),
               "trace_seconds": traced, "decompose_seconds": elapsed, "level": level,
               "stopped_before": dec.stopped_before}
    return summary, dec.table(top=25)


def _command_demo(args) -> int:
    from toyworld.demo import DemoSettings, quick_settings, run_demo  # the toy world sits on top of decompose

    settings = quick_settings() if args.quick else DemoSettings()
    if args.models:
        settings.models = tuple(args.models.split(","))
    settings.threads, settings.weights = args.threads, args.weights
    run_demo(args.out, settings)
    return 0


def _model_and_data_config(args) -> tuple[torch.nn.Module, dict]:
    """The model of ``--model`` / ``--checkpoint`` / ``--model-kwargs`` and its preprocessing config.

    timm keeps the default size in ``pretrained_cfg`` whatever ``img_size`` the model was built
    with, so ``--image-size`` (or ``img_size`` in the kwargs) sets ``input_size``.
    """
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model = load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs)
    config = dict(getattr(model, "pretrained_cfg", None) or {})
    config.setdefault("input_size", (3, 224, 224))
    image_size = args.image_size or kwargs.get("img_size")
    if image_size:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
        config.pop("test_input_size", None)
    return model, config


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="timm name, or open_clip:ARCH[:TAG]")
    parser.add_argument("--checkpoint", help="local weights file (safetensors / .pth)")
    parser.add_argument("--pretrained", action="store_true", help="download the named weights")
    parser.add_argument("--model-kwargs", help='JSON keyword arguments for the model constructor, e.g. \'{"depth": 2}\'')
    parser.add_argument("--image-size", type=int, help="override the model's input size")
    parser.add_argument("--level", default="head", choices=["branch", "head", "token"])
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu; under torchrun "
                        "each rank takes cuda:LOCAL_RANK)")


def _device(requested: str | None) -> torch.device:
    """``--device``, or cuda when there is one; a torchrun rank's bare ``cuda`` is its LOCAL_RANK's GPU."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error}); use e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but torch sees no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    return device


def _command_trace(args) -> int:
    model, config = _model_and_data_config(args)
    device = _device(args.device)
    size = tuple(config["input_size"])
    images = _synthetic_images(args.batch, size[-1])[:, : size[0]].to(device)
    model = model.to(device)
    summary, table = _decompose_and_report(model, images, args.level)
    print(table)
    print(json.dumps(summary, indent=2))
    return 0


def _command_decompose(args) -> int:
    from .dataset import decompose_dataset, evaluation_transform

    device = _device(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model, config = _model_and_data_config(args)
    transform, preprocessing = evaluation_transform(config)
    decomposer = trace_and_decompose(model.to(device))
    try:
        store = decompose_dataset(decomposer, args.images, args.out, level=args.level, transform=transform,
                                  preprocessing=preprocessing, model_name=args.model, checkpoint=args.checkpoint,
                                  batch_size=args.batch_size, num_workers=args.workers,
                                  store_dtype=getattr(torch, args.dtype))
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    if store is not None:
        print(f"{args.out}: {len(store)} images, {len(store.labels)} components per image at level "
              f"{store.level}, {store.manifest['skipped_count']} unreadable files skipped")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-decompose", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole pipeline on the toy world's shipped tiny models: "
                               "DIR/report.html and DIR/metrics.json, checked against ground truth")
    demo.add_argument("--out", required=True, help="output folder (report.html, metrics.json)")
    demo.add_argument("--quick", action="store_true", help="a small sample (for tests; numbers are noisier)")
    demo.add_argument("--models", help="comma-separated subset of the toy targets (default: all)")
    demo.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    demo.add_argument("--weights", help="models trained by `vit-decompose toyworld train --out DIR` "
                      "(default: the shipped ones)")
    demo.set_defaults(run=_command_demo)
    trace = commands.add_parser("trace", help="trace a model, decompose a synthetic batch, print components")
    _add_model_options(trace)
    trace.add_argument("--batch", type=int, default=2)
    trace.set_defaults(run=_command_trace)
    dataset = commands.add_parser("decompose", help="decompose a folder of images into a store on disk "
                                  "(resumable; shards across ranks under torchrun)")
    _add_model_options(dataset)
    dataset.add_argument("--images", required=True, help="image folder (ImageFolder layout works)")
    dataset.add_argument("--out", required=True, help="store folder (created; an existing one is resumed)")
    dataset.add_argument("--batch-size", type=int, default=16)
    dataset.add_argument("--workers", type=int, default=0)
    dataset.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    dataset.set_defaults(run=_command_decompose)
    from align.cli import add_align_commands  # align / rank / describe (CLIP side)

    add_align_commands(commands)
    from toyworld.cli import add_toyworld_commands  # toyworld train

    add_toyworld_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"vit-decompose: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
