"""The paper's experiments end to end on the real data, one command each.

Waterbirds (waterbird_complete95_forest2water2/, with its metadata.csv) for DeiT and for CLIP's image encoder:

    python -m benchmarks.paper waterbirds --root waterbird_complete95_forest2water2 \\
        --model deit_base_patch16_224 --pretrained --clip ViT-B-16 --clip-pretrained openai --out runs/waterbirds-deit
    python -m benchmarks.paper waterbirds --root waterbird_complete95_forest2water2 \\
        --model open_clip:ViT-B-16:openai --pretrained --clip ViT-B-16 --clip-pretrained openai --zero-shot \\
        --out runs/waterbirds-clip

ImageNet-Segmentation (gtsegs_ijcv.mat; the aligner is trained on a folder of ImageNet images, e.g. a few
thousand validation images in ImageFolder layout):

    python -m benchmarks.paper imagenet-seg --mat gtsegs_ijcv.mat --align-images imagenet/val \\
        --model deit_base_patch16_224 --pretrained --clip ViT-B-16 --clip-pretrained openai --out runs/seg-deit

--pretrained and --clip-pretrained TAG download the weights (timm's and open_clip's hubs). Offline, give local
files instead: --checkpoint deit_base.safetensors (with --model naming its architecture) and
--clip ViT-B-16 --clip-checkpoint clip_vit_b16.safetensors; for CLIP's image encoder as the model,
--model open_clip:ViT-B-16 --checkpoint clip_vit_b16.safetensors.

Waterbirds: decompose ROOT (level head), align to CLIP on the same images, debias (the spurious components are
ranked by the texts SPURIOUS vs CORE on the val split, k chosen on val by worst-group accuracy, reported on
test). ImageNet-Segmentation: decompose and align on the ImageNet folder, then segment the .mat file's images
(decomposed at level token, batch by batch) along --text, with the last layer's attention as the baseline.
Each step is a ``vit-decompose`` command, printed before it runs; steps whose output is complete are skipped, so
a killed run continues (a done step run with other options is refused: OUT/steps.json records each command).
``OUT/results.json`` holds our numbers next to the paper's.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from vit_decompose.cli import main as vit_decompose

SPURIOUS = ["water background", "land background", "an ocean", "a lake", "a forest", "a bamboo forest"]
CORE = ["a bird", "a landbird", "a waterbird", "a seabird"]
PAPER = {   # the numbers the paper reports
    "waterbirds": {"worst-group accuracy, DeiT-B": {"before": 0.733, "after": 0.815},
                   "worst-group accuracy, CLIP": {"before": 0.507, "after": 0.744}},
    "imagenet-seg": {"DeiT-B": {"pixel_accuracy": 0.772, "mean_iou": 0.529, "mean_average_precision": 0.831}},
}


STEPS = "steps.json"   # in --out: the command each step was run with
HOW_IT_RUNS = {"--device", "--batch-size"}   # options a step can be rerun with other values of


class StepFailed(RuntimeError):
    """A ``vit-decompose`` step returned an error (it printed why)."""


def _run(arguments: list[str], out: Path, done) -> None:
    """Run ``vit-decompose arguments`` unless ``done()`` says its output is complete. Each step's command is
    recorded in ``out/steps.json``; a done step made by another command (other texts, model, options) is refused
    rather than reused (other --device or --batch-size values are fine)."""
    command = shlex.join(["vit-decompose", *arguments])
    record = out / STEPS
    steps = json.loads(record.read_text()) if record.is_file() else {}
    step = arguments[0]
    if done():
        if step in steps and _what_it_computes(shlex.split(steps[step])) != _what_it_computes(["vit-decompose",
                                                                                              *arguments]):
            raise ValueError(f"{out}: its {step} step was run as\n  {steps[step]}\nnot as\n  {command}\n"
                             f"remove that step's output (or all of {out}) or choose another --out")
        print(f"skip (done): {command}", flush=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(dict(steps, **{step: command}), indent=1))
    print(command, flush=True)
    if vit_decompose(arguments) != 0:
        raise StepFailed(f"this step failed (its error is above): {command}")


def _what_it_computes(command: list[str]) -> list[str]:
    """A step's command without the options that change how it runs but not what it computes."""
    kept, skip_next = [], False
    for word in command:
        if not skip_next and word not in HOW_IT_RUNS:
            kept.append(word)
        skip_next = word in HOW_IT_RUNS and not skip_next
    return kept


def _store_complete(store: Path) -> bool:
    """A store's manifest is written when its decomposition starts; ``complete`` is set once every image is in."""
    manifest = store / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("complete", False)


def _model(args) -> list[str]:
    return (["--model", args.model] + (["--pretrained"] if args.pretrained else [])
            + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
            + (["--model-kwargs", args.model_kwargs] if args.model_kwargs else []))


