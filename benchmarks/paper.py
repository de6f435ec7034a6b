"""The paper's experiments end to end on the real data, one command each (steps whose output exists are skipped,
so a killed run continues):

    python -m benchmarks.paper waterbirds --root WATERBIRDS_ROOT --model deit_base_patch16_224 --pretrained \
        --clip ViT-B-16 --clip-pretrained openai --out runs/waterbirds-deit
    python -m benchmarks.paper waterbirds --root WATERBIRDS_ROOT --model open_clip:ViT-B-16:openai --pretrained \
        --clip ViT-B-16 --clip-pretrained openai --zero-shot --out runs/waterbirds-clip
    python -m benchmarks.paper imagenet-seg --mat gtsegs_ijcv.mat --align-images IMAGENET_VAL_SUBSET \
        --model deit_base_patch16_224 --pretrained --clip ViT-B-16 --clip-pretrained openai --out runs/seg-deit

Waterbirds: decompose ROOT (level head), align to CLIP on the same images, debias (k chosen on the val split,
worst-group accuracy reported on test). ImageNet-Segmentation: decompose and align on an ImageNet image folder,
then segment the .mat file's images (decomposed at level token, batch by batch) with the attention baseline.
Each step is a ``vit-decompose`` command; their outputs (and debias.json / segment.json) land in ``--out``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vit_decompose.cli import main as vit_decompose

SPURIOUS = ["water background", "land background", "an ocean", "a lake", "a forest", "a bamboo forest"]
CORE = ["a bird", "a landbird", "a waterbird", "a seabird"]


def _run(arguments: list[str], done: Path) -> None:
    if done.exists():
        print(f"skip (exists): {done}")
        return
    print("vit-decompose " + " ".join(arguments), flush=True)
    if vit_decompose(arguments) != 0:
        sys.exit(f"failed: vit-decompose {' '.join(arguments)}")


def _model(args) -> list[str]:
    return ["--model", args.model] + (["--pretrained"] if args.pretrained else []) + \
        (["--checkpoint", args.checkpoint] if args.checkpoint else [])


def _clip(args) -> list[str]:
    return ["--clip", args.clip] + (["--clip-pretrained", args.clip_pretrained] if args.clip_pretrained else []) + \
        (["--clip-checkpoint", args.clip_checkpoint] if args.clip_checkpoint else [])


def _store_and_aligner(args, images: str, out: Path) -> tuple[Path, Path]:
    store, aligner = out / "store", out / "aligner"
    _run(["decompose", *_model(args), "--images", images, "--out", str(store), "--level", "head",
          "--batch-size", str(args.batch_size)], store / "manifest.json")
    _run(["align", "--store", str(store), "--images", images, "--out", str(aligner), *_clip(args)],
         aligner / "aligner.json")
    return store, aligner


def waterbirds(args) -> None:
    out = Path(args.out)
    store, aligner = _store_and_aligner(args, args.root, out)
    texts = [x for t in SPURIOUS for x in ("--spurious", t)] + [x for t in CORE for x in ("--core", t)]
    _run(["debias", "--store", str(store), "--aligner", str(aligner), "--waterbirds", args.root, *texts,
          *(["--zero-shot"] if args.zero_shot else []), "--out", str(out / "debias"), *_clip(args)],
         out / "debias" / "debias.json")


def imagenet_seg(args) -> None:
    out = Path(args.out)
    _, aligner = _store_and_aligner(args, args.align_images, out)
    _run(["segment", "--aligner", str(aligner), "--imagenet-seg", args.mat, *_model(args), "--text", args.text,
          "--baseline", "--batch-size", str(args.segment_batch_size), "--out", str(out / "segment.json"),
          *_clip(args)], out / "segment.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiments = parser.add_subparsers(dest="experiment", required=True)
    for name, run in (("waterbirds", waterbirds), ("imagenet-seg", imagenet_seg)):
        command = experiments.add_parser(name)
        command.add_argument("--model", required=True)
        command.add_argument("--pretrained", action="store_true")
        command.add_argument("--checkpoint")
        command.add_argument("--clip", required=True)
        command.add_argument("--clip-pretrained")
        command.add_argument("--clip-checkpoint")
        command.add_argument("--batch-size", type=int, default=64)
        command.add_argument("--out", required=True)
        command.set_defaults(run=run)
        if name == "waterbirds":
            command.add_argument("--root", required=True, help="waterbird_complete95_forest2water2/ (metadata.csv)")
            command.add_argument("--zero-shot", action="store_true", help="classify zero-shot (CLIP) instead of "
                                 "a linear probe on the train split")
        else:
            command.add_argument("--mat", required=True, help="gtsegs_ijcv.mat")
            command.add_argument("--align-images", required=True, help="ImageNet images to train the aligner on")
            command.add_argument("--text", default="an image of an object", help="the heatmap's text")
            command.add_argument("--segment-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
