"""``vit-decompose report``: one self-contained ``report.html`` explaining any model's decomposition store.

    vit-decompose report --store STORE --aligner ALIGNER --images DIR --out DIR
                         [--token-store TOKEN_STORE | --model NAME ...] [--labels FILE | --image-folder]

Sections: additivity, components ranked per property with TextSpan descriptions, the images scoring highest
along the top components, token heatmaps (from a token-level store, or a few images decomposed with ``--model``)
and a layer ablation curve (with labels). The page is built by ``align.report``, like the toy-world demo's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.ablation import layer_steps
from align.heatmaps import token_heatmaps
from align.parent_maps import aligner_directions, text_contributions
from align.report import AblationRecord, HeatmapRow, Stopwatch
from align.report.store_report import StoreFindings, build_store_report, describe_components, top_image_records
from align.scoring import property_basis, rank_components
from align.store_analysis import score_store, store_sum_errors
from decompose import DecompositionStore, trace_and_decompose
from decompose.store import atomic_write_text

from .ablation_commands import ablation_on_table, add_label_options, labels_table
from .heatmap_sources import labels_with_positions, read_images
from .options import (
    add_model_options,
    add_store_options,
    clip_for_aligner,
    device_of,
    model_from_arguments,
    open_store_and_aligner,
    text_cache,
)
from .text_queries import encode_texts, mean_direction

MODEL_CHECK_TOLERANCE = 1e-3   # relative: the --model's representation of an image vs the store's


def _chosen_properties(args) -> dict[str, list[str]]:
    from align.properties import property_descriptions

    properties = property_descriptions(args.properties, include_shipped=not args.only_given)
    unknown = [p for p in args.property or [] if p not in properties]
    if unknown:
        raise ValueError(f"unknown properties {unknown}; known: {sorted(properties)} (add yours with --properties)")
    return {p: properties[p] for p in (args.property or properties)}


def _token_scores(args, store: DecompositionStore, aligner, ids: list[str], directions: torch.Tensor,
                  device: torch.device):
    """(scores [C, B, T] = ⟨a_i(x), t⟩ of the token components for CLIP ``directions`` [T, d_clip], their labels,
    how they were made) for the images ``ids``: from a token store's components, or from the model through
    scores along the aligner's directions (the component vectors are never built)."""
    if args.token_store:
        tokens = DecompositionStore(args.token_store)
        if tokens.manifest.get("model") != store.manifest.get("model"):
            raise ValueError(f"--token-store is of model {tokens.manifest.get('model')!r}, the store of "
                             f"{store.manifest.get('model')!r}; give a token-level store of the same model")
        labels, _ = labels_with_positions(tokens, args)
        components = tokens.load_rows(tokens.positions_of(ids))[0].to(device)
        scores = torch.stack([text_contributions(aligner, components, labels, t).cpu() for t in directions], -1)
        return scores, labels, f"the token-level store {args.token_store}"
    decomposer = trace_and_decompose(model_from_arguments(args).to(device))
    images = read_images(Path(args.images), ids, store.transform()).to(device)
    dec = decomposer(images, level="token", directions=aligner_directions(aligner, directions.to(device)))
    stored = store.load_rows(store.positions_of(ids))[1].to(dec.representation)
    mismatch = float((dec.representation.flatten(1) - stored).norm() / stored.norm().clamp_min(1e-30))
    if mismatch > MODEL_CHECK_TOLERANCE:
        raise ValueError(f"--model {args.model} is not the store's model: its representation of the images differs "
                         f"from the stored one by {mismatch:.1e} (relative); pass the model, --model-kwargs and "
                         "--checkpoint the store was decomposed with")
    return dec.scores.float().cpu(), dec.labels, f"--model {args.model}, scored at level token along the texts here"


@torch.no_grad()
def _heatmaps(args, store, aligner, texts: list[str], device) -> tuple[list[HeatmapRow], str]:
    if not (args.token_store or args.model):
        return [], ("No token heatmaps: give a token-level store of the same images (--token-store) or the "
                    "model (--model, --model-kwargs, --checkpoint) to decompose a few images at level token.")
    if not args.images:
        raise ValueError("heatmaps are drawn over the images: give --images DIR")
    ids = store.image_ids()[:args.heatmap_images]
    clip, cache = clip_for_aligner(args, aligner, device), text_cache(args)
    directions = torch.stack([mean_direction(args, clip, [text], cache) for text in texts])    # [T, d_clip]
    scores, labels, source = _token_scores(args, store, aligner, ids, directions, device)   # [C, B, T]
    maps = {text: token_heatmaps(scores[..., t], labels, store.image_size)
            for t, text in enumerate(tqdm(texts, desc="heatmaps", unit="text"))}                # [B, H, W]
    pictures = read_images(Path(args.images), ids, store.transform(normalise=False))
    rows = [HeatmapRow(pictures[b], ids[b], [(maps[t][b], t) for t in texts]) for b in range(len(ids))]
    note = (f"Token components from {source}; all heads, ⟨a_i,token(x), t⟩ with t each text's unit CLIP "
            "direction, per source position on its stage's grid, upsampled to the image and summed.")
    return rows, note


