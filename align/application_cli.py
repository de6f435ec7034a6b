"""``vit-decompose retrieve | heatmap | segment | ablate | debias``: the applications on a decomposition store.

    vit-decompose retrieve --store STORE --aligner ALIGNER --text "a red object" [--property colour --components 3]
    vit-decompose retrieve --store STORE --aligner ALIGNER --query IMAGE_ID --property colour --components 3
    vit-decompose retrieve --store STORE --aligner ALIGNER --query IMAGE_ID --property colour --components 99 --within-property
    vit-decompose heatmap  --store TOKEN_STORE --aligner ALIGNER --text "a dog" --images DIR --out DIR
    vit-decompose segment  --store TOKEN_STORE --aligner ALIGNER --text "a dog" --masks masks.json
    vit-decompose ablate   --store STORE --labels labels.csv --out DIR [--aligner ALIGNER --classes classes.json]
    vit-decompose debias   --store STORE --aligner ALIGNER --groups groups.csv --spurious "water" --core "a bird"

Files keyed by image id (the store's ids: paths relative to the image folder it was made from):

* labels / groups: CSV with a header (``id,label[,group][,split]``) or JSON
  ``{"id": {"label": ..., "group": ..., "split": ...}}`` (``{"id": "label"}`` for labels alone);
  ``split`` is ``train``, ``val`` or ``test``.
* masks: CSV ``id,mask`` or JSON ``{"id": "masks/x.png"}``; mask paths relative to the file's
  folder, nonzero pixels are the object. Masks (and images) are brought to what the model saw
  with the store's own resize / crop.
* classes: JSON ``{"label": ["a photo of a bird", ...]}`` for a zero-shot CLIP classifier on the
  aligned representation; without it a linear probe is fitted on the ``train`` split.

Heatmaps need token-level stores whose components know their grid positions. A store that
does not record them gets them from the model: ``--model NAME [--model-kwargs JSON]
[--checkpoint FILE]`` (one token-level decomposition of one image).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from decompose import ComponentLabel, DecompositionStore

from .ablation import ablation_curve, component_means, layer_steps, ordered_steps
from .classifiers import fit_linear_probe, zero_shot_classifier
from .cli import _add_clip_options, _clip_for_aligner, _device, _open, _templates
from .compalign import CompAlign
from .debias import LabelledSplit, remove_spurious, spurious_order
from .drawing import heatmap_overlay, line_plot
from .heatmaps import head_selector, token_heatmaps
from .parent_maps import aligner_rows, map_components_by_parent, text_contributions
from .properties import property_descriptions
from .retrieval import image_retrieval_scores, precision_at_k, ranked
from .scoring import PropertyScorer, property_basis, rank_components
from .segmentation import segmentation_scores
from .store_analysis import property_bases, score_store
from .text_bank import TextEmbeddingCache, encode_descriptions

TEXT_CACHE = "text-embeddings"


# --- files keyed by image id ------------------------------------------------------------------

def read_table(path: str | Path, value_field: str = "label") -> dict[str, dict[str, Any]]:
    """CSV (header with ``id``) or JSON ``{id: value | {field: value}}`` -> {id: {field: value}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object keyed by image id")
        return {str(k): (dict(v) if isinstance(v, dict) else {value_field: v}) for k, v in data.items()}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "id" not in rows[0]:
        raise ValueError(f"{path}: expected a CSV header with an 'id' column (id,{value_field},...)")
    return {row["id"]: {k: v for k, v in row.items() if k != "id"} for row in rows}


def store_positions_of(store: DecompositionStore, ids) -> list[int]:
    """Positions in the store of image ids (refuses ids the store does not hold)."""
    where = {image_id: i for i, image_id in enumerate(store.image_ids())}
    missing = [i for i in ids if i not in where]
    if missing:
        raise ValueError(f"{len(missing)} ids are not in the store (first: {missing[0]!r}); ids are image paths "
                         f"relative to the decomposed folder, e.g. {next(iter(where), '?')!r}")
    return [where[i] for i in ids]


@torch.no_grad()
def load_store_rows(store: DecompositionStore, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(components [C, n, D], representation [n, D]) of the store images at positions ``rows``, in that order."""
    wanted = {row: k for k, row in enumerate(rows)}
    components = representation = None
    offset = 0
    for shard_components, shard_representation, ids in store.iter_shards():
        local = [(k, r - offset) for r, k in wanted.items() if offset <= r < offset + len(ids)]
        offset += len(ids)
        if not local:
            continue
        if components is None:
            components = shard_components.new_zeros((shard_components.shape[0], len(rows))
                                                    + tuple(shard_components.shape[2:])).float()
            representation = shard_representation.new_zeros((len(rows),) + tuple(shard_representation.shape[1:]))
            representation = representation.float()
        targets = torch.tensor([k for k, _ in local])
        sources = torch.tensor([r for _, r in local])
        components[:, targets] = shard_components[:, sources].float()
        representation[targets] = shard_representation[sources].float()
    if components is None:
        raise ValueError("no images selected")
    return components.flatten(2), representation.flatten(1)


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id)


# --- what the model saw -----------------------------------------------------------------------

def _geometry_transform(preprocessing: dict, nearest: bool = False):
    """The store's resize / crop without normalisation: PIL -> [3, H, W] in [0, 1]."""
    from timm.data import create_transform

    if not preprocessing.get("input_size"):
        raise ValueError("the store records no preprocessing (input_size); it was not written by decompose_dataset")
    settings = {k: preprocessing[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode")
                if k in preprocessing}
    if nearest:
        settings["interpolation"] = "nearest"
    return create_transform(**settings, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), is_training=False)


def _model_transform(preprocessing: dict):
    from timm.data import create_transform

    settings = {k: preprocessing[k] for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
                if k in preprocessing}
    return create_transform(**settings, is_training=False)


def _read_images(root: Path, ids: list[str], transform) -> torch.Tensor:
    from PIL import Image

    images = []
    for image_id in ids:
        path = root / image_id
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id!r} is not under {root}; pass the folder the store was made from")
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


def _image_size(store: DecompositionStore) -> tuple[int, int]:
    size = store.manifest.get("preprocessing", {}).get("input_size")
    if not size:
        raise ValueError("the store records no input size; it was not written by decompose_dataset")
    return int(size[-2]), int(size[-1])


# --- token positions --------------------------------------------------------------------------

def _model_from_arguments(args):
    from decompose.models import load_model

    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs)


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
    from decompose import trace_and_decompose

    decomposer = trace_and_decompose(_model_from_arguments(args))
    probe = torch.zeros((1,) + tuple(store.manifest["preprocessing"]["input_size"]))
    labels = decomposer(probe, level="token").labels
    if [l.key for l in labels] != [l.key for l in store.labels]:
        raise ValueError(f"--model {args.model} gives other components than the store's ({len(labels)} vs "
                         f"{len(store.labels)}); pass the model (and --model-kwargs) the store was made with")
    return labels, decomposer


