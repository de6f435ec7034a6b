"""``vit-decompose heatmap | segment``: token heatmaps of a text on a token-level store, and zero-shot
segmentation from them scored against masks (usage and file formats: ``keyed_files``)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from align.compalign import CompAlign
from align.datasets import ImageNetSegmentation
from align.drawing import heatmap_overlay
from align.heatmaps import attention_heatmaps, head_selector, token_heatmaps
from align.parent_maps import text_contributions
from align.segmentation import segmentation_scores
from decompose import ComponentLabel, DecompositionStore, trace_and_decompose
from decompose.attention_maps import AttentionMapCapture

from .decompose_commands import model_and_data_config
from .keyed_files import APPLICATIONS_HELP, read_table
from .options import add_model_options, add_store_options, device_of, model_from_arguments, open_store_and_aligner
from .text_queries import text_direction


def labels_with_positions(store: DecompositionStore, args) -> tuple[list[ComponentLabel], Any]:
    """The store's labels with token positions (recorded in the store, else from ``--model``), and the
    decomposer when one was built."""
    if store.level != "token":
        raise ValueError(f"heatmaps need a token-level store; this one is level {store.level!r} "
                         "(vit-decompose decompose --level token)")
    if any(label.position is not None for label in store.labels):  # stores record positions since they exist
        return store.labels, None
    if not args.model:
        raise ValueError("this store's labels carry no token positions; name its model so they can be recovered: "
                         "--model NAME [--model-kwargs JSON] [--checkpoint FILE]")
    decomposer = trace_and_decompose(model_from_arguments(args))
    probe = torch.zeros((1,) + tuple(store.manifest["preprocessing"]["input_size"]))
    labels = decomposer(probe, level="token").labels
    if [l.key for l in labels] != [l.key for l in store.labels]:
        raise ValueError(f"--model {args.model} gives other components than the store's ({len(labels)} vs "
                         f"{len(store.labels)}); pass the model (and --model-kwargs) the store was made with")
    return labels, decomposer


def read_images(root: Path, ids: list[str], transform) -> torch.Tensor:
    from PIL import Image

    images = []
    for image_id in ids:
        path = root / image_id
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} is not under {root}; pass the folder the store was made from")
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)


def _text_heatmaps(args, store: DecompositionStore, aligner, labels, ids: list[str], device) -> torch.Tensor:
    """[N, H, W] token heatmaps of the images ``ids`` along the ``--text`` direction (``--head`` heads only)."""
    direction = text_direction(args, aligner, device)
    rows, keep, size, batch_size = store.positions_of(ids), head_selector(args.head), store.image_size, args.batch_size
    maps = []
    for start in tqdm(range(0, len(rows), batch_size), desc="heatmaps", unit="batch"):
        components, _ = store.load_rows(rows[start:start + batch_size])
        contributions = text_contributions(aligner, components.to(device), labels, direction)   # [C, b]
        maps.append(token_heatmaps(contributions.cpu(), labels, size, keep))                    # [b, H, W]
    return torch.cat(maps)


@torch.no_grad()
def _command_heatmap(args) -> int:
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device, same_level=False)
    labels, _ = labels_with_positions(store, args)
    ids = args.image or store.image_ids()[:args.max_images]
    heatmaps = _text_heatmaps(args, store, aligner, labels, ids, device)
    pictures = (read_images(Path(args.images), ids, store.transform(normalise=False))
                if args.images else [None] * len(ids))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    print(f"{'image':40s} {'min':>9s} {'max':>9s}  file")
    for image_id, heatmap, picture in zip(ids, heatmaps, pictures):
        path = out / f"{_safe_name(image_id)}.png"
        heatmap_overlay(picture, heatmap, args.alpha).save(path)
        index.append({"id": image_id, "file": path.name, "min": float(heatmap.min()), "max": float(heatmap.max())})
        print(f"{image_id:40s} {float(heatmap.min()):9.4f} {float(heatmap.max()):9.4f}  {path.name}")
    from safetensors.torch import save_file

    save_file({"heatmaps": heatmaps.contiguous()}, str(out / "heatmaps.safetensors"),
              metadata={"ids": json.dumps(ids), "text": json.dumps(args.text)})
    (out / "heatmaps.json").write_text(json.dumps({"text": args.text, "heads": args.head, "images": index},
                                                  indent=1))
    print(f"\nwrote {len(ids)} overlays and heatmaps.safetensors ([N, H, W]) to {out}")
    return 0


def _read_masks(args, store: DecompositionStore) -> tuple[list[str], torch.Tensor]:
    from PIL import Image

    table = read_table(args.masks, value_field="mask")
    folder = Path(args.masks).parent
    transform = store.transform(normalise=False, nearest=True)
    ids, masks = [], []
    for image_id, record in table.items():
        if "mask" not in record:
            raise ValueError(f"{args.masks}: no 'mask' for {image_id!r}")
        with Image.open(folder / record["mask"]) as mask:
            masks.append(transform(mask.convert("L").convert("RGB"))[0] > 0)
        ids.append(image_id)
    if args.max_images:
        ids, masks = ids[:args.max_images], masks[:args.max_images]
    return ids, torch.stack(masks)


@torch.no_grad()
def _command_segment(args) -> int:
    device = device_of(args.device)
    if args.imagenet_seg:
        count, results = _segment_imagenet_file(args, device)
    else:
        if not args.store or not args.masks:
            raise ValueError("give a token-level --store and its --masks, or --imagenet-seg gtsegs_ijcv.mat with "
                             "--model (its images are decomposed here)")
        store, aligner = open_store_and_aligner(args, device, same_level=False)
        labels, decomposer = labels_with_positions(store, args)
        ids, masks = _read_masks(args, store)
        heatmaps = _text_heatmaps(args, store, aligner, labels, ids, device)
        count, results = len(ids), {"decomposition": segmentation_scores(heatmaps, masks).as_dict()}
        if args.baseline:
            results["attention (last layer)"] = _baseline_scores(args, store, ids, masks, decomposer).as_dict()
    print(f"zero-shot segmentation of {count} images for {' + '.join(map(repr, args.text))}\n")
    print(f"{'method':28s} {'pixel acc':>9s} {'fg IoU':>8s} {'mIoU':>8s} {'mAP':>8s}")
    for name, scores in results.items():
        print(f"{name:28s} {scores['pixel_accuracy']:9.4f} {scores['foreground_iou']:8.4f} "
              f"{scores['mean_iou']:8.4f} {scores['mean_average_precision']:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"text": args.text, "images": count, "scores": results}, indent=1))
    return 0


def _squashed_transforms(pretrained_cfg: dict) -> tuple:
    """(image, mask) transforms PIL -> [3, H, W]: resized to the model's input size without a crop, as the
    reference ImageNet-Segmentation evaluation does (Resize((224, 224)); masks with nearest neighbours)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, pretrained_cfg=pretrained_cfg)
    common = dict(input_size=config["input_size"], crop_pct=1.0, crop_mode="squash", is_training=False)
    image = create_transform(**common, interpolation=config["interpolation"], mean=config["mean"], std=config["std"])
    mask = create_transform(**common, interpolation="nearest", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return image, mask


@torch.no_grad()
def _segment_imagenet_file(args, device) -> tuple[int, dict]:
    """Token heatmaps of ``--imagenet-seg`` 's images (decomposed here by ``--model``, batch by batch) along the
    ``--text`` direction, scored against its masks; with ``--baseline`` also the last layer's attention."""
    from PIL import Image

    if not args.model:
        raise ValueError("--imagenet-seg decomposes its images: give --model NAME (and --checkpoint / --pretrained / "
                         "--model-kwargs)")
    data = ImageNetSegmentation(args.imagenet_seg)
    model, config = model_and_data_config(args)
    aligner = CompAlign.load(args.aligner, model=args.model, device=device)
    decomposer = trace_and_decompose(model.to(device))
    capture = AttentionMapCapture(decomposer) if args.baseline else None
    image_transform, mask_transform = _squashed_transforms(config)
    direction = text_direction(args, aligner, device)
    count = min(len(data), args.max_images or len(data))
    ours, theirs, masks = [], [], []
    for start in tqdm(range(0, count, args.batch_size), desc="segment", unit="batch"):
        pairs = [data[i] for i in range(start, min(start + args.batch_size, count))]
        images = torch.stack([image_transform(Image.fromarray(image)) for image, _ in pairs]).to(device)
        masks += [mask_transform(Image.fromarray(mask.astype("uint8") * 255).convert("RGB"))[0] > 0.5
                  for _, mask in pairs]
        dec = decomposer(images, level="token")
        size = tuple(images.shape[-2:])
        contributions = text_contributions(aligner, dec.components, dec.labels, direction).cpu()       # [C, b]
        ours.append(token_heatmaps(contributions, dec.labels, size, head_selector(args.head)))
        if capture is not None:
            theirs.append(attention_heatmaps(capture(images), size).cpu())
    masks = torch.stack(masks)
    results = {"decomposition": segmentation_scores(torch.cat(ours), masks).as_dict()}
    if capture is not None:
        results["attention (last layer)"] = segmentation_scores(torch.cat(theirs), masks).as_dict()
    return count, results


def _baseline_scores(args, store, ids, masks, decomposer):
    if not args.images or not args.model:
        raise ValueError("--baseline runs the model: give --images DIR and --model NAME (with --model-kwargs / "
                         "--checkpoint as the store was made)")
    capture = AttentionMapCapture(decomposer or trace_and_decompose(model_from_arguments(args)))
    transform = store.transform()
    size = store.image_size
    maps = []
    for start in tqdm(range(0, len(ids), args.batch_size), desc="attention", unit="batch"):
        images = read_images(Path(args.images), ids[start:start + args.batch_size], transform)
        maps.append(attention_heatmaps(capture(images), size))
    return segmentation_scores(torch.cat(maps), masks)



def add_heatmap_commands(subparsers) -> None:
    """Register ``heatmap`` and ``segment``."""
    for name, help_text in (("heatmap", "token heatmaps of a text on a token-level store (PNG overlays)"),
                            ("segment", "zero-shot segmentation from token heatmaps, scored against masks")):
        command = subparsers.add_parser(name, help=help_text, description=APPLICATIONS_HELP,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        add_store_options(command, store_required=name == "heatmap")
        add_model_options(command.add_argument_group("the store's model (for token positions / the attention "
                                                     "baseline)"),
                          required=False, model_help="timm name (or open_clip:ARCH) the store was decomposed with")
        command.add_argument("--text", action="append", required=True, help="the text (repeat: their mean)")
        command.add_argument("--head", action="append", help="only this head (blocks.3.attn.h5) or attention "
                             "branch (blocks.3.attn); repeatable; default: every head")
        command.add_argument("--images", help="the image folder the store was decomposed from")
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
