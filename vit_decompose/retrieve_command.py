"""``vit-decompose retrieve``: rank a store's images by a text, or by a query image with respect to a property
(usage and file formats: ``keyed_files``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from align.compalign import CompAlign
from align.parent_maps import map_components_by_parent, text_contributions
from align.retrieval import image_retrieval_scores, precision_at_k, ranked
from decompose import DecompositionStore

from .keyed_files import APPLICATIONS_HELP, read_table
from .options import add_store_options, device_of, open_store_and_aligner
from .text_queries import chosen_properties, property_bases_of, property_order, text_direction


@torch.no_grad()
def _command_retrieve(args) -> int:
    if bool(args.text) == bool(args.query):
        raise ValueError("give --text (text-based retrieval) or --query IMAGE_ID (image-based), not both")
    if args.within_property and (args.text or args.raw or not args.property):
        raise ValueError("--within-property compares aligned image sums inside --property's text span: "
                         "use it with --query and --property, without --raw or --text")
    device = device_of(args.device)
    store, aligner = open_store_and_aligner(args, device)
    ids = store.image_ids()
    needs_bases = args.property and (args.within_property or not args.component)  # --component wins for the rows
    bases = property_bases_of(args, aligner, device, chosen_properties(args)) if needs_bases else None
    selected = _selected_components(args, store, aligner, bases)
    rows = list(range(len(store.labels))) if selected is None else selected
    labels = [store.labels[i] for i in rows]
    direction = text_direction(args, aligner, device) if args.text else None
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
        query = store.positions_of([args.query])[0]
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


def _selected_components(args, store: DecompositionStore, aligner: CompAlign,
                         bases: dict[str, torch.Tensor] | None) -> list[int] | None:
    """``--component`` keys, or the top ``--components`` for ``--property`` (``bases``: ``property_bases_of``),
    or None (all)."""
    keys = [l.key for l in store.labels]
    if args.component:
        unknown = [k for k in args.component if k not in keys]
        if unknown:
            raise ValueError(f"unknown components {unknown[:3]}; keys look like {keys[:3]}")
        return [keys.index(k) for k in args.component]
    if not args.property:
        return None
    return property_order(args, store, aligner, bases)[:args.components]


def add_retrieve_command(subparsers) -> None:
    """Register ``retrieve``."""
    retrieve = subparsers.add_parser("retrieve", help="rank the store's images by a text or by a query image, "
                                     "w.r.t. a property", description=APPLICATIONS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_options(retrieve)
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