def _clip(args) -> list[str]:
    return ((["--clip", args.clip] if args.clip else [])
            + (["--clip-config", args.clip_config] if args.clip_config else [])
            + (["--clip-pretrained", args.clip_pretrained] if args.clip_pretrained else [])
            + (["--clip-checkpoint", args.clip_checkpoint] if args.clip_checkpoint else []))


def _device(args) -> list[str]:
    return ["--device", args.device] if args.device else []


def _store_and_aligner(args, images: Path, out: Path) -> tuple[Path, Path]:
    store, aligner = out / "store", out / "aligner"
    _run(["decompose", *_model(args), "--images", str(images), "--out", str(store), "--level", "head",
          "--batch-size", str(args.batch_size), *_device(args)], out, lambda: _store_complete(store))
    _run(["align", "--store", str(store), "--images", str(images), "--out", str(aligner), *_clip(args),
          "--epochs", str(args.align_epochs), *_device(args)], out, (aligner / "aligner.json").is_file)
    return store, aligner


# --- checks of the inputs, before hours of decomposition ---------------------------------------------------

def _check_options(args) -> None:
    if args.pretrained and args.checkpoint:
        raise ValueError("give --pretrained (download the named weights) or --checkpoint FILE (local weights), "
                         "not both")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such file")
    if bool(args.clip) == bool(args.clip_config):
        raise ValueError("name the CLIP model: --clip ARCH (e.g. ViT-B-16, with --clip-pretrained TAG or "
                         "--clip-checkpoint FILE) or --clip-config JSON, one of them")
    if args.clip_checkpoint and not Path(args.clip_checkpoint).is_file():
        raise FileNotFoundError(f"--clip-checkpoint {args.clip_checkpoint}: no such file")


def _image_folder(path: str, option: str) -> Path:
    from decompose.dataset import IMAGE_SUFFIXES

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {path}: no such folder")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        raise ValueError(f"{option} {path}: no image files in it ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return folder


def check_waterbirds(root: str) -> dict[str, dict[str, str]]:
    """Waterbirds' metadata.csv under ``root``, with every listed image present and val and test splits."""
    from align.datasets import read_waterbirds

    folder = Path(root)
    expected = "give the Waterbirds folder (waterbird_complete95_forest2water2/) holding metadata.csv and the images"
    if not folder.is_dir():
        raise FileNotFoundError(f"--root {root}: {'a file, not a folder' if folder.exists() else 'no such folder'}; "
                                + expected)
    if not (folder / "metadata.csv").is_file():
        raise FileNotFoundError(f"--root {root}: no metadata.csv in it; {expected}")
    table = read_waterbirds(folder)
    missing = [name for name in table if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"--root {root}: {len(missing)} of the {len(table)} images metadata.csv lists are "
                                f"missing, e.g. {', '.join(missing[:3])}")
    splits = {record["split"] for record in table.values()}
    if not {"val", "test"} <= splits:
        raise ValueError(f"--root {root}: metadata.csv has the splits {sorted(splits)}; k is chosen on val and "
                         "reported on test, both are needed")
    return table


def check_imagenet_segmentation(mat: str) -> int:
    """The number of images in ImageNet-Segmentation's file (refused unless in gtsegs_ijcv.mat's layout)."""
    from align.datasets import ImageNetSegmentation

    data = ImageNetSegmentation(mat)
    try:
        if not len(data):
            raise ValueError(f"--mat {mat} holds no images")
        return len(data)
    finally:
        data.close()


# --- the experiments ----------------------------------------------------------------------------------------

def waterbirds(args) -> dict:
    """Waterbirds: worst-group accuracy before and after removing the components of the spurious background."""
    table = check_waterbirds(args.root)
    out = Path(args.out)
    store, aligner = _store_and_aligner(args, Path(args.root), out)
    texts = [x for t in SPURIOUS for x in ("--spurious", t)] + [x for t in CORE for x in ("--core", t)]
    _run(["debias", "--store", str(store), "--aligner", str(aligner), "--waterbirds", args.root, *texts,
          *(["--zero-shot"] if args.zero_shot else []), "--max-k", str(args.max_k), "--out", str(out / "debias"),
          *_clip(args), *_device(args)], out, (out / "debias" / "debias.json").is_file)
    result = json.loads((out / "debias" / "debias.json").read_text())
    ours = {"images_listed": len(table), "classifier": result["classifier"], "k": result["k"],
            "ablated": result["ablated_keys"],
            **{name: {"before": result["before"][name], "after": result["after"][name]}
               for name in ("worst", "average", "overall")},
            "per_group": {"before": result["before"]["per_group"], "after": result["after"]["per_group"]}}
    print(f"\n{'worst-group accuracy':30s} {'before':>8s} {'after':>8s}")
    print(f"{'ours (' + args.model + ')':30s} {ours['worst']['before']:8.3f} {ours['worst']['after']:8.3f}")
    for name, numbers in PAPER["waterbirds"].items():
        print(f"{'paper, ' + name.split(', ')[1]:30s} {numbers['before']:8.3f} {numbers['after']:8.3f}")
    return ours