# --- aligner and texts ------------------------------------------------------------------------

def _open_any_level(args, device: str) -> tuple[DecompositionStore, CompAlign]:
    """A store and an aligner of the same model, the aligner possibly coarser (head maps for token components)."""
    store = DecompositionStore(args.store)
    aligner = CompAlign.load(args.aligner, model=store.manifest.get("model", ""), device=device)
    aligner_rows(aligner, store.labels)  # every component has a map (its own or its head's)
    return store, aligner


def _text_direction(args, aligner: CompAlign, device: str) -> tuple[torch.Tensor, Any]:
    """Unit CLIP direction [d_clip]: the normalised mean of the ``--text`` embeddings."""
    clip = _clip_for_aligner(args, aligner, device)
    cache = TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE)
    embeddings = encode_descriptions(clip, args.text, _templates(args.templates), cache)      # [T, d_clip]
    return torch.nn.functional.normalize(embeddings.mean(0), dim=0), clip


def _class_embeddings(args, aligner: CompAlign, device: str) -> tuple[list[str], torch.Tensor]:
    classes = json.loads(Path(args.classes).read_text())
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f'{args.classes}: expected {{"label": ["text", ...]}}')
    clip = _clip_for_aligner(args, aligner, device)
    cache = TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE)
    rows = []
    for texts in classes.values():
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows.append(torch.nn.functional.normalize(
            encode_descriptions(clip, texts, _templates(args.templates), cache).mean(0), dim=0))
    return [str(name) for name in classes], torch.stack(rows)


