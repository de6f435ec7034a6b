"""Training and evaluating the toy-world models (fixed seeds, one CPU thread: bit-for-bit reruns).

``train_models(out_dir)`` trains every model of ``RECIPES`` on freshly generated images,
evaluates it on held-out images of other world seeds and writes ``out_dir/<name>.safetensors``
plus ``out_dir/models.json`` (configs, recipes, metrics). A target's metrics say which factors
a linear probe on its full representation reads (``toyworld.encoding``) on held-out images of
the factor world.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .clip_training import train_toy_clip
from .dino import Dino, DinoOptions
from .encoding import ENCODED_MARGIN, encoded_factors, factor_probes, representation
from .generator import FACTORS
from .manifest import rounded, save_weights, write_manifest
from .models import (
    CLIP_MEAN,
    CLIP_NAME,
    CLIP_STD,
    MANIFEST,
    TARGET_CONFIGS,
    TARGET_MEAN,
    TARGET_NAMES,
    TARGET_STD,
    Task,
    build_target,
    clip_config,
    target_preprocess,
)
from .pools import ImagePool, PoolCache, World, as_float, background_textures, image_pool
from .recipes import Recipe, batches, clip_gradients, optimiser, shortened
from .spurious import BACKGROUND_GROUPS, TRAIN_AGREEMENT, spurious_split

THREADS = 1  # torch CPU threads while training: fixed, so that a rerun reproduces the weights bit for bit
PROBE_FIT_FRACTION = 2 / 3  # of a target's held-out factor-world images: probe fit; the rest: probe test

_CLASSES = dict(world=World.CLASSES, train_world=1, train_images=40000, eval_world=101, eval_images=3000)
RECIPES: dict[str, Recipe] = {  # in training order: spurious starts from the trained deit
    "deit": Recipe(seed=0, steps=8000, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=200,
                   **{**_CLASSES, "train_images": 120000}),
    "swin": Recipe(seed=0, steps=4000, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=200,
                   **{**_CLASSES, "train_images": 60000}),
    "maxvit": Recipe(seed=0, steps=4000, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=200,
                     **{**_CLASSES, "train_images": 60000}),
    # DinoOptions' defaults: no flips, near-whole global crops, background swaps 0.5, object restyles 0.25,
    # the contrastive term, sin-cos positions, Sinkhorn-Knopp, the region term (docs/toyworld-dino.md
    # measures the others)
    "dino": Recipe(seed=0, steps=8000, batch_size=64, lr=1e-3, weight_decay=0.04, warmup_steps=100,
                   gradient_clip=3.0, dino=DinoOptions(), **_CLASSES),
    # a linear head on the frozen deit features (a fine-tuned backbone learns the background alone)
    "spurious": Recipe(seed=0, steps=300, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=20,
                       train_world=2, train_images=10000, eval_world=102, eval_images=2000, init_from="deit",
                       init_lr_scale=0.0),
    CLIP_NAME: Recipe(seed=0, steps=2000, batch_size=128, lr=2e-3, weight_decay=0.1, warmup_steps=100,
                      train_world=1, train_images=60000, eval_world=103, eval_images=2000, phrase_probability=0.3,
                      template_probability=0.3, factor_loss_weight=1.0),
}


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
                     log: Callable[[str], None] = print, initialised: frozenset[str] = frozenset()) -> nn.Module:
    """Cross-entropy training on uint8 images [N, 3, S, S] with labels [N]; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(recipe.seed)
    adamw, scheduler = optimiser(model, recipe, initialised)
    model.train()
    for step, batch in enumerate(batches(len(images), recipe, generator)):
        loss = nn.functional.cross_entropy(model(target_preprocess(as_float(images[batch]))), labels[batch])
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), recipe)
        adamw.step()
        scheduler.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}")
    model.requires_grad_(True)
    return model.eval()


