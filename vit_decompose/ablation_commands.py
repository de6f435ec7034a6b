"""``vit-decompose ablate | debias``: accuracy as components are mean-ablated, and the removal of a spurious
correlation (usage and file formats: ``keyed_files``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from align.ablation import AblationCurve, ablation_curve, component_means, layer_steps, ordered_steps
from align.classifiers import fit_linear_probe, zero_shot_classifier
from align.compalign import CompAlign
from align.datasets import class_texts, image_folder_labels, read_class_names, read_waterbirds
from align.debias import LabelledSplit, remove_spurious, spurious_order
from align.drawing import line_plot
from align.parent_maps import map_components_by_parent
from align.scoring import PropertyScorer, property_basis
from decompose import DecompositionStore

from .keyed_files import APPLICATIONS_HELP, read_table
from .options import add_store_options, clip_for_aligner, device_of, open_store_and_aligner, text_cache
from .text_queries import chosen_properties, class_embeddings, encode_texts, property_bases_of, property_order


def _class_names(args, table: dict, ids: list[str]) -> list[str]:
    """The ``--classes`` file's labels, else every label of the images ``ids`` in ``table``, sorted."""
    classes = [str(c) for c in json.loads(Path(args.classes).read_text())] if args.classes else None
    return classes or sorted({str(table[i]["label"]) for i in ids})


def _class_targets(values: list, classes: list[str], source: str) -> torch.Tensor:
    unknown = sorted({str(v) for v in values} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown[:3]} in {source} are not among the classes {classes[:5]}")
    return torch.tensor([classes.index(str(v)) for v in values])


def add_label_options(command: argparse.ArgumentParser, required: bool = True) -> None:
    """``--labels FILE`` or ``--image-folder`` (``--class-names``), and ``--zero-shot`` / ``--classes``."""
    source = command.add_mutually_exclusive_group(required=required)
    source.add_argument("--labels", help="CSV / JSON keyed by image id: label[, split]")
    source.add_argument("--image-folder", action="store_true", help="ImageFolder layout: each image's class is the "
                        "folder it sits in (a train / val / test folder above it gives its split)")
    command.add_argument("--class-names", help="--image-folder: names of the class folders, JSON "
                         '{"n01440764": "tench"} or LOC_synset_mapping.txt lines (default: ImageNet names for '
                         "WordNet ids, else the folder names)")
    command.add_argument("--classes", help='zero-shot: JSON {"label": ["text", ...]} (needs --aligner)')
    command.add_argument("--zero-shot", action="store_true", help="zero-shot CLIP over the labels' own names "
                         "(with --image-folder: the class names; needs --aligner)")


def labels_table(args, store: DecompositionStore) -> tuple[dict, str, dict[str, list[str]] | None]:
    """({id: {label[, split]}}, where it came from, {label: names} or None) of ``--labels`` / ``--image-folder``."""
    if args.labels:
        return read_table(args.labels), args.labels, None
    if args.image_folder:
        table = image_folder_labels(store.image_ids())
        names = read_class_names(args.class_names) if args.class_names else None
        return table, "the store's class folders", class_texts(sorted({r["label"] for r in table.values()}), names)
    raise ValueError("give --labels FILE or --image-folder")


def _classifier_and_space(args, store, aligner, device, train_rows: list[int], train_targets: torch.Tensor | None,
                          classes: list[str] | None, names: dict[str, list[str]] | None = None):
    """(classifier, to_space, class names, description): ``to_space(components [C, n, D])`` gives the components the
    classifier's representation is the sum of (aligned for zero-shot, raw for a probe)."""
    if args.classes or getattr(args, "zero_shot", False):
        if aligner is None:
            raise ValueError("zero-shot classes need CLIP space: give --aligner ALIGNER")
        texts = None if args.classes else {c: (names or {}).get(c, [c]) for c in classes}
        class_names, embeddings = class_embeddings(args, aligner, device, texts)
        classify = zero_shot_classifier(embeddings, aligner.bias.detach())
        return classify, (lambda c: map_components_by_parent(aligner, c.to(device), store.labels).cpu()), \
            class_names, f"zero-shot CLIP over {len(class_names)} class texts"
    if not train_rows:
        raise ValueError("without --classes a linear probe is fitted on the images whose split is 'train'; the "
                         "labels file has none")
    _, representation = store.load_rows(train_rows)
    probe = fit_linear_probe(representation, train_targets, classes=len(classes))
    return probe, (lambda c: c), classes, f"linear probe fitted on {len(train_rows)} train images"


