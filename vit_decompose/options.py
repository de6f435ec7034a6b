"""Options shared by several commands, and what they read: the model, the device, the CLIP model, the store
and its aligner."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from align.clip_models import ClipLoadError, ClipModel, load_clip
from align.compalign import CompAlign
from align.parent_maps import aligner_rows
from align.text_bank import TextEmbeddingCache
from decompose import DecompositionStore
from decompose.models import load_model

TEXT_CACHE = "text-embeddings"   # an aligner folder's cache of text embeddings


# --- the model --------------------------------------------------------------------------------

def add_model_options(parser, required: bool = True, model_help: str = "timm name, or open_clip:ARCH[:TAG]") -> None:
    """``--model``, ``--checkpoint``, ``--pretrained``, ``--model-kwargs`` (read by ``model_from_arguments``)."""
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--checkpoint", help="local weights file (safetensors / .pth)")
    parser.add_argument("--pretrained", action="store_true", help="download the named weights")
    parser.add_argument("--model-kwargs", help='JSON keyword arguments for the model constructor, e.g. \'{"depth": 2}\'')


def model_kwargs(args) -> dict:
    return json.loads(args.model_kwargs) if args.model_kwargs else {}


def model_from_arguments(args) -> torch.nn.Module:
    return load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **model_kwargs(args))


def add_image_folder_option(parser, required: bool = False, help_text: str = "image folder") -> None:
    """``--images DIR``: a folder of images (read recursively; an ImageFolder layout works)."""
    parser.add_argument("--images", required=required, metavar="DIR", help=help_text)


# --- the device -------------------------------------------------------------------------------

def add_device_option(parser) -> None:
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu; under torchrun "
                        "each rank takes cuda:LOCAL_RANK)")


def device_of(requested: str | None) -> torch.device:
    """``--device``, or cuda when there is one; a torchrun rank's bare ``cuda`` is its LOCAL_RANK's GPU."""
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a torch device ({error}); use e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but torch sees no CUDA GPU; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    return device


# --- the CLIP model ---------------------------------------------------------------------------

def add_clip_options(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("CLIP model" + ("" if required else " (default: the one the aligner records)"))
    group.add_argument("--clip", help="open_clip architecture, e.g. ViT-B-32")
    group.add_argument("--clip-config", help="open_clip model config JSON (embed_dim, vision_cfg, text_cfg) "
                       "instead of --clip")
    group.add_argument("--clip-pretrained", help="open_clip pretrained tag, e.g. openai (downloads)")
    group.add_argument("--clip-checkpoint", help="local CLIP weights (safetensors or torch weights_only file)")


def clip_from_arguments(args, device: torch.device) -> ClipModel:
    if not args.clip and not args.clip_config:
        raise ClipLoadError("name the CLIP model: --clip ARCH (with --clip-pretrained TAG or --clip-checkpoint FILE) "
                            "or --clip-config JSON")
    return load_clip(args.clip, args.clip_pretrained, args.clip_checkpoint, args.clip_config, device=device)


def clip_for_aligner(args, aligner: CompAlign, device: torch.device) -> ClipModel:
    """The CLIP named on the command line, else the one recorded in the aligner."""
    recorded = dict(aligner.clip.get("spec") or {})
    if args.clip or args.clip_config:
        clip = clip_from_arguments(args, device)
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


def templates(value: str | None):
    """``--templates``: imagenet (None: the default), raw, or a JSON file of templates with {}."""
    if value is None or value in ("imagenet", "raw"):
        return value
    return json.loads(Path(value).read_text())


def text_cache(args) -> TextEmbeddingCache:
    """The text-embedding cache kept in the ``--aligner`` folder."""
    return TextEmbeddingCache(Path(args.aligner) / TEXT_CACHE)


# --- the store and its aligner ----------------------------------------------------------------

def add_store_options(command: argparse.ArgumentParser, aligner_required: bool = True, batch_size: bool = True,
                      store_required: bool = True) -> None:
    """``--store``, ``--aligner``, ``--templates`` (``--batch-size``), ``--device`` and the CLIP options."""
    command.add_argument("--store", required=store_required, help="decomposition store folder "
                         "(vit-decompose decompose --out)")
    command.add_argument("--aligner", required=aligner_required, help="aligner folder (vit-decompose align --out)")
    command.add_argument("--templates", help="imagenet (default), raw, or a JSON list of templates with {}")
    if batch_size:
        command.add_argument("--batch-size", type=int, default=64)
    add_device_option(command)
    add_clip_options(command, required=False)


def open_store_and_aligner(args, device: torch.device, same_level: bool = True
                           ) -> tuple[DecompositionStore, CompAlign | None]:
    """The store and ``--aligner``: of the store's model, level and components (``same_level``), else of its
    model and possibly coarser (head maps for token components; None without ``--aligner``)."""
    store = DecompositionStore(args.store)
    if not same_level:
        return store, aligner_for_store(args, store, device)
    aligner = CompAlign.load(args.aligner, model=store.manifest.get("model", ""), level=store.level,
                             labels=store.labels, device=device)
    return store, aligner


def aligner_for_store(args, store: DecompositionStore, device: torch.device) -> CompAlign | None:
    """``--aligner`` of the store's model, possibly coarser (head maps for token components); None without it."""
    if args.aligner is None:
        if getattr(args, "classes", None) or getattr(args, "zero_shot", False) or getattr(args, "order", "") == "property":
            raise ValueError("zero-shot classes and property orders need CLIP space: give --aligner ALIGNER")
        return None
    aligner = CompAlign.load(args.aligner, model=store.manifest.get("model", ""), device=device)
    aligner_rows(aligner, store.labels)  # every component has a map (its own or its head's)
    return aligner