def train_dino(name: str, pool: ImagePool, recipe: Recipe, log: Callable[[str], None] = print) -> nn.Module:
    """The DINO teacher's backbone after ``recipe.steps`` steps on the pool's images (no labels; the
    objects' masks for background swaps), as target ``name`` (built from its config, eval mode)."""
    student = build_target(name, dynamic_img_size=True)  # reads the small local crops too
    backgrounds = background_textures(pool.images.shape[-1])                          # [V, 3, S, S]
    dino = Dino(student, recipe.dino or DinoOptions(), target_preprocess, backgrounds)
    generator = torch.Generator().manual_seed(recipe.seed)
    adamw, scheduler = optimiser(dino.student, recipe)
    for step, batch in enumerate(batches(len(pool), recipe, generator)):
        loss = dino.loss(as_float(pool.images[batch]), generator, pool.masks[batch])
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(dino.student.parameters(), recipe)
        adamw.step()
        scheduler.step()
        dino.update_teacher(dino.teacher_momentum(step, recipe.steps))
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  step {step:4d}  DINO loss {loss.item():.3f}")
    model = build_target(name)
    model.load_state_dict(dino.teacher_backbone.state_dict())
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes [N] of a target on uint8 or [0, 1] float images [N, 3, S, S]."""
    model.eval()
    to_float = as_float if images.dtype == torch.uint8 else (lambda x: x)
    return torch.cat([model(target_preprocess(to_float(images[i:i + batch_size]))).argmax(-1)
                      for i in range(0, len(images), batch_size)])


def group_accuracy(predicted: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> dict[str, float]:
    """Accuracy per (label, background group), their mean and the worst one."""
    per_group = {}
    for label in (0, 1):
        for group, scenes in enumerate(BACKGROUND_GROUPS):
            chosen = (labels == label) & (groups == group)
            per_group[f"label {label}, {'/'.join(scenes)}"] = (predicted[chosen] == label).float().mean().item()
    return {"groups": per_group, "average_group_accuracy": sum(per_group.values()) / len(per_group),
            "worst_group_accuracy": min(per_group.values()),
            "accuracy": (predicted == labels).float().mean().item()}


def encoding_metrics(model: nn.Module, pool: ImagePool) -> dict:
    """{"probes": factor -> probe / chance / threshold / encoded, "encoded": [factors], ...} of a target's
    representation on held-out factor-world images (the first ``PROBE_FIT_FRACTION`` fit the probes)."""
    features = representation(model, target_preprocess(as_float(pool.images)))               # [N, D]
    fit = round(len(pool) * PROBE_FIT_FRACTION)
    probes = factor_probes(features, {name: pool.factor(name) for name in FACTORS},
                           torch.arange(fit), torch.arange(fit, len(pool)))
    return {"probes": probes, "encoded": encoded_factors(probes), "encoded_margin": ENCODED_MARGIN,
            "probe_images": {"fit": fit, "test": len(pool) - fit}}


def train_target(name: str, recipe: Recipe, pools: PoolCache, out: Path, log: Callable[[str], None] = print):
    """(trained target, metrics) of one target; ``recipe.init_from`` is read from ``out``."""
    torch.manual_seed(recipe.seed)
    task = Task(TARGET_CONFIGS[name]["task"])
    if task is Task.SPURIOUS:
        return _train_spurious(name, recipe, out, log)
    images = pools.world(recipe.train_world, recipe.train_images, recipe.world)
    if task is Task.SELF_SUPERVISED:
        model, metrics = train_dino(name, images, recipe, log), {}
    else:
        model = train_classifier(build_target(name), images.images, images.classes, recipe, log)
        held_out = pools.world(recipe.eval_world, recipe.eval_images, World.CLASSES)
        accuracy = (predict(model, held_out.images) == held_out.classes).float().mean().item()
        metrics = {"class_accuracy": accuracy, "chance": 1 / len(TARGET_CONFIGS[name]["classes"])}
    metrics.update(encoding_metrics(model, pools.world(recipe.eval_world, recipe.eval_images)),
                   eval_images=recipe.eval_images)
    return model, rounded(metrics)


def _train_spurious(name: str, recipe: Recipe, out: Path, log: Callable[[str], None]):
    """The toy Waterbirds: label = shape group, background correlated in training."""
    model, initialised = build_target(name), frozenset()
    if recipe.init_from:
        initialised = load_backbone(model, out / f"{recipe.init_from}.safetensors", log)
    train = spurious_split(recipe.train_images, recipe.train_world, train=True)
    test = spurious_split(recipe.eval_images, recipe.eval_world, train=False)
    train_classifier(model, image_pool(recipe.train_world, train.indices).images, train.labels, recipe, log,
                     initialised)
    predicted = predict(model, image_pool(recipe.eval_world, test.indices).images)
    metrics = group_accuracy(predicted, test.labels, test.background_groups)
    metrics.update(train_agreement=TRAIN_AGREEMENT, eval_images=recipe.eval_images)
    return model, rounded(metrics)


def load_backbone(model: nn.Module, path: Path, log: Callable[[str], None] = print) -> frozenset[str]:
    """Copy every weight of ``path`` whose name and shape match ``model`` (all but a resized
    classifier); returns the names of the parameters copied."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the model it names first (recipes' init_from)")
    own = model.state_dict()
    weights = load_file(str(path))
    kept = {key: value for key, value in weights.items() if key in own and own[key].shape == value.shape}
    model.load_state_dict(kept, strict=False)
    log(f"  initialised from {path.name}; left at random init: {sorted(set(own) - set(kept))}")
    return frozenset(name for name, _ in model.named_parameters() if name in kept)


