"""``vit-decompose align | rank | describe``: CLIP alignment of a decomposition store, from the shell.

    vit-decompose align    --store STORE --images IMAGES --clip ViT-B-32 --clip-pretrained openai --out ALIGNER
    vit-decompose rank     --store STORE --aligner ALIGNER --property colour
    vit-decompose describe --store STORE --aligner ALIGNER --component blocks.10.attn.h3
"""
from __future__ import annotations

import json
from pathlib import Path

from align.alignment_data import StoreAlignmentData
from align.compalign import CompAlign
from align.image_targets import clip_image_targets
from align.properties import property_descriptions
from align.scoring import rank_components
from align.store_analysis import describe_store_component, score_store
from align.training import TrainingOptions, train_compalign
from decompose import DecompositionStore

from .options import (
    add_clip_options,
    add_device_option,
    add_store_options,
    clip_for_aligner,
    clip_from_arguments,
    device_of,
    open_store_and_aligner,
    templates,
    text_cache,
)
from .text_queries import chosen_properties, property_bases_of

# --- align ---------------------------------------------------------------------------------

def _command_align(args) -> int:
    device = device_of(args.device)
    store = DecompositionStore(args.store)
    clip = clip_from_arguments(args, device)
    out = Path(args.out)
    targets = clip_image_targets(clip, args.images, store.image_ids(), batch_size=args.batch_size,
                                 cache_dir=out / "clip-targets")
    data = StoreAlignmentData(store, targets, batch_size=args.batch_size, heldout_fraction=args.heldout,
                              seed=args.seed)
    options = TrainingOptions(lr=args.lr, orthogonality_weight=args.orthogonality_weight, max_epochs=args.epochs,
                              patience=args.patience, seed=args.seed, device=str(device))
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
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device)
    properties = chosen_properties(args, include_shipped=not args.only_given)
    bases = property_bases_of(args, aligner, device, properties)
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
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device)
    clip = clip_for_aligner(args, aligner, device)
    texts = _read_texts(args.texts)
    result = describe_store_component(aligner, store, args.component, clip, texts, count=args.count,
                                      rank=args.rank, templates=templates(args.templates), cache=text_cache(args))
    print(f"{args.component}: TextSpan over {len(store)} images, {len(texts)} texts, span rank {result.rank}\n")
    lines = [f"{'#':>3s} {'text':50s} {'var.expl':>8s} {'cumul.':>8s}"]
    for step, (text, value, total) in enumerate(zip(result.texts, result.variance_explained, result.cumulative), 1):
        lines.append(f"{step:3d} {text:50s} {value:8.3f} {total:8.3f}")
    print("\n".join(lines))
    return 0


# --- registration --------------------------------------------------------------------------

def add_align_commands(subparsers) -> None:
    """Register ``align``, ``rank`` and ``describe``."""
    align = subparsers.add_parser("align", help="train CompAlign maps from a decomposition store into CLIP space")
    align.add_argument("--store", required=True, help="decomposition store folder (vit-decompose decompose --out)")
    align.add_argument("--images", required=True, help="the image folder the store was decomposed from")
    align.add_argument("--out", required=True, help="aligner folder to write")
    add_clip_options(align, required=True)
    align.add_argument("--lr", type=float, default=3e-4)
    align.add_argument("--orthogonality-weight", type=float, default=1.0, help="λ of the orthogonality penalty")
    align.add_argument("--batch-size", type=int, default=128)
    align.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    align.add_argument("--patience", type=int, default=5, help="stop after this many epochs without held-out gain")
    align.add_argument("--heldout", type=float, default=0.1, help="fraction of images held out")
    align.add_argument("--seed", type=int, default=0)
    add_device_option(align)
    align.add_argument("--top", type=int, default=10, help="maps listed by deviation from orthogonality")
    align.set_defaults(run=_command_align)

    rank = subparsers.add_parser("rank", help="rank components for a property (colour, texture, ... or your own)")
    add_store_options(rank)
    rank.add_argument("--property", required=True)
    rank.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
    rank.add_argument("--only-given", action="store_true", help="ignore the shipped properties")
    rank.add_argument("--plain", action="store_true", help="rank by the score, not its specific part")
    rank.add_argument("--top", type=int, default=20)
    rank.add_argument("--max-images", type=int)
    rank.set_defaults(run=_command_rank)

    describe = subparsers.add_parser("describe", help="describe one component with texts (TextSpan)")
    add_store_options(describe, batch_size=False)
    describe.add_argument("--component", required=True, help="component key, e.g. blocks.10.attn.h3")
    describe.add_argument("--texts", help="text bank: one text per line, or a JSON list "
                          "(default: all shipped property descriptions)")
    describe.add_argument("--count", type=int, default=5, help="texts to pick")
    describe.add_argument("--rank", type=int, help="span dimension (default: 99%% of the variance)")
    describe.set_defaults(run=_command_describe)
