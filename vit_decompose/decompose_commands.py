"""``vit-decompose trace | decompose``: a model's components on a synthetic batch, or a folder of images
decomposed into a store (resumable; one store from every rank under torchrun)."""
from __future__ import annotations

import json
import os
import time

import torch

from decompose import decompose_dataset, trace_and_decompose
from decompose.dataset import evaluation_transform

from .options import add_device_option, add_model_options, device_of, model_from_arguments, model_kwargs


def synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images [count, 3, size, size] (deterministic)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def decompose_and_report(model, images, level: str) -> tuple[dict, str]:
    """(summary: component count, relative error, timings; the table of the top 25 components)."""
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


def model_and_data_config(args) -> tuple[torch.nn.Module, dict]:
    """The model of ``--model`` / ``--checkpoint`` / ``--model-kwargs`` and its preprocessing config.

    timm keeps the default size in ``pretrained_cfg`` whatever ``img_size`` the model was built
    with, so ``--image-size`` (or ``img_size`` in the kwargs) sets ``input_size``.
    """
    model = model_from_arguments(args)
    config = dict(getattr(model, "pretrained_cfg", None) or {})
    config.setdefault("input_size", (3, 224, 224))
    image_size = getattr(args, "image_size", None) or model_kwargs(args).get("img_size")
    if image_size:
        config["input_size"] = (config["input_size"][0], image_size, image_size)
        config.pop("test_input_size", None)
    return model, config


def _command_trace(args) -> int:
    model, config = model_and_data_config(args)
    device = device_of(args.device)
    size = tuple(config["input_size"])
    images = synthetic_images(args.batch, size[-1])[:, : size[0]].to(device)
    model = model.to(device)
    summary, table = decompose_and_report(model, images, args.level)
    print(table)
    print(json.dumps(summary, indent=2))
    return 0


def _command_decompose(args) -> int:
    device = device_of(args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.distributed.is_initialized():  # launched by torchrun
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model, config = model_and_data_config(args)
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


def _add_decomposition_options(parser) -> None:
    add_model_options(parser)
    parser.add_argument("--image-size", type=int, help="override the model's input size")
    parser.add_argument("--level", default="head", choices=["branch", "head", "token"])
    add_device_option(parser)


def add_decompose_commands(subparsers) -> None:
    """Register ``trace`` and ``decompose``."""
    trace = subparsers.add_parser("trace", help="trace a model, decompose a synthetic batch, print components")
    _add_decomposition_options(trace)
    trace.add_argument("--batch", type=int, default=2)
    trace.set_defaults(run=_command_trace)
    dataset = subparsers.add_parser("decompose", help="decompose a folder of images into a store on disk "
                                    "(resumable; shards across ranks under torchrun)")
    _add_decomposition_options(dataset)
    dataset.add_argument("--images", required=True, help="image folder (ImageFolder layout works)")
    dataset.add_argument("--out", required=True, help="store folder (created; an existing one is resumed)")
    dataset.add_argument("--batch-size", type=int, default=16)
    dataset.add_argument("--workers", type=int, default=0)
    dataset.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    dataset.set_defaults(run=_command_decompose)