def train_models(out_dir: str | Path, only: Sequence[str] | None = None, steps: int | None = None,
                 eval_images: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train ``only`` (default all: ``TARGET_NAMES`` and ``"clip"``) into ``out_dir``; returns the manifest.

    steps, eval_images: shorten every recipe (smoke tests; see ``shortened``). An existing
    manifest in ``out_dir`` keeps the entries of models not trained now.
    """
    import open_clip
    import timm

    names = list(only or (*TARGET_NAMES, CLIP_NAME))
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        raise ValueError(f"unknown toy-world models {unknown}; choose from {sorted(RECIPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    manifest.update(versions={"torch": torch.__version__, "timm": timm.__version__,
                              "open_clip": open_clip.__version__}, threads=THREADS,
                    target_preprocess={"mean": TARGET_MEAN, "std": TARGET_STD},
                    clip_preprocess={"mean": CLIP_MEAN, "std": CLIP_STD})
    pools, threads = PoolCache(log), torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for name in names:
            recipe = shortened(RECIPES[name], steps, eval_images)
            started = time.perf_counter()
            log(f"{name}: training ({recipe.steps} steps of {recipe.batch_size})")
            if name == CLIP_NAME:
                model, vocabulary, metrics = train_toy_clip(recipe, pools, log)
                record = {"kind": "open_clip", "config": clip_config(vocabulary), "vocabulary": {
                    "words": list(vocabulary.words), "context_length": vocabulary.context_length}}
            else:
                model, metrics = train_target(name, recipe, pools, out, log)
                record = {"kind": "timm", **TARGET_CONFIGS[name]}
            save_weights(model, out / f"{name}.safetensors")
            seconds = round(time.perf_counter() - started)
            manifest["models"][name] = {**record, "file": f"{name}.safetensors", "recipe": asdict(recipe),
                                        "metrics": metrics}  # no timings: a rerun writes the same bytes
            write_manifest(manifest, manifest_path)  # after each model: a killed run keeps the models it finished
            log(f"{name}: {json.dumps({k: v for k, v in metrics.items() if k not in ('prompts', 'probes')})} "
                f"({seconds} s)")
    finally:
        torch.set_num_threads(threads)
    return manifest
