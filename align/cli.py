"""``vit-decompose align | rank | describe``: CLIP alignment of a decomposition store, from the shell.

    vit-decompose align    --store STORE --images IMAGES --clip ViT-B-32 --clip-pretrained openai --out ALIGNER
    vit-decompose rank     --store STORE --aligner ALIGNER --property colour
    vit-decompose describe --store STORE --aligner ALIGNER --component blocks.10.attn.h3

and the applications (``application_cli``): ``retrieve``, ``heatmap``, ``segment``, ``ablate``, ``debias``.

``add_align_commands(subparsers)`` registers the commands on an argparse subparsers object
(each sets ``run``); ``main(argv)`` runs them on their own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from decompose import DecompositionStore

from .alignment_data import StoreAlignmentData
from .clip_models import ClipLoadError, ClipModel, load_clip
from .compalign import AlignerMismatch, CompAlign
from .image_targets import clip_image_targets
from .properties import property_descriptions
from .scoring import rank_components
from .store_analysis import describe_store_component, property_bases, score_store
from .text_bank import TextEmbeddingCache
from .training import TrainingOptions, train_compalign

TEXT_CACHE = "text-embeddings"


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _add_clip_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("CLIP model" + ("" if required else " (default: the one the aligner records)"))
    group.add_argument("--clip", help="open_clip architecture, e.g. ViT-B-32")
    group.add_argument("--clip-config", help="open_clip model config JSON (embed_dim, vision_cfg, text_cfg) "
                       "instead of --clip")
    group.add_argument("--clip-pretrained", help="open_clip pretrained tag, e.g. openai (downloads)")
    group.add_argument("--clip-checkpoint", help="local CLIP weights (safetensors or torch weights_only file)")


def _clip_from_arguments(args, device: str) -> ClipModel:
    if not args.clip and not args.clip_config:
        raise ClipLoadError("name the CLIP model: --clip ARCH (with --clip-pretrained TAG or --clip-checkpoint FILE) "
                            "or --clip-config JSON")
    return load_clip(args.clip, args.clip_pretrained, args.clip_checkpoint, args.clip_config, device=device)


def _clip_for_aligner(args, aligner: CompAlign, device: str) -> ClipModel:
    """The CLIP named on the command line, else the one recorded in the aligner."""
    recorded = dict(aligner.clip.get("spec") or {})
    if args.clip or args.clip_config:
        clip = _clip_from_arguments(args, device)
    else:
        if not recorded:
            raise ClipLoadError("the aligner records no CLIP model; name it with --clip / --clip-config")
        if args.clip_checkpoint:
            recorded.update(checkpoint=args.clip_checkpoint, pretrained=None)
        if not recorded.get("pretrained") and not recorded.get("checkpoint"):
            raise ClipLoadError("the aligner's CLIP had random weights that cannot be rebuilt; pass its weights "
                                "with --clip-checkpoint FILE")
        clip = load_clip(**recorded, device=device)
    if aligner.clip.get("identity") and clip.identity != aligner.clip["identity"]:
        print(f"note: CLIP {clip.identity} is not the one the aligner was trained with "
              f"({aligner.clip['identity']}); fine for the same weights from another source", file=sys.stderr)
    return clip


def _open(args, device: str) -> tuple[DecompositionStore, CompAlign]:
    store = DecompositionStore(args.store)
    aligner = CompAlign.load(args.aligner, model=store.manifest.get("model", ""), level=store.level,
                             labels=store.labels, device=device)
    return store, aligner


def _templates(value: str | None):
    if value is None or value in ("imagenet", "raw"):
        return value
    return json.loads(Path(value).read_text())


# --- align ---------------------------------------------------------------------------------

def _command_align(args) -> int:
    device = _device(args.device)
    store = DecompositionStore(args.store)
    clip = _clip_from_arguments(args, device)
    out = Path(args.out)
    targets = clip_image_targets(clip, args.images, store.image_ids(), batch_size=args.batch_size,
                                 cache_dir=out / "clip-targets")
    data = StoreAlignmentData(store, targets, batch_size=args.batch_size, heldout_fraction=args.heldout,
                              seed=args.seed)
    options = TrainingOptions(lr=args.lr, orthogonality_weight=args.orthogonality_weight, max_epochs=args.epochs,
                              patience=args.patience, seed=args.seed, device=device)
    aligner, report = train_compalign(data, options, clip={"identity": clip.identity, "spec": clip.spec})
    aligner.save(out)
    print(alignment_table(aligner, report.heldout_cosine, report.orthogonality_deviation, top=args.top))
    print(f"\nepochs {report.epochs} (best {report.best_epoch}), {report.seconds:.1f} s; wrote {out}")
    return 0


def alignment_table(aligner: CompAlign, heldout_cosine: float, deviation: dict[str, float], top: int = 10) -> str:
    """Summary lines and the maps furthest from orthogonal."""
    values = sorted(deviation.items(), key=lambda item: -item[1])
    lines = [f"components        {len(aligner.labels)} ({aligner.model_name or '?'}, level {aligner.level or '?'})",
             f"d_model -> d_clip {aligner.d_model} -> {aligner.d_clip}",
             f"held-out cosine   {heldout_cosine:.4f}  (Σ a_i + b vs CLIP image embedding)",
             (f"orthogonality     mean {sum(deviation.values()) / max(len(deviation), 1):.3e}, "
              f"max {values[0][1] if values else 0:.3e}  (‖G−I‖²_F / m²)"), "",
             f"{'component':40s} {'deviation':>12s}"]
    lines += [f"{key:40s} {value:12.3e}" for key, value in values[:top]]
    return "\n".join(lines)


# --- rank ----------------------------------------------------------------------------------

def _command_rank(args) -> int:
    device = _device(args.device)
    store, aligner = _open(args, device)
    properties = property_descriptions(args.properties, include_shipped=not args.only_given)
    if args.property not in properties:
        raise ValueError(f"unknown property {args.property!r}; known: {sorted(properties)} "
                         "(add your own with --properties FILE)")
    clip = _clip_for_aligner(args, aligner, device)
    cache = TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE)
    bases = property_bases(clip, properties, _templates(args.templates), cache)
    scorer = score_store(aligner, store, bases, batch_size=args.batch_size, max_images=args.max_images)
    ranked = rank_components(scorer.scores(), aligner.keys, args.property, specific=not args.plain,
                             variance=scorer.variance_explained(), top=args.top, constant=scorer.constant())
    print(f"property {args.property!r}: {len(properties[args.property])} descriptions, ranked by "
          f"{'score' if args.plain else 'score − max(0, best other property score)'} over "
          f"{min(len(store), args.max_images or len(store))} images\n")
    print(ranking_table(ranked, aligner))
    return 0


def ranking_table(ranked, aligner: CompAlign) -> str:
    lines = [(f"{'#':>3s} {'component':40s} {'kind':10s} {'layer':>5s} {'score':>7s} {'specific':>8s} "
              f"{'var.expl':>8s}  rival")]
    for position, row in enumerate(ranked, 1):
        label = aligner.labels[row.index]
        layer = "" if label.layer is None else str(label.layer)
        variance = "" if row.variance_explained is None else f"{row.variance_explained:8.3f}"
        lines.append(f"{position:3d} {row.key:40s} {label.kind:10s} {layer:>5s} {row.score:7.3f} "
                     f"{row.specific_score:8.3f} {variance:>8s}  {row.rival or ''}")
    return "\n".join(lines)


# --- describe ------------------------------------------------------------------------------

def _read_texts(path: str | None) -> list[str]:
    if path is None:  # every shipped property description
        return list(dict.fromkeys(t for texts in property_descriptions().values() for t in texts))
    text = Path(path).read_text()
    texts = json.loads(text) if path.endswith(".json") else [line.strip() for line in text.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return list(dict.fromkeys(texts))


def _command_describe(args) -> int:
    device = _device(args.device)
    store, aligner = _open(args, device)
    clip = _clip_for_aligner(args, aligner, device)
    texts = _read_texts(args.texts)
    result = describe_store_component(aligner, store, args.component, clip, texts, count=args.count,
                                      rank=args.rank, templates=_templates(args.templates),
                                      cache=TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE))
    print(f"{args.component}: TextSpan over {len(store)} images, {len(texts)} texts, span rank {result.rank}\n")
    lines = [f"{'#':>3s} {'text':50s} {'var.expl':>8s} {'cumul.':>8s}"]
    for step, (text, value, total) in enumerate(zip(result.texts, result.variance_explained, result.cumulative), 1):
        lines.append(f"{step:3d} {text:50s} {value:8.3f} {total:8.3f}")
    print("\n".join(lines))
    return 0


# --- registration --------------------------------------------------------------------------

def add_align_commands(subparsers) -> None:
    """Register ``align``, ``rank``, ``describe`` and the applications (``retrieve``, ``heatmap``, ``segment``,
    ``ablate``, ``debias``; see ``application_cli``) on ``parser.add_subparsers()``."""
    from .application_cli import add_application_commands  # imports this module's helpers
    align = subparsers.add_parser("align", help="train CompAlign maps from a decomposition store into CLIP space")
    align.add_argument("--store", required=True, help="decomposition store folder (vit-decompose decompose --out)")
    align.add_argument("--images", required=True, help="the image folder the store was decomposed from")
    align.add_argument("--out", required=True, help="aligner folder to write")
    _add_clip_options(align, required=True)
    align.add_argument("--lr", type=float, default=3e-4)
    align.add_argument("--orthogonality-weight", type=float, default=1.0, help="λ of the orthogonality penalty")
    align.add_argument("--batch-size", type=int, default=128)
    align.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    align.add_argument("--patience", type=int, default=5, help="stop after this many epochs without held-out gain")
    align.add_argument("--heldout", type=float, default=0.1, help="fraction of images held out")
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--device")
    align.add_argument("--top", type=int, default=10, help="maps listed by deviation from orthogonality")
    align.set_defaults(run=_command_align)

    for name, help_text in (("rank", "rank components for a property (colour, texture, ... or your own)"),
                            ("describe", "describe one component with texts (TextSpan)")):
        command = subparsers.add_parser(name, help=help_text)
        command.add_argument("--store", required=True, help="decomposition store folder")
        command.add_argument("--aligner", required=True, help="aligner folder (vit-decompose align --out)")
        command.add_argument("--templates", help="imagenet (default), raw, or a JSON list of templates with {}")
        command.add_argument("--device")
        _add_clip_options(command, required=False)
        if name == "rank":
            command.add_argument("--property", required=True)
            command.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
            command.add_argument("--only-given", action="store_true", help="ignore the shipped properties")
            command.add_argument("--plain", action="store_true", help="rank by the score, not its specific part")
            command.add_argument("--top", type=int, default=20)
            command.add_argument("--batch-size", type=int, default=64)
            command.add_argument("--max-images", type=int)
            command.set_defaults(run=_command_rank)
        else:
            command.add_argument("--component", required=True, help="component key, e.g. blocks.10.attn.h3")
            command.add_argument("--texts", help="text bank: one text per line, or a JSON list "
                                 "(default: all shipped property descriptions)")
            command.add_argument("--count", type=int, default=5, help="texts to pick")
            command.add_argument("--rank", type=int, help="span dimension (default: 99%% of the variance)")
            command.set_defaults(run=_command_describe)
    add_application_commands(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-decompose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_align_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ClipLoadError, AlignerMismatch, ValueError, FileNotFoundError) as error:
        print(f"vit-decompose: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
