"""``vit-decompose heatmap | segment``: token heatmaps of a text, and zero-shot segmentation from them scored
against masks, from a token-level store or from ``--model`` decomposing an image folder batch by batch
(``heatmap_sources``; usage and file formats: ``keyed_files``)."""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.datasets import ImageNetSegmentation
from align.drawing import heatmap_overlay
from align.heatmaps import attention_heatmaps, head_selector
from align.segmentation import SegmentationTally
from decompose.attention_maps import AttentionMapCapture

from .heatmap_sources import ModelHeatmaps, heatmap_source, read_images
from .keyed_files import APPLICATIONS_HELP, read_table
from .options import add_image_folder_option, add_model_options, add_store_options, device_of


def safe_file_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)


def _progress(batches, ids: list[str], batch_size: int, description: str):
    return tqdm(batches, total=math.ceil(len(ids) / batch_size), desc=description, unit="batch")


@torch.no_grad()
def _command_heatmap(args) -> int:
    device = device_of(args.device)
    source = heatmap_source(args, device)
    ids = args.image or source.first_ids(args.max_images)
    keep = head_selector(args.head)
    pictures = source.transform(normalise=False) if source.folder is not None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, maps, index = [], [], []
    print(f"{'image':40s} {'min':>9s} {'max':>9s}  file")
    for batch in _progress(source.batches(ids, args.batch_size, keep), ids, args.batch_size, "heatmaps"):
        shown = read_images(source.folder, batch.ids, pictures) if pictures else [None] * len(batch.ids)
        for image_id, heatmap, picture in zip(batch.ids, batch.heatmaps, shown):
            path = out / f"{safe_file_name(image_id)}.png"
            heatmap_overlay(picture, heatmap, args.alpha).save(path)
            low, high = float(heatmap.min()), float(heatmap.max())
            index.append({"id": image_id, "file": path.name, "min": low, "max": high})
            print(f"{image_id:40s} {low:9.4f} {high:9.4f}  {path.name}")
        written += batch.ids
        maps.append(batch.heatmaps)
    from safetensors.torch import save_file

    save_file({"heatmaps": torch.cat(maps).contiguous()}, str(out / "heatmaps.safetensors"),
              metadata={"ids": json.dumps(written), "text": json.dumps(args.text)})
    (out / "heatmaps.json").write_text(json.dumps({"text": args.text, "heads": args.head, "images": index},
                                                  indent=1))
    print(f"\nwrote {len(written)} overlays and heatmaps.safetensors ([N, H, W]) to {out}")
    return 0


def _mask_files(args) -> dict[str, Path]:
    """image id -> mask file of ``--masks`` (the first ``--max-images``)."""
    table = read_table(args.masks, value_field="mask")
    folder = Path(args.masks).parent
    files = {}
    for image_id, record in table.items():
        if "mask" not in record:
            raise ValueError(f"{args.masks}: no 'mask' for {image_id!r}")
        files[image_id] = folder / record["mask"]
    return dict(list(files.items())[:args.max_images])


def _read_masks(paths: list[Path], transform) -> torch.Tensor:
    """bool [N, H, W]: the masks (nonzero pixels) through ``transform`` (nearest neighbours)."""
    from PIL import Image

    masks = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        with Image.open(path) as mask:
            masks.append(transform(mask.convert("L").convert("RGB"))[0] > 0)
    return torch.stack(masks)