def _selected_components(args, store: DecompositionStore, aligner: CompAlign,
                         bases: dict[str, torch.Tensor] | None) -> list[int] | None:
    """``--component`` keys, or the top ``--components`` for ``--property`` (``bases``: ``_property_bases``),
    or None (all)."""
    keys = [l.key for l in store.labels]
    if args.component:
        unknown = [k for k in args.component if k not in keys]
        if unknown:
            raise ValueError(f"unknown components {unknown[:3]}; keys look like {keys[:3]}")
        return [keys.index(k) for k in args.component]
    if not args.property:
        return None
    return _property_order(args, store, aligner, bases)[:args.components]


def _property_bases(args, aligner: CompAlign, device: str) -> dict[str, torch.Tensor]:
    """property -> [r, d_clip] orthonormal basis of its description embeddings, for every property
    (``--property`` must be one of them); CLIP is loaded once for all."""
    properties = property_descriptions(args.properties)
    if args.property not in properties:
        raise ValueError(f"unknown property {args.property!r}; known: {sorted(properties)}")
    clip = _clip_for_aligner(args, aligner, device)
    return property_bases(clip, properties, _templates(args.templates),
                          TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE))


def _property_order(args, store: DecompositionStore, aligner: CompAlign, bases: dict[str, torch.Tensor]
                    ) -> list[int]:
    """Every component by its specific score for ``--property`` over the store (constants last)."""
    scorer = score_store(aligner, store, bases, batch_size=args.batch_size)
    ranking = rank_components(scorer.scores(), aligner.keys, args.property, constant=scorer.constant())
    return [row.index for row in ranking]


# --- retrieve ---------------------------------------------------------------------------------