@torch.no_grad()
def ablation_on_table(args, store: DecompositionStore, aligner: CompAlign | None, device: torch.device,
                      table: dict, source: str, steps: list, names: dict[str, list[str]] | None = None
                      ) -> tuple[AblationCurve, str, int]:
    """(curve, classifier description, images evaluated): ``steps`` mean- (``args.mode``) ablated cumulatively on
    the store's images of ``table`` ({id: {label[, split]}}, read from ``source``) that are not in the train
    split; a linear probe fitted on the train split, or zero-shot ``--classes``."""
    ids = [i for i in store.image_ids() if i in table]
    if not ids:
        raise ValueError(f"no image of the store is in {source}")
    splits = [table[i].get("split", "") for i in ids]
    classes = _class_names(args, table, ids)
    targets = _class_targets([table[i]["label"] for i in ids], classes, source)
    train = [k for k, s in enumerate(splits) if s == "train"]
    evaluate = [k for k, s in enumerate(splits) if s != "train"] or list(range(len(ids)))
    positions = store.positions_of(ids)
    classify, to_space, _, description = _classifier_and_space(
        args, store, aligner, device, [positions[k] for k in train], targets[train], classes, names)
    components = to_space(store.load_rows([positions[k] for k in evaluate])[0])          # [C, n, D]
    reference_rows = [positions[k] for k in (train or evaluate)]
    reference = component_means(to_space(store.load_rows(reference_rows)[0]))
    curve = ablation_curve(components, steps, classify, targets[evaluate], mode=args.mode, reference=reference,
                           labels=store.labels, progress=True)
    return curve, description, len(evaluate)


@torch.no_grad()
def _command_ablate(args) -> int:
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device, same_level=False)
    table, source, names = labels_table(args, store)
    steps = _ablation_steps(args, store, aligner, device)
    curve, description, evaluated = ablation_on_table(args, store, aligner, device, table, source, steps, names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    line_plot(curve.ablated, {f"accuracy ({args.mode}-ablation)": curve.accuracy}, out / "ablation.png",
              "components ablated", "accuracy")
    (out / "ablation.json").write_text(json.dumps(dict(curve.as_dict(), classifier=description, order=args.order,
                                                       mode=args.mode, images=evaluated), indent=1))
    print(f"{description}; {evaluated} images evaluated, {args.mode}-ablation by {args.order}\n")
    print(f"{'step':40s} {'ablated':>8s} {'accuracy':>9s}")
    for name, count, value in zip(curve.steps, curve.ablated, curve.accuracy):
        print(f"{name:40s} {count:8d} {value:9.4f}")
    print(f"\nwrote {out / 'ablation.png'} and {out / 'ablation.json'}")
    return 0


def _ablation_steps(args, store: DecompositionStore, aligner: CompAlign | None, device: torch.device) -> list:
    if args.order in ("layer", "layer-last-first"):
        return layer_steps(store.labels, last_first=args.order == "layer-last-first")
    if not args.property:
        raise ValueError("--order property needs --property NAME")
    order = property_order(args, store, aligner, property_bases_of(args, aligner, device, chosen_properties(args)))
    return ordered_steps(order[:args.max_steps], store.labels)


@torch.no_grad()
def _command_debias(args) -> int:
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device, same_level=False)
    table, source = (read_waterbirds(args.waterbirds), f"{args.waterbirds} (Waterbirds metadata.csv)") \
        if args.waterbirds else (read_table(args.groups), args.groups)
    ids = [i for i in store.image_ids() if i in table]
    missing = [f for f in ("label", "group", "split") if ids and f not in table[ids[0]]]
    if not ids or missing:
        raise ValueError(f"{source} needs label, group and split (train / val / test) for the store's images"
                         + (f"; missing {missing}" if missing else "")
                         + ("" if ids else f" (none of its ids is in the store, e.g. {store.image_ids()[:1]})"))
    classes = _class_names(args, table, ids)
    by_split = {s: [i for i in ids if table[i]["split"] == s] for s in ("train", "val", "test")}
    if not by_split["val"] or not by_split["test"]:
        raise ValueError(f"{source}: k is chosen on the 'val' split and reported on 'test'; both are needed")
    targets = {s: _class_targets([table[i]["label"] for i in by_split[s]], classes, source) for s in by_split}
    positions = {s: store.positions_of(by_split[s]) for s in by_split}
    classify, to_space, _, description = _classifier_and_space(args, store, aligner, device, positions["train"],
                                                               targets["train"], classes)
    splits = {}
    for name in ("val", "test"):
        components = to_space(store.load_rows(positions[name])[0])
        splits[name] = LabelledSplit(components, targets[name], [table[i]["group"] for i in by_split[name]])
    reference = component_means(to_space(store.load_rows(positions["train"] or positions["val"])[0]))
    # component scores for the spurious and the core texts, on validation images (no labels used)
    clip = clip_for_aligner(args, aligner, device)
    cache = text_cache(args)
    scorer = PropertyScorer({name: property_basis(encode_texts(args, clip, texts, cache))
                             for name, texts in (("spurious", args.spurious), ("core", args.core))})
    validation_raw = store.load_rows(positions["val"])[0]
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