@torch.no_grad()
def _command_segment(args) -> int:
    device = device_of(args.device)
    if args.imagenet_seg:
        count, results = _segment_imagenet_file(args, device)
    else:
        count, results = _segment_masks(args, device)
    print(f"zero-shot segmentation of {count} images for {' + '.join(map(repr, args.text))}\n")
    print(f"{'method':28s} {'pixel acc':>9s} {'fg IoU':>8s} {'mIoU':>8s} {'mAP':>8s}")
    for name, scores in results.items():
        print(f"{name:28s} {scores['pixel_accuracy']:9.4f} {scores['foreground_iou']:8.4f} "
              f"{scores['mean_iou']:8.4f} {scores['mean_average_precision']:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"text": args.text, "images": count, "scores": results}, indent=1))
    return 0


def _segment_masks(args, device) -> tuple[int, dict]:
    """The ``--masks`` images' heatmaps (a token ``--store``, or ``--model`` on ``--images``) scored batch by batch;
    with ``--baseline`` also the last layer's attention."""
    if not args.masks:
        raise ValueError("give --masks (with a token-level --store, or --model NAME --images DIR), or --imagenet-seg "
                         "gtsegs_ijcv.mat with --model (its images are decomposed here)")
    masks = _mask_files(args)
    source = heatmap_source(args, device)
    capture = AttentionMapCapture(source.decomposer()) if args.baseline else None
    mask_transform, ids = source.transform(normalise=False, nearest=True), list(masks)
    ours, theirs = SegmentationTally(), SegmentationTally()
    batches = source.batches(ids, args.batch_size, head_selector(args.head), with_images=capture is not None)
    for batch in _progress(batches, ids, args.batch_size, "segment"):
        truth = _read_masks([masks[image_id] for image_id in batch.ids], mask_transform)     # [b, H, W]
        ours.add(batch.heatmaps, truth)
        if capture is not None:
            theirs.add(_attention(capture, batch.images, source.image_size), truth)
    results = {"decomposition": ours.scores().as_dict()}
    if capture is not None:
        results["attention (last layer)"] = theirs.scores().as_dict()
    return ours.images, results


def _attention(capture: AttentionMapCapture, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """images [b, 3, H, W] -> [b, H, W]: the last layer's attention from the output-reading queries (the baseline)."""
    parameter = next(capture.graph_module.parameters())
    return attention_heatmaps(capture(images.to(parameter.device, parameter.dtype)), size).cpu()


def _squashed_transforms(pretrained_cfg: dict) -> tuple:
    """(image, mask) transforms PIL -> [3, H, W]: resized to the model's input size without a crop, as the
    reference ImageNet-Segmentation evaluation does (Resize((224, 224)); masks with nearest neighbours)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    common = {"input_size": config["input_size"], "crop_pct": 1.0, "crop_mode": "squash", "is_training": False}
    image = create_transform(**common, interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
    mask = create_transform(**common, interpolation="nearest", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return image, mask


@torch.no_grad()
def _segment_imagenet_file(args, device) -> tuple[int, dict]:
    """Token heatmaps of ``--imagenet-seg`` 's images (decomposed here by ``--model``, batch by batch, as scores
    along the ``--text`` 's pulled-back directions) scored against its masks; with ``--baseline`` also the last
    layer's attention."""
    from PIL import Image

    if not args.model:
        raise ValueError("--imagenet-seg decomposes its images: give --model NAME (and --checkpoint / --pretrained / "
                         "--model-kwargs)")
    data = ImageNetSegmentation(args.imagenet_seg)
    heatmaps = ModelHeatmaps(args, device)
    capture = AttentionMapCapture(heatmaps.decomposer) if args.baseline else None
    image_transform, mask_transform = _squashed_transforms(heatmaps.config)
    keep = head_selector(args.head)
    count = min(len(data), args.max_images or len(data))
    ours, theirs = SegmentationTally(), SegmentationTally()
    for start in tqdm(range(0, count, args.batch_size), desc="segment", unit="batch"):
        pairs = [data[i] for i in range(start, min(start + args.batch_size, count))]
        images = torch.stack([image_transform(Image.fromarray(image)) for image, _ in pairs])      # [b, 3, H, W]
        masks = torch.stack([mask_transform(Image.fromarray(mask.astype("uint8") * 255).convert("RGB"))[0] > 0.5
                             for _, mask in pairs])                                                # [b, H, W]
        ours.add(heatmaps(images, keep), masks)
        if capture is not None:
            theirs.add(_attention(capture, images, tuple(images.shape[-2:])), masks)
    results = {"decomposition": ours.scores().as_dict()}
    if capture is not None:
        results["attention (last layer)"] = theirs.scores().as_dict()
    return count, results


def add_heatmap_commands(subparsers) -> None:
    """Register ``heatmap`` and ``segment``."""
    for name, help_text in (("heatmap", ("token heatmaps of a text (PNG overlays), from a token-level store or "
                                          "--model on --images")),
                            ("segment", "zero-shot segmentation from token heatmaps, scored against masks")):
        command = subparsers.add_parser(name, help=help_text, description=APPLICATIONS_HELP,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        add_store_options(command, store_required=False)
        add_model_options(command.add_argument_group("the model: without --store it decomposes --images here, batch "
                                                     "by batch; with one, the store's (token positions, baseline)"),
                          required=False, model_help="timm name (or open_clip:ARCH)")
        add_image_folder_option(command, help_text="the image folder: decomposed here by --model without --store; "
                                "with --store, the folder it was decomposed from (overlays, --baseline)")
        command.add_argument("--text", action="append", required=True, help="the text (repeat: their mean)")
        command.add_argument("--head", action="append", help="only this head (blocks.3.attn.h5) or attention "
                             "branch (blocks.3.attn); repeatable; default: every head")
        command.add_argument("--max-images", type=int, default=8 if name == "heatmap" else None)
        if name == "heatmap":
            command.add_argument("--out", required=True, help="folder for the PNG overlays")
            command.add_argument("--image", action="append", help="image id (repeatable; default: the first ones)")
            command.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity over the image")
            command.set_defaults(run=_command_heatmap)
        else:
            command.add_argument("--masks", help="CSV id,mask or JSON {id: mask.png} (see above)")
            command.add_argument("--imagenet-seg", metavar="FILE.mat", help="ImageNet-Segmentation's gtsegs_ijcv.mat "
                                 "(images and masks; read with h5py) instead of --store / --masks: its images are "
                                 "decomposed here by --model, resized to the model's input size without a crop")
            command.add_argument("--baseline", action="store_true", help="also score the last layer's raw "
                                 "attention from the output-reading queries (needs --model and --images)")
            command.add_argument("--out", help="write the scores as JSON")
            command.set_defaults(run=_command_segment)