@torch.no_grad()
def _command_retrieve(args) -> int:
    if bool(args.text) == bool(args.query):
        raise ValueError("give --text (text-based retrieval) or --query IMAGE_ID (image-based), not both")
    if args.within_property and (args.text or args.raw or not args.property):
        raise ValueError("--within-property compares aligned image sums inside --property's text span: "
                         "use it with --query and --property, without --raw or --text")
    device = _device(args.device)
    store, aligner = _open(args, device)
    ids = store.image_ids()
    needs_bases = args.property and (args.within_property or not args.component)  # --component wins for the rows
    bases = _property_bases(args, aligner, device) if needs_bases else None
    selected = _selected_components(args, store, aligner, bases)
    rows = list(range(len(store.labels))) if selected is None else selected
    labels = [store.labels[i] for i in rows]
    direction = _text_direction(args, aligner, device)[0] if args.text else None
    features, scores = [], []
    for components, _, _ in tqdm(store.iter_shards(), total=len(store.shards), desc="retrieve", unit="shard"):
        part = components.flatten(2)[rows].float().to(device)                                  # [S, n, D]
        if direction is not None:
            scores.append(text_contributions(aligner, part, labels, direction).sum(0).cpu())   # [n]
        elif args.raw:
            features.append(part.sum(0).cpu())
        else:
            features.append(map_components_by_parent(aligner, part, labels).sum(0).cpu())     # [n, d_clip]
    if direction is not None:
        score = torch.cat(scores)                                                            # [N]
    else:
        query = store_positions_of(store, [args.query])[0]
        subspace = bases[args.property] if args.within_property else None
        score = image_retrieval_scores(torch.cat(features).unsqueeze(0), [query], subspace=subspace)[0]  # [N]
    values = _relevance_values(args, ids)
    relevant = None
    if values is not None:
        wanted = args.relevant if args.text else values[query]
        if wanted is None:
            raise ValueError("with --labels and --text, say which label is relevant: --relevant VALUE")
        relevant = torch.tensor([v is not None and str(v) == str(wanted) for v in values])
        if not args.text:
            relevant[query] = False
    order = ranked(score, args.top).tolist()
    if args.text:
        what = "text " + " + ".join(map(repr, args.text))
    else:
        what = f"image {args.query!r} ({'raw' if args.raw else 'aligned'})"
    chosen = "all components" if selected is None else f"{len(rows)} components: {', '.join(l.key for l in labels)}"
    print(f"{what}; {chosen}\n")
    print(f"{'#':>3s} {'score':>9s}  image" + ("  relevant" if relevant is not None else ""))
    for rank, index in enumerate(order, 1):
        mark = ("  yes" if relevant[index] else "  no") if relevant is not None else ""
        print(f"{rank:3d} {float(score[index]):9.4f}  {ids[index]}{mark}")
    result = {"mode": "text" if args.text else "image", "text": args.text, "query": args.query,
              "components": [l.key for l in labels] if selected is not None else None,
              "ranking": [{"id": ids[i], "score": float(score[i])} for i in order]}
    if relevant is not None:
        result["precision_at_k"] = precision_at_k(score, relevant, args.top)
        print(f"\nprecision@{args.top}: {result['precision_at_k']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _relevance_values(args, ids: list[str]) -> list | None:
    if not args.labels:
        return None
    table = read_table(args.labels)
    field = args.label_field
    return [table.get(i, {}).get(field) for i in ids]


# --- heatmap / segment ------------------------------------------------------------------------

def _heatmaps_for(store, aligner, labels, direction, rows: list[int], keep, device, batch_size: int) -> torch.Tensor:
    size = _image_size(store)
    maps = []
    for start in tqdm(range(0, len(rows), batch_size), desc="heatmaps", unit="batch"):
        components, _ = load_store_rows(store, rows[start:start + batch_size])
        contributions = text_contributions(aligner, components.to(device), labels, direction)   # [C, b]
        maps.append(token_heatmaps(contributions.cpu(), labels, size, keep))                    # [b, H, W]
    return torch.cat(maps)


@torch.no_grad()
def _command_heatmap(args) -> int:
    device = _device(args.device)
    store, aligner = _open_any_level(args, device)
    labels, _ = labels_with_positions(store, args)
    direction, _ = _text_direction(args, aligner, device)
    ids = args.image or store.image_ids()[:args.max_images]
    rows = store_positions_of(store, ids)
    heatmaps = _heatmaps_for(store, aligner, labels, direction, rows, head_selector(args.head), device,
                             args.batch_size)
    pictures = (_read_images(Path(args.images), ids, _geometry_transform(store.manifest["preprocessing"]))
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
    transform = _geometry_transform(store.manifest.get("preprocessing", {}), nearest=True)
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
    device = _device(args.device)
    store, aligner = _open_any_level(args, device)
    labels, decomposer = labels_with_positions(store, args)
    direction, _ = _text_direction(args, aligner, device)
    ids, masks = _read_masks(args, store)
    rows = store_positions_of(store, ids)
    heatmaps = _heatmaps_for(store, aligner, labels, direction, rows, head_selector(args.head), device,
                             args.batch_size)
    results = {"decomposition": segmentation_scores(heatmaps, masks).as_dict()}
    if args.baseline:
        results["attention (last layer)"] = _baseline_scores(args, store, ids, masks, decomposer).as_dict()
    print(f"zero-shot segmentation of {len(ids)} images for {' + '.join(map(repr, args.text))}\n")
    print(f"{'method':28s} {'pixel acc':>9s} {'fg IoU':>8s} {'mIoU':>8s} {'mAP':>8s}")
    for name, scores in results.items():
        print(f"{name:28s} {scores['pixel_accuracy']:9.4f} {scores['foreground_iou']:8.4f} "
              f"{scores['mean_iou']:8.4f} {scores['mean_average_precision']:8.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"text": args.text, "images": len(ids), "scores": results}, indent=1))
    return 0


def _baseline_scores(args, store, ids, masks, decomposer):
    from decompose import trace_and_decompose
    from decompose.attention_maps import AttentionMapCapture

    from .heatmaps import attention_heatmaps

    if not args.images or not args.model:
        raise ValueError("--baseline runs the model: give --images DIR and --model NAME (with --model-kwargs / "
                         "--checkpoint as the store was made)")
    capture = AttentionMapCapture(decomposer or trace_and_decompose(_model_from_arguments(args)))
    transform = _model_transform(store.manifest["preprocessing"])
    size = _image_size(store)
    maps = []
    for start in tqdm(range(0, len(ids), args.batch_size), desc="attention", unit="batch"):
        images = _read_images(Path(args.images), ids[start:start + args.batch_size], transform)
        maps.append(attention_heatmaps(capture(images), size))
    return segmentation_scores(torch.cat(maps), masks)


# --- ablate / debias --------------------------------------------------------------------------

def _class_targets(values: list, classes: list[str], source: str) -> torch.Tensor:
    unknown = sorted({str(v) for v in values} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown[:3]} in {source} are not among the classes {classes[:5]}")
    return torch.tensor([classes.index(str(v)) for v in values])


def _classifier_and_space(args, store, aligner, device, train_rows: list[int], train_targets: torch.Tensor | None,
                          classes: list[str] | None):
    """(classifier, to_space, description): ``to_space(components [C, n, D])`` gives the components the
    classifier's representation is the sum of (aligned for zero-shot, raw for a probe)."""
    if args.classes:
        class_names, embeddings = _class_embeddings(args, aligner, device)
        classify = zero_shot_classifier(embeddings, aligner.bias.detach())
        return classify, (lambda c: map_components_by_parent(aligner, c.to(device), store.labels).cpu()), \
            class_names, f"zero-shot CLIP over {len(class_names)} class texts"
    if not train_rows:
        raise ValueError("without --classes a linear probe is fitted on the images whose split is 'train'; the "
                         "labels file has none")
    _, representation = load_store_rows(store, train_rows)
    probe = fit_linear_probe(representation, train_targets, classes=len(classes))
    return probe, (lambda c: c), classes, f"linear probe fitted on {len(train_rows)} train images"


@torch.no_grad()
def _command_ablate(args) -> int:
    device = _device(args.device)
    store = DecompositionStore(args.store)
    aligner = _load_aligner(args, store, device)
    table = read_table(args.labels)
    ids = [i for i in store.image_ids() if i in table]
    if not ids:
        raise ValueError(f"no image of the store is in {args.labels}")
    splits = [table[i].get("split", "") for i in ids]
    classes = json.loads(Path(args.classes).read_text()).keys() if args.classes else None
    classes = [str(c) for c in classes] if classes else sorted({str(table[i]["label"]) for i in ids})
    targets = _class_targets([table[i]["label"] for i in ids], classes, args.labels)
    train = [k for k, s in enumerate(splits) if s == "train"]
    evaluate = [k for k, s in enumerate(splits) if s != "train"] or list(range(len(ids)))
    positions = store_positions_of(store, ids)
    classify, to_space, _, description = _classifier_and_space(
        args, store, aligner, device, [positions[k] for k in train], targets[train], classes)
    components = to_space(load_store_rows(store, [positions[k] for k in evaluate])[0])          # [C, n, D]
    reference_rows = [positions[k] for k in (train or evaluate)]
    reference = component_means(to_space(load_store_rows(store, reference_rows)[0]))
    steps = _ablation_steps(args, store, aligner, device)
    curve = ablation_curve(components, steps, classify, targets[evaluate], mode=args.mode, reference=reference,
                           labels=store.labels, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    line_plot(curve.ablated, {f"accuracy ({args.mode}-ablation)": curve.accuracy}, out / "ablation.png",
              "components ablated", "accuracy")
    (out / "ablation.json").write_text(json.dumps(dict(curve.as_dict(), classifier=description, order=args.order,
                                                       mode=args.mode, images=len(evaluate)), indent=1))
    print(f"{description}; {len(evaluate)} images evaluated, {args.mode}-ablation by {args.order}\n")
    print(f"{'step':40s} {'ablated':>8s} {'accuracy':>9s}")
    for name, count, value in zip(curve.steps, curve.ablated, curve.accuracy):
        print(f"{name:40s} {count:8d} {value:9.4f}")
    print(f"\nwrote {out / 'ablation.png'} and {out / 'ablation.json'}")
    return 0


def _load_aligner(args, store: DecompositionStore, device: str) -> CompAlign | None:
    if args.aligner is None:
        if getattr(args, "classes", None) or getattr(args, "order", "") == "property":
            raise ValueError("zero-shot classes and property orders need CLIP space: give --aligner ALIGNER")
        return None
    aligner = CompAlign.load(args.aligner, model=store.manifest.get("model", ""), device=device)
    aligner_rows(aligner, store.labels)
    return aligner


def _ablation_steps(args, store: DecompositionStore, aligner: CompAlign | None, device: str) -> list:
    if args.order in ("layer", "layer-last-first"):
        return layer_steps(store.labels, last_first=args.order == "layer-last-first")
    if not args.property:
        raise ValueError("--order property needs --property NAME")
    order = _property_order(args, store, aligner, _property_bases(args, aligner, device))
    return ordered_steps(order[:args.max_steps], store.labels)


@torch.no_grad()
def _command_debias(args) -> int:
    device = _device(args.device)
    store = DecompositionStore(args.store)
    aligner = _load_aligner(args, store, device)
    table = read_table(args.groups)
    ids = [i for i in store.image_ids() if i in table]
    missing = [f for f in ("label", "group", "split") if ids and f not in table[ids[0]]]
    if not ids or missing:
        raise ValueError(f"{args.groups} needs label, group and split (train / val / test) for the store's images"
                         + (f"; missing {missing}" if missing else ""))
    classes = [str(c) for c in json.loads(Path(args.classes).read_text())] if args.classes else \
        sorted({str(table[i]["label"]) for i in ids})
    by_split = {s: [i for i in ids if table[i]["split"] == s] for s in ("train", "val", "test")}
    if not by_split["val"] or not by_split["test"]:
        raise ValueError(f"{args.groups}: k is chosen on the 'val' split and reported on 'test'; both are needed")
    targets = {s: _class_targets([table[i]["label"] for i in by_split[s]], classes, args.groups) for s in by_split}
    positions = {s: store_positions_of(store, by_split[s]) for s in by_split}
    classify, to_space, _, description = _classifier_and_space(args, store, aligner, device, positions["train"],
                                                               targets["train"], classes)
    splits = {}
    for name in ("val", "test"):
        components = to_space(load_store_rows(store, positions[name])[0])
        splits[name] = LabelledSplit(components, targets[name], [table[i]["group"] for i in by_split[name]])
    reference = component_means(to_space(load_store_rows(store, positions["train"] or positions["val"])[0]))
    # component scores for the spurious and the core texts, on validation images (no labels used)
    clip = _clip_for_aligner(args, aligner, device)
    cache = TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE)
    scorer = PropertyScorer({name: property_basis(encode_descriptions(clip, texts, _templates(args.templates), cache))
                             for name, texts in (("spurious", args.spurious), ("core", args.core))})
    validation_raw = load_store_rows(store, positions["val"])[0]
    scorer.update(map_components_by_parent(aligner, validation_raw.to(device), store.labels))
    scores = scorer.scores()
    order = spurious_order(scores["spurious"], scores["core"], scorer.constant())
    result = remove_spurious(order, classify, splits["val"], splits["test"], max_k=args.max_k, reference=reference,
                             progress=True)
    keys = [store.labels[i].key for i in result.ablated]
    print(f"{description}; k = {result.k} chosen on {len(by_split['val'])} validation images "
          f"(worst-group accuracy), reported on {len(by_split['test'])} test images\n")
    print(f"ablated: {', '.join(keys) or 'nothing'}\n")
    print(f"{'group':30s} {'before':>8s} {'after':>8s}")
    for group in result.before.per_group:
        print(f"{group:30s} {result.before.per_group[group]:8.4f} {result.after.per_group[group]:8.4f}")
    for name in ("worst", "average", "overall"):
        print(f"{name + ' group' if name != 'overall' else 'overall':30s} {getattr(result.before, name):8.4f} "
              f"{getattr(result.after, name):8.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "debias.json").write_text(json.dumps(dict(result.as_dict(), ablated_keys=keys,
                                                         classifier=description), indent=1))
        line_plot(list(range(len(result.validation))),
                  {"validation worst group": [v.worst for v in result.validation],
                   "validation average group": [v.average for v in result.validation]},
                  out / "debias-validation.png", "components ablated (k)", "accuracy")
        print(f"\nwrote {out / 'debias.json'} and {out / 'debias-validation.png'}")
    return 0


# --- registration -----------------------------------------------------------------------------

def _add_common(command: argparse.ArgumentParser, aligner_required: bool = True) -> None:
    command.add_argument("--store", required=True, help="decomposition store folder (vit-decompose decompose --out)")
    command.add_argument("--aligner", required=aligner_required, help="aligner folder (vit-decompose align --out)")
    command.add_argument("--templates", help="imagenet (default), raw, or a JSON list of templates with {}")
    command.add_argument("--batch-size", type=int, default=64)
    command.add_argument("--device")
    _add_clip_options(command, required=False)


def _add_model_options(command: argparse.ArgumentParser) -> None:
    group = command.add_argument_group("the store's model (for token positions / the attention baseline)")
    group.add_argument("--model", help="timm name (or open_clip:ARCH) the store was decomposed with")
    group.add_argument("--model-kwargs", help="JSON keyword arguments it was built with, e.g. '{\"depth\": 2}'")
    group.add_argument("--checkpoint", help="its local weights file")
    group.add_argument("--pretrained", action="store_true", help="download its named weights")


def add_application_commands(subparsers) -> None:
    """Register ``retrieve``, ``heatmap``, ``segment``, ``ablate`` and ``debias``."""
    formatter = argparse.RawDescriptionHelpFormatter
    retrieve = subparsers.add_parser("retrieve", help="rank the store's images by a text or by a query image, "
                                     "w.r.t. a property", description=__doc__, formatter_class=formatter)
    _add_common(retrieve)
    retrieve.add_argument("--text", action="append", help="text-based: rank by ⟨Σ selected a_i, t⟩ (repeat: mean)")
    retrieve.add_argument("--query", help="image-based: the query image's id")
    retrieve.add_argument("--raw", action="store_true", help="image-based on raw (not aligned) components")
    retrieve.add_argument("--component", action="append", help="use this component (repeatable)")
    retrieve.add_argument("--property", help="use the top --components components for this property")
    retrieve.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
    retrieve.add_argument("--components", type=int, default=3, help="how many components for --property")
    retrieve.add_argument("--within-property", action="store_true",
                          help="image-based: compare the sums only inside --property's text span (with a large "
                               "--components: the whole representation restricted to the property)")
    retrieve.add_argument("--labels", help="CSV / JSON keyed by image id: with it, precision@top is printed")
    retrieve.add_argument("--label-field", default="label", help="the field of --labels that says relevance")
    retrieve.add_argument("--relevant", help="text-based: the --labels value of relevant images")
    retrieve.add_argument("--top", type=int, default=10)
    retrieve.add_argument("--out", help="write the ranking as JSON")
    retrieve.set_defaults(run=_command_retrieve)

    for name, help_text in (("heatmap", "token heatmaps of a text on a token-level store (PNG overlays)"),
                            ("segment", "zero-shot segmentation from token heatmaps, scored against masks")):
        command = subparsers.add_parser(name, help=help_text, description=__doc__, formatter_class=formatter)
        _add_common(command)
        _add_model_options(command)
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
            command.add_argument("--masks", required=True, help="CSV id,mask or JSON {id: mask.png} (see above)")
            command.add_argument("--baseline", action="store_true", help="also score the last layer's raw "
                                 "attention from the output-reading queries (needs --model and --images)")
            command.add_argument("--out", help="write the scores as JSON")
            command.set_defaults(run=_command_segment)

    ablate = subparsers.add_parser("ablate", help="accuracy as components are mean-ablated cumulatively "
                                   "(PNG + JSON)", description=__doc__, formatter_class=formatter)
    _add_common(ablate, aligner_required=False)
    ablate.add_argument("--labels", required=True, help="CSV / JSON keyed by image id: label[, split]")
    ablate.add_argument("--classes", help='zero-shot: JSON {"label": ["text", ...]} (needs --aligner)')
    ablate.add_argument("--order", default="layer", choices=["layer", "layer-last-first", "property"])
    ablate.add_argument("--property", help="--order property: components by this property's score")
    ablate.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
    ablate.add_argument("--max-steps", type=int, default=50, help="--order property: components ablated at most")
    ablate.add_argument("--mode", default="mean", choices=["mean", "zero"])
    ablate.add_argument("--out", required=True, help="folder for ablation.png and ablation.json")
    ablate.set_defaults(run=_command_ablate)

    debias = subparsers.add_parser("debias", help="remove a spurious correlation: mean-ablate the components "
                                   "tied to spurious texts, k chosen on validation", description=__doc__,
                                   formatter_class=formatter)
    _add_common(debias)
    debias.add_argument("--groups", required=True, help="CSV / JSON keyed by image id: label, group, split")
    debias.add_argument("--spurious", action="append", required=True, help="a text of the spurious property "
                        "(repeatable), e.g. 'water background'")
    debias.add_argument("--core", action="append", required=True, help="a text of the core property "
                        "(repeatable), e.g. 'a bird'")
    debias.add_argument("--classes", help='zero-shot: JSON {"label": ["text", ...]}; default: a linear probe '
                        "on the train split")
    debias.add_argument("--max-k", type=int, default=20, help="try ablating 0..max-k components")
    debias.add_argument("--out", help="folder for debias.json and the validation curve PNG")
    debias.set_defaults(run=_command_debias)