def add_ablation_commands(subparsers) -> None:
    """Register ``ablate`` and ``debias``."""
    formatter = argparse.RawDescriptionHelpFormatter
    ablate = subparsers.add_parser("ablate", help="accuracy as components are mean-ablated cumulatively "
                                   "(PNG + JSON)", description=APPLICATIONS_HELP, formatter_class=formatter)
    add_store_options(ablate, aligner_required=False)
    add_label_options(ablate)
    ablate.add_argument("--order", default="layer", choices=["layer", "layer-last-first", "property"])
    ablate.add_argument("--property", help="--order property: components by this property's score")
    ablate.add_argument("--properties", help='JSON {"property": ["description", ...]} added to the shipped')
    ablate.add_argument("--max-steps", type=int, default=50, help="--order property: components ablated at most")
    ablate.add_argument("--mode", default="mean", choices=["mean", "zero"])
    ablate.add_argument("--out", required=True, help="folder for ablation.png and ablation.json")
    ablate.set_defaults(run=_command_ablate)

    debias = subparsers.add_parser("debias", help="remove a spurious correlation: mean-ablate the components "
                                   "tied to spurious texts, k chosen on validation", description=APPLICATIONS_HELP,
                                   formatter_class=formatter)
    add_store_options(debias)
    groups = debias.add_mutually_exclusive_group(required=True)
    groups.add_argument("--groups", help="CSV / JSON keyed by image id: label, group, split")
    groups.add_argument("--waterbirds", metavar="ROOT", help="Waterbirds: ROOT/metadata.csv (img_filename, y, place, "
                        "split); groups = y × place; the store decomposed from ROOT")
    debias.add_argument("--spurious", action="append", required=True, help="a text of the spurious property "
                        "(repeatable), e.g. 'water background'")
    debias.add_argument("--core", action="append", required=True, help="a text of the core property "
                        "(repeatable), e.g. 'a bird'")
    debias.add_argument("--classes", help='zero-shot: JSON {"label": ["text", ...]}; default: a linear probe '
                        "on the train split")
    debias.add_argument("--zero-shot", action="store_true", help="zero-shot CLIP over the labels' own names "
                        "(Waterbirds: landbird, waterbird)")
    debias.add_argument("--max-k", type=int, default=20, help="try ablating 0..max-k components")
    debias.add_argument("--out", help="folder for debias.json and the validation curve PNG")
    debias.set_defaults(run=_command_debias)