def imagenet_seg(args) -> dict:
    """ImageNet-Segmentation: zero-shot segmentation from token heatmaps, with the attention baseline."""
    count = check_imagenet_segmentation(args.mat)
    images = _image_folder(args.align_images, "--align-images")
    out = Path(args.out)
    _, aligner = _store_and_aligner(args, images, out)
    _run(["segment", "--aligner", str(aligner), "--imagenet-seg", args.mat, *_model(args), "--text", args.text,
          "--baseline", "--batch-size", str(args.segment_batch_size), "--out", str(out / "segment.json"),
          *_clip(args), *_device(args), *(["--max-images", str(args.max_images)] if args.max_images else [])],
         out, (out / "segment.json").is_file)
    scores = json.loads((out / "segment.json").read_text())["scores"]
    print(f"\n{'':30s} {'pixel acc':>9s} {'mIoU':>8s} {'mAP':>8s}   ({min(count, args.max_images or count)} images)")
    rows = {f"ours ({name})": s for name, s in scores.items()}
    rows.update({f"paper, {name}": s for name, s in PAPER["imagenet-seg"].items()})
    for name, s in rows.items():
        print(f"{name:30s} {s['pixel_accuracy']:9.3f} {s['mean_iou']:8.3f} {s['mean_average_precision']:8.3f}")
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    experiments = parser.add_subparsers(dest="experiment", required=True)
    for name, run in (("waterbirds", waterbirds), ("imagenet-seg", imagenet_seg)):
        summary = (run.__doc__ or "").strip()
        command = experiments.add_parser(name, help=summary, description=f"{summary} The commands, with weights "
                                         "online or offline: python -m benchmarks.paper --help.")
        model = command.add_argument_group("the model decomposed")
        model.add_argument("--model", required=True, help="timm name (deit_base_patch16_224) or open_clip:ARCH[:TAG]")
        model.add_argument("--pretrained", action="store_true", help="download the named weights")
        model.add_argument("--checkpoint", help="local weights file (safetensors / .pth) instead of --pretrained")
        model.add_argument("--model-kwargs", help="JSON keyword arguments for the model constructor")
        clip = command.add_argument_group("the CLIP model aligned to")
        clip.add_argument("--clip", help="open_clip architecture, e.g. ViT-B-16")
        clip.add_argument("--clip-pretrained", help="open_clip pretrained tag, e.g. openai (downloads)")
        clip.add_argument("--clip-checkpoint", help="local CLIP weights instead of --clip-pretrained")
        clip.add_argument("--clip-config", help="open_clip model config JSON instead of --clip")
        command.add_argument("--batch-size", type=int, default=64, help="decomposition batch size")
        command.add_argument("--align-epochs", type=int, default=100, help="at most this many alignment epochs")
        command.add_argument("--device", help="torch device (default: cuda if available)")
        command.add_argument("--out", required=True, help="folder for every step's output and results.json")
        command.set_defaults(run=run)
        if name == "waterbirds":
            command.add_argument("--root", required=True, help="waterbird_complete95_forest2water2/ (metadata.csv "
                                 "and the images it lists)")
            command.add_argument("--zero-shot", action="store_true", help="classify zero-shot (CLIP) instead of "
                                 "a linear probe on the train split")
            command.add_argument("--max-k", type=int, default=20, help="try removing 0..max-k components")
        else:
            command.add_argument("--mat", required=True, help="gtsegs_ijcv.mat")
            command.add_argument("--align-images", required=True, help="ImageNet images to train the aligner on")
            command.add_argument("--text", default="an image of an object", help="the heatmap's text")
            command.add_argument("--segment-batch-size", type=int, default=8)
            command.add_argument("--max-images", type=int, help="segment the first N images only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one experiment; 0 when done, 2 when an input is missing or malformed, 1 when a step failed."""
    args = build_parser().parse_args(argv)
    try:
        _check_options(args)
        ours = args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"benchmarks.paper: error: {error}", file=sys.stderr)
        return 2
    except StepFailed as error:
        print(f"benchmarks.paper: error: {error}", file=sys.stderr)
        return 1
    results = {"experiment": args.experiment, "model": args.model, "pretrained": args.pretrained,
               "checkpoint": args.checkpoint, "clip": args.clip or args.clip_config,
               "clip_weights": args.clip_pretrained or args.clip_checkpoint, "ours": ours,
               "paper": PAPER[args.experiment]}
    path = Path(args.out) / "results.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