def _ablation(args, store, aligner, device) -> tuple[AblationRecord | None, str]:
    if not (args.labels or args.image_folder):
        return None, "No ablation curve: give labels (--labels FILE with id,label[,split], or --image-folder)."
    table, source, names = labels_table(args, store)
    curve, description, evaluated = ablation_on_table(args, store, aligner, device, table, source,
                                                      layer_steps(store.labels, last_first=True), names)
    return AblationRecord(store.manifest.get("model", "model"), curve, description), (
        f"Accuracy on {evaluated} images (labels: {source}) as whole residual blocks are {args.mode}-ablated "
        "cumulatively, last block first.")


@torch.no_grad()
def _command_report(args) -> int:
    device = device_of(args.device)
    watch = Stopwatch()
    store, aligner = open_store_and_aligner(args, device)
    clip = clip_for_aligner(args, aligner, device)
    errors = store_sum_errors(store, progress=True)
    watch.lap("additivity")
    properties = _chosen_properties(args)
    bases = {name: encode_texts(args, clip, texts, text_cache(args)) for name, texts in properties.items()}
    scorer = score_store(aligner, store, {n: property_basis(e) for n, e in bases.items()}, batch_size=args.batch_size,
                         max_images=args.max_images)
    scores, constant = scorer.scores(), scorer.constant()
    rankings = {name: rank_components(scores, aligner.keys, name, constant=constant) for name in properties}
    watch.lap("scores")
    texts = list(dict.fromkeys(t for name in properties for t in properties[name]))
    bank = encode_texts(args, clip, texts, text_cache(args)).cpu()                          # [T, d_clip]
    described, shown = describe_components(aligner, store, rankings, constant, bank, texts, top=args.top,
                                           with_images=args.image_components, image_count=args.top_images)
    read = (lambda i: read_images(Path(args.images), [i], store.transform(normalise=False))[0]) if args.images \
        else None
    top_images = top_image_records(shown, store.image_ids(), read) if read else []
    watch.lap("descriptions")
    heatmap_texts = args.text or list(dict.fromkeys(d.texts[0][0] for d in described if d.texts))[:3]
    heatmaps, heatmap_note = _heatmaps(args, store, aligner, heatmap_texts, device)
    watch.lap("heatmaps")
    ablation, ablation_note = _ablation(args, store, aligner, device)
    watch.lap("ablation")
    findings = StoreFindings(store.manifest.get("model", "?"), store.level, len(store), len(store.labels),
                             clip.identity, aligner.training_summary.get("heldout_cosine"), errors, rankings,
                             constant, described, top_images, heatmaps, heatmap_note, ablation, ablation_note,
                             watch.seconds, clip.description)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.html", build_store_report(findings).render())
    summary = {"images": len(store), "components": len(store.labels), "max_relative_error": float(errors.max()),
               "top": {name: [c.key for c in ranking[:args.top]] for name, ranking in rankings.items()},
               "seconds": watch.seconds}
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1))
    print(f"wrote {out / 'report.html'} ({len(store)} images, {sum(watch.seconds.values()):.0f} s)")
    return 0


def add_report_command(subparsers) -> None:
    """Register ``report``."""
    report = subparsers.add_parser("report", help="a self-contained HTML report of what a model's components do",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_options(report)
    report.add_argument("--images", help="the image folder the store was decomposed from (for the pictures)")
    report.add_argument("--out", required=True, help="folder for report.html and report.json")
    report.add_argument("--property", action="append", help="a property to rank for (repeatable; default: all)")
    report.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
    report.add_argument("--only-given", action="store_true", help="ignore the shipped properties")
    report.add_argument("--top", type=int, default=3, help="components described per property")
    report.add_argument("--image-components", type=int, default=1, help="top components per property shown "
                        "with their highest-scoring images")
    report.add_argument("--top-images", type=int, default=6, help="images per shown component")
    report.add_argument("--max-images", type=int, help="score over the first N images only")
    heatmaps = report.add_argument_group("token heatmaps (either a token-level store or the model)")
    heatmaps.add_argument("--token-store", help="token-level store of the same model and images")
    add_model_options(heatmaps, required=False, model_help="the store's model (timm name or open_clip:ARCH): a few "
                      "images are decomposed at level token")
    heatmaps.add_argument("--text", action="append", help="heatmap text (repeatable; default: the top components' "
                          "first TextSpan texts)")
    heatmaps.add_argument("--heatmap-images", type=int, default=3)
    ablation = report.add_argument_group("ablation curve (with labels)")
    add_label_options(ablation, required=False)
    ablation.add_argument("--mode", default="mean", choices=["mean", "zero"])
    report.set_defaults(run=_command_report)
