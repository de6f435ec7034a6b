"""What ``vit-decompose attribute`` scores each image towards, checked against the model before an image is read:

* ``--class N|NAME``: one class of the classifier (its logit; a NAME through ``ClassNames``);
* ``--text``: a text's CLIP direction, each component seen through the ``--aligner``;
* ``--vector FILE``: a direction [D] in the space of the model's representation (pre-logits);
* ``--image-folder``: each image's own ImageFolder class: its class index with a classifier, its class text with an
  aligner.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from align.datasets import class_texts, image_folder_labels, read_class_names
from decompose.decomposition import Decomposition

from .attribution_files import target_text


class TargetKind(str, Enum):
    CLASS = "class"        # a classifier logit: decomposer output "logits"
    TEXT = "text"          # a CLIP text through the aligner: output "pre_logits"
    VECTOR = "vector"      # a direction of the representation: output "pre_logits"


@dataclass(frozen=True)
class ClassNames:
    """The classifier's classes in its order: ``keys[i]`` (a folder or WordNet id) and ``names[i]`` (its names);
    ``source`` says where they come from."""

    keys: list[str]
    names: list[list[str]]
    source: str

    def index(self, value: str, what: str) -> int:
        """The class ``value`` names: its key, else (any case) one of its names; ``what`` names it in errors."""
        if value in self.keys:
            return self.keys.index(value)
        wanted = value.casefold()
        found = [i for i, names in enumerate(self.names) if wanted in (n.casefold() for n in names)]
        if len(found) == 1:
            return found[0]
        if found:
            listed = ", ".join(f"{i} ({self.keys[i]})" for i in found)
            raise ValueError(f"{what} {value!r} names several classes of {self.source}: {listed}; give the index or "
                             "the key")
        raise ValueError(f"{what} {value!r} is not among the {len(self.keys)} classes of {self.source} (e.g. "
                         f"{', '.join(self.keys[:3])}); give a class index or a name from {self.source}")

    def record(self, index: int) -> dict:
        """JSON of class ``index``: the index, its key and its first name."""
        return {"class": index, "key": self.keys[index], "name": (self.names[index] or [self.keys[index]])[0]}


def classifier_classes(args, model: torch.nn.Module) -> ClassNames | None:
    """``--class-names`` (its order is the classifier's), else the names the model records (timm's pretrained
    config, or ImageNet's for an ImageNet-sized classifier), else None."""
    if args.class_names:
        names = read_class_names(args.class_names)
        return ClassNames(list(names), list(names.values()), f"--class-names {args.class_names}")
    from timm.data import ImageNetInfo, infer_imagenet_subset

    config = getattr(model, "pretrained_cfg", None) or {}
    if config.get("label_names"):
        keys = [str(k) for k in config["label_names"]]
        descriptions = config.get("label_descriptions") or {}
        return ClassNames(keys, [[k, *_synonyms(descriptions.get(k, ""))] for k in keys], "the model's label names")
    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    descriptions = info.label_descriptions(as_dict=True)
    return ClassNames(list(info.label_names()), [_synonyms(descriptions[k]) for k in info.label_names()],
                      f"timm's {subset} class names")


def _synonyms(description: str) -> list[str]:
    return [name.strip() for name in description.split(",") if name.strip()]


@dataclass
class ImageTargets:
    """Each image's target. ``choose(image id)`` is what ``align.attribution.attribute`` takes for it (a class index
    or a text); a vector target is the one ``vector`` [D]; ``describe(image id)`` is its JSON record, ``summary``
    the target of every image in words."""

    kind: TargetKind
    describe: Callable[[str], dict]
    summary: str
    choose: Callable[[str], int | str] | None = None
    vector: torch.Tensor | None = None

    @property
    def output(self) -> str:
        """The decomposer's output this target lives on."""
        return "logits" if self.kind is TargetKind.CLASS else "pre_logits"

    def of(self, ids: list[str]) -> list | torch.Tensor:
        """The ``target=`` of ``attribute`` for the images ``ids``."""
        return self.vector if self.vector is not None else [self.choose(i) for i in ids]

    def totals(self, dec: Decomposition, targets: list | torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[b]: each image's target value of the model's own output (the class logit, ⟨representation, v⟩); for a
        text, whose map into CLIP space is per component, the sum of the ``scores`` [C, b]."""
        if self.kind is TargetKind.TEXT:
            return scores.sum(0)
        representation = dec.representation.flatten(1)                                   # [b, D]
        if self.kind is TargetKind.VECTOR:
            return representation @ targets.to(representation)
        return representation.gather(1, torch.tensor(targets, device=representation.device)[:, None])[:, 0]


def check_target_options(args) -> None:
    """Refuse what needs no model to be refused: a text without an aligner, an unreadable vector file."""
    if args.text is not None and not args.aligner:
        raise ValueError("--text is scored in CLIP space: give --aligner ALIGNER (vit-decompose align --out) for "
                         "this model, and the CLIP options if the aligner records none")
    if args.vector:
        read_vector(args.vector)


def read_vector(path: str) -> torch.Tensor:
    """The direction [D] in ``path`` (.npy, or a torch .pt / .pth file of one tensor)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--vector file {path} does not exist")
    if file.suffix not in (".npy", ".pt", ".pth"):
        raise ValueError(f"--vector {path}: expected a .npy file or a torch .pt / .pth file of one tensor [D]")
    try:
        vector = torch.from_numpy(np.load(file, allow_pickle=False)) if file.suffix == ".npy" else \
            torch.load(file, weights_only=True)
    except Exception as error:  # noqa: BLE001  (a foreign or truncated file: the unpicklers raise any kind)
        raise ValueError(f"--vector {path} could not be read ({type(error).__name__}: {error})") from None
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or not vector.is_floating_point():
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise ValueError(f"--vector {path} holds {shape}; it must be one direction [D] of floats")
    return vector


def image_targets(args, model: torch.nn.Module, width: Callable[[str], int]) -> ImageTargets:
    """The target of ``args`` for ``model``; ``width(output)`` is the decomposed output's width for that output
    ("logits" or "pre_logits"). Refuses a class the classifier lacks or a vector of another width."""
    if args.vector:
        vector, expected = read_vector(args.vector), width("pre_logits")
        if vector.numel() != expected:
            raise ValueError(f"--vector {args.vector} has width {vector.numel()}, but the representation of --model "
                             f"{args.model} (pre-logits) has width {expected}; give a direction of that width")
        record = {"vector": args.vector}
        return ImageTargets(TargetKind.VECTOR, lambda _: record, target_text(record), vector=vector.float())
    if args.text is not None:
        record = {"text": args.text}
        return ImageTargets(TargetKind.TEXT, lambda _: record, args.text, choose=lambda _: args.text)
    if args.image_folder and args.aligner:
        return _folder_texts(args)
    classes, count = _classifier(args, model, width)
    if args.image_folder:
        return _folder_classes(classes)
    index = _class_index(args.target_class, classes, count, args.model)
    record = classes.record(index) if classes else {"class": index}
    return ImageTargets(TargetKind.CLASS, lambda _: record, target_text(record), choose=lambda _: index)


def _classifier(args, model: torch.nn.Module, width: Callable[[str], int]) -> tuple[ClassNames | None, int]:
    """(the classifier's class names or None, its number of classes); refused without a classifier."""
    if not getattr(model, "num_classes", 0):
        raise ValueError(f"--model {args.model} has no classifier (num_classes is 0 or absent), so it has no class "
                         "logits; score a --vector of its representation, or a --text with --aligner")
    count, classes = width("logits"), classifier_classes(args, model)
    if classes is not None and len(classes.keys) != count:
        raise ValueError(f"{classes.source} lists {len(classes.keys)} classes, the classifier of --model {args.model} "
                         f"has {count}; list every class in the classifier's order")
    return classes, count


def _class_index(value: str, classes: ClassNames | None, count: int, model: str) -> int:
    if value.isdigit():
        if int(value) >= count:
            raise ValueError(f"--class {value} is outside the {count} classes of --model {model} (0..{count - 1})")
        return int(value)
    if classes is None:
        raise ValueError(f"--class {value!r} is a name, but --model {model} records no class names; give the class "
                         "index, or --class-names FILE listing the classifier's classes in its order")
    return classes.index(value, "--class")


def _folder_of(image_id: str) -> str:
    return image_folder_labels([image_id])[image_id]["label"]


def _folder_classes(classes: ClassNames | None) -> ImageTargets:
    """Each image's class index: the classifier's class named by its folder."""
    if classes is None:
        raise ValueError("--image-folder with a classifier needs the classes' order: give --class-names FILE (JSON "
                         "or LOC_synset_mapping.txt) listing every class folder in the classifier's order, or "
                         "--aligner to score each image along its class's text")
    index: dict[str, int] = {}

    def choose(image_id: str) -> int:
        folder = _folder_of(image_id)
        if folder not in index:
            index[folder] = classes.index(folder, f"the class folder of {image_id!r}")
        return index[folder]

    def describe(image_id: str) -> dict:
        return dict(classes.record(choose(image_id)), folder=_folder_of(image_id))

    return ImageTargets(TargetKind.CLASS, describe, "each image's own class (its logit)", choose=choose)


def _folder_texts(args) -> ImageTargets:
    """Each image's class text (its first name: ``--class-names``, timm's ImageNet name, or the folder name)."""
    names = read_class_names(args.class_names) if args.class_names else None

    def choose(image_id: str) -> str:
        folder = _folder_of(image_id)
        return class_texts([folder], names)[folder][0]

    return ImageTargets(TargetKind.TEXT, lambda i: {"text": choose(i), "folder": _folder_of(i)},
                        "each image's own class (its text)", choose=choose)


def check_image_folder(ids: list[str]) -> None:
    """Every image must sit in a class folder (refused before the model is loaded)."""
    image_folder_labels(ids)
