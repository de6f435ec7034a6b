"""``vit-decompose attribute``: which components and which source positions push each image towards a target,
for a folder (``--images DIR``, decomposed here ``--batch-size`` images at a time) or single files (``--image``).

    vit-decompose attribute --model NAME [--checkpoint FILE] --images DIR --out DIR
        --class N|NAME | --text "a dog" --aligner ALIGNER | --vector FILE.npy | --image-folder [--class-names FILE]

Each batch is scored along its targets' directions (``align.attribution.attribute``; the component vectors are never
built). Written to ``--out`` as the images are done, so a killed run keeps every image already written:

  attribution.json  {model, level, target, output, "images": [{id, target, total, top_components, rest,
                    top_positions}, ...]}, valid JSON after every batch; at the end also images_done and
                    mean_top_components
  attribution.csv   the same as a long table: image, target, kind (total | component | rest | position), rank, item,
                    score
  heatmaps/*.png    level token: the first --heatmaps images' source-position scores over the image
  attribution.png   at the end: the components' mean scores over the images (level token: and the position grid)

``total`` is the target's value of the model's own output (the class logit, ⟨representation, v⟩; for a text, the
sum of the scores: the aligner maps each component on its own), ``rest`` the summed score of the components not
listed, so the listed scores and ``rest`` add up to ``total`` (to the decomposition's checked sum error).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.attribution import Attribution, attribute
from align.compalign import AlignerMismatch, CompAlign
from align.drawing import heatmap_overlay
from decompose import trace_and_decompose
from decompose.dataset import evaluation_transform
from decompose.directions import DirectionError
from decompose.store import preprocessing_transform

from .attribution_files import AttributionFiles
from .attribution_targets import ImageTargets, TargetKind, check_image_folder, check_target_options, image_targets
from .decompose_commands import model_and_data_config
from .heatmap_commands import safe_file_name
from .heatmap_sources import aligner_misfit, read_images
from .image_batches import ImageBatches
from .options import add_clip_options, add_device_option, add_model_options, clip_for_aligner, device_of, templates


def _image_source(args) -> tuple[ImageBatches, list[str]]:
    """The images and the ids to attribute (refused before the model is loaded)."""
    if not args.images and not args.image:
        raise ValueError("give --images DIR (a folder, read batch by batch) or --image FILE (repeatable)")
    source = ImageBatches(args.images) if args.images else ImageBatches(files=args.image)
    ids = args.image if args.images and args.image else source.ids()
    return source, ids[:args.max_images]


class ModelAttribution:
    """``--model`` traced for the target's output, with the aligner and CLIP of a text target."""

    def __init__(self, args, device: torch.device):
        model, config = model_and_data_config(args)
        self.transform, self.preprocessing = evaluation_transform(config)
        probe = torch.zeros((1, *self.preprocessing["input_size"]), device=device)
        decomposers = {}

        def width(output: str) -> int:
            if output not in decomposers:
                decomposers[output] = trace_and_decompose(model.to(device), output=output)
            return decomposers[output].output_width(probe)

        self.targets: ImageTargets = image_targets(args, model, width)
        width(self.targets.output)                                   # traced here if the target needed no width
        self.decomposer = decomposers[self.targets.output]
        self.aligner = self.clip = None
        if self.targets.kind is TargetKind.TEXT:
            self.aligner = CompAlign.load(args.aligner, model=args.model, device=device)
            self.clip = clip_for_aligner(args, self.aligner, device)
        self.args, self.device = args, device

    def __call__(self, ids: list[str], images: torch.Tensor) -> tuple[Attribution, torch.Tensor]:
        """(the attribution of ``images`` [b, 3, H, W] to their targets, each image's total [b] on the cpu)."""
        wanted = self.targets.of(ids)
        if isinstance(wanted, torch.Tensor):
            wanted = wanted.to(self.device)
        try:
            result = attribute(self.decomposer, images.to(self.device), wanted, level=self.args.level,
                               aligner=self.aligner, clip=self.clip, templates=templates(self.args.templates))
        except (AlignerMismatch, DirectionError) as error:
            if self.aligner is None:
                raise
            raise aligner_misfit(self.args, self.aligner, error) from None
        totals = self.targets.totals(result.decomposition, wanted, result.scores)
        result.scores = result.scores.float().cpu()                                       # [C, b]
        return result, totals.float().cpu()


def _image_record(image_id: str, target: dict, result: Attribution, b: int, total: float, top: int,
                  kinds: dict[str, str]) -> dict:
    """One image's JSON: target, total, top components (key, kind, score), the rest's score, top positions."""
    listed = result.top_components(top, image=b)
    record = {"id": image_id, "target": target, "total": total,
              "top_components": [{"component": key, "kind": kinds[key], "score": score} for key, score in listed],
              "rest": float(result.scores[:, b].sum()) - sum(score for _, score in listed)}
    if result.level == "token":
        record["top_positions"] = [{"row": row, "col": col, "score": score}
                                   for (row, col), score in result.top_positions(top, image=b)]
    return record


def _write_heatmaps(folder: Path, source: ImageBatches, ids: list[str], result: Attribution, pictures) -> None:
    """The source-position scores of the images ``ids`` (the batch's first ones) over the pictures."""
    folder.mkdir(exist_ok=True)
    shown = read_images(source.root, ids, pictures)                                        # [n, 3, H, W] in [0, 1]
    maps = result.heatmaps(tuple(shown.shape[-2:]))                                         # [b, H, W]
    for image_id, picture, heatmap in zip(ids, shown, maps):
        heatmap_overlay(picture, heatmap).save(folder / f"{safe_file_name(image_id)}.png")


@torch.no_grad()
def _command_attribute(args) -> int:
    device = device_of(args.device)
    source, ids = _image_source(args)
    check_target_options(args)
    if args.image_folder:
        check_image_folder(ids)
    scorer = ModelAttribution(args, device)
    source.transform = scorer.transform
    pictures = preprocessing_transform(scorer.preprocessing, normalise=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = scorer.targets.summary
    files = AttributionFiles(out, {"model": args.model, "level": args.level, "target": target,
                                   "output": scorer.targets.output})
    sums, done, labels = None, 0, None
    print(f"{'image':40s} {'total':>10s}  top component")
    batches = source.batches(ids, args.batch_size)
    for batch_ids, images in tqdm(batches, total=math.ceil(len(ids) / args.batch_size), desc="attribute",
                                  unit="batch"):
        result, totals = scorer(batch_ids, images)
        kinds = {label.key: str(label.kind) for label in result.labels}
        records = [_image_record(image_id, scorer.targets.describe(image_id), result, b, float(totals[b]), args.top,
                                 kinds) for b, image_id in enumerate(batch_ids)]
        files.add(records)
        for record in records:
            print(f"{record['id']:40s} {record['total']:10.4f}  {record['top_components'][0]['component']}")
        if args.level == "token" and done < args.heatmaps:
            _write_heatmaps(out / "heatmaps", source, batch_ids[:args.heatmaps - done], result, pictures)
        sums = result.scores.double().sum(1) + (0 if sums is None else sums)               # [C]
        done, labels = done + len(batch_ids), result.labels
    mean = Attribution((sums / done).float()[:, None], labels, [f"{target} (mean over {done} images)"], args.level,
                       None)
    files.finish({"images_done": done, "mean_top_components": [{"component": key, "score": score}
                                                               for key, score in mean.top_components(args.top)]})
    mean.plot(args.top).savefig(out / "attribution.png", dpi=110)
    listed = mean.table(min(args.top, 10)).split("\n", 1)[1]         # its first line would say "1 image"
    print(f"\ntarget: {target}  (mean over {done} images, level {args.level})\n{listed}")
    print("\nwrote attribution.json, attribution.csv, attribution.png"
          + (" and heatmaps/" if args.level == "token" and args.heatmaps else "") + f" to {out}")
    return 0


def add_attribute_command(subparsers) -> None:
    """Register ``attribute``."""
    command = subparsers.add_parser("attribute", help="which components and source positions push each image "
                                    "towards a class, a text or a vector (JSON, CSV, PNG)", description=__doc__.replace("``", ""),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(command, model_help="timm name (or open_clip:ARCH)")
    images = command.add_argument_group("the images")
    images.add_argument("--images", metavar="DIR", help="image folder, read recursively --batch-size at a time (an "
                        "ImageFolder layout works)")
    images.add_argument("--image", action="append", metavar="PATH", help="an image file (repeatable); with --images, "
                        "an image id inside it (CLASS/IMAGE)")
    images.add_argument("--max-images", type=int, help="only the first ones")
    images.add_argument("--batch-size", type=int, default=16)
    target = command.add_argument_group("the target (exactly one)").add_mutually_exclusive_group(required=True)
    target.add_argument("--class", dest="target_class", metavar="N|NAME", help="a class of the classifier (its "
                        "logit): an index, or a name from --class-names or the model's own class names")
    target.add_argument("--text", help="a text in CLIP space (needs --aligner)")
    target.add_argument("--vector", metavar="FILE", help="a direction [D] of the representation (pre-logits), "
                        ".npy or a torch .pt file")
    target.add_argument("--image-folder", action="store_true", help="each image's own class, the folder it sits "
                        "in: its logit (classes in the order of --class-names or the model's names), or with "
                        "--aligner its class text")
    command.add_argument("--class-names", help='the classes: JSON {"folder": "name"} or LOC_synset_mapping.txt '
                         "lines, in the classifier's order (default: the model's own names); with --image-folder "
                         "--aligner, the folders' texts (default: ImageNet names for WordNet ids, else the folder)")
    command.add_argument("--aligner", help="aligner folder (vit-decompose align --out): --text, --image-folder texts")
    command.add_argument("--templates", help="imagenet (default), raw, or a JSON list of templates with {}")
    add_clip_options(command, required=False)
    command.add_argument("--level", default="token", choices=["head", "token"])
    command.add_argument("--top", type=int, default=10, help="components and positions listed per image")
    command.add_argument("--heatmaps", type=int, default=4, help="level token: heatmap PNGs of the first images")
    command.add_argument("--out", required=True, help="folder for the JSON, CSV and PNG files")
    add_device_option(command)
    command.set_defaults(run=_command_attribute)
