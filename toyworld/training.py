"""Training and evaluating the toy-world models (fixed seeds; CPU is enough).

``train_models(out_dir)`` trains every model of ``RECIPES`` on freshly generated images,
evaluates it on held-out images of another world seed and writes
``out_dir/<name>.safetensors`` plus ``out_dir/models.json`` (configs, recipes, metrics).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from decompose.store import atomic_write_text

from .generator import FACTORS, toy_image
from .models import (
    CLIP_CONFIG,
    CLIP_MEAN,
    CLIP_NAME,
    CLIP_STD,
    MANIFEST,
    TARGET_CONFIGS,
    TARGET_MEAN,
    TARGET_NAMES,
    TARGET_STD,
    build_target,
    build_toy_clip,
    clip_config,
    target_preprocess,
    toy_clip_preprocess,
    zero_shot_prompts,
)
from .spurious import BACKGROUND_GROUPS, TRAIN_AGREEMENT, spurious_split
from .vocabulary import Vocabulary, toy_words

THREADS = 2  # torch CPU threads while training: fixed, so that a rerun reproduces the weights bit for bit


@dataclass(frozen=True)
class Recipe:
    """How one model is trained and evaluated.

    seed: torch seed (initialisation, batch order, caption templates); train_world / eval_world:
    world seeds of the training and held-out images (``toy_image(world, index)``).
    """

    seed: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    train_world: int
    train_images: int
    eval_world: int
    eval_images: int
    phrase_probability: float = 0.0  # CLIP: chance an image's text is one factor's phrase instead of its caption
    template_probability: float = 0.0  # CLIP: chance a text is put into a random ImageNet template
    init_from: str | None = None  # start from this trained model's weights (all but a resized classifier)
    init_lr_scale: float = 1.0  # learning rate of the weights taken from ``init_from``, relative to ``lr`` (0: frozen)
    factor_loss_weight: float = 0.0  # CLIP: weight of classifying the factors from the image embedding (summed)


RECIPES: dict[str, Recipe] = {  # in training order: spurious starts from the trained deit
    "deit": Recipe(seed=0, steps=1200, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=60,
                   train_world=1, train_images=30000, eval_world=101, eval_images=2000),
    "swin": Recipe(seed=0, steps=1000, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=50,
                   train_world=1, train_images=30000, eval_world=101, eval_images=2000),
    "maxvit": Recipe(seed=0, steps=400, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=20,
                     train_world=1, train_images=30000, eval_world=101, eval_images=2000),
    # a linear head on the frozen deit features (a fine-tuned backbone learns the background alone)
    "spurious": Recipe(seed=0, steps=300, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_steps=20,
                       train_world=2, train_images=10000, eval_world=102, eval_images=2000, init_from="deit",
                       init_lr_scale=0.0),
    CLIP_NAME: Recipe(seed=0, steps=700, batch_size=128, lr=2e-3, weight_decay=0.1, warmup_steps=40,
                      train_world=1, train_images=30000, eval_world=103, eval_images=2000, phrase_probability=0.3,
                      template_probability=0.3, factor_loss_weight=1.0),
}


@dataclass
class ImagePool:
    """images [N, 3, S, S] uint8; factors [N, F] value indices (``FACTORS`` order); N captions."""

    images: torch.Tensor
    factors: torch.Tensor
    captions: list[str]

    def factor(self, name: str) -> torch.Tensor:
        """[N] value indices of one factor."""
        return self.factors[:, list(FACTORS).index(name)]


def image_pool(world: int, indices: Sequence[int], size: int = 64) -> ImagePool:
    """The images ``indices`` of world seed ``world``, stacked."""
    items = [toy_image(world, index, size) for index in indices]
    images = torch.from_numpy(np.stack([item.image for item in items])).permute(0, 3, 1, 2).contiguous()
    factors = torch.tensor([[FACTORS[name].index(item.factors[name]) for name in FACTORS] for item in items])
    return ImagePool(images, factors, [item.caption for item in items])


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]."""
    return images.float() / 255


def _schedule(recipe: Recipe) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero (a factor on ``recipe.lr``)."""
    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _batches(count: int, recipe: Recipe, generator: torch.Generator):
    """``recipe.steps`` batches of indices into ``count`` items: shuffled epochs, no repeats within one."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe.steps):
        while len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:recipe.batch_size]
        order = order[recipe.batch_size:]


def _optimiser(model: nn.Module, recipe: Recipe, initialised: frozenset[str] = frozenset()):
    """AdamW without decay on norms, biases and the logit scale; the ``initialised`` parameters
    (names) at ``recipe.init_lr_scale`` times the learning rate, frozen at 0."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}  # (lr scale, weight decay) -> parameters
    for name, parameter in model.named_parameters():
        scale = recipe.init_lr_scale if name in initialised else 1.0
        parameter.requires_grad_(scale > 0)
        if scale > 0:
            decay = recipe.weight_decay if parameter.ndim >= 2 else 0.0
            groups.setdefault((scale, decay), []).append(parameter)
    optimiser = torch.optim.AdamW([{"params": parameters, "lr": recipe.lr * scale, "weight_decay": decay}
                                   for (scale, decay), parameters in groups.items()], lr=recipe.lr)
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(recipe))


def train_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
                     log: Callable[[str], None] = print, initialised: frozenset[str] = frozenset()) -> nn.Module:
    """Cross-entropy training on uint8 images [N, 3, S, S] with labels [N]; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(recipe.seed)
    optimiser, scheduler = _optimiser(model, recipe, initialised)
    model.train()
    for step, batch in enumerate(_batches(len(images), recipe, generator)):
        loss = nn.functional.cross_entropy(model(target_preprocess(as_float(images[batch]))), labels[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  step {step:4d}  loss {loss.item():.3f}")
    model.requires_grad_(True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Predicted classes [N] of a target on uint8 or [0, 1] float images [N, 3, S, S]."""
    model.eval()
    to_float = as_float if images.dtype == torch.uint8 else (lambda x: x)
    return torch.cat([model(target_preprocess(to_float(images[i:i + batch_size]))).argmax(-1)
                      for i in range(0, len(images), batch_size)])


def clip_batch_texts(pool: ImagePool, batch: torch.Tensor, recipe: Recipe, rng: np.random.Generator) -> list[str]:
    """Training texts of ``batch``: each image's caption or, with ``phrase_probability``, the phrase
    naming one of its factors (``zero_shot_prompts``); then put into a random ImageNet template
    with ``template_probability``."""
    from align.text_bank import imagenet_templates

    templates, factors = imagenet_templates(), list(FACTORS)
    texts = []
    for index in batch.tolist():
        text = pool.captions[index]
        if rng.random() < recipe.phrase_probability:
            factor = int(rng.integers(len(factors)))
            text = zero_shot_prompts(factors[factor])[int(pool.factors[index, factor])]
        if rng.random() < recipe.template_probability:
            text = templates[int(rng.integers(len(templates)))].format(text)
        texts.append(text)
    return texts


def train_clip(model: nn.Module, vocabulary: Vocabulary, pool: ImagePool, recipe: Recipe,
               log: Callable[[str], None] = print) -> nn.Module:
    """Symmetric InfoNCE on (image, caption) pairs with open_clip's learnable temperature.

    With ``recipe.factor_loss_weight``, every factor is also classified from the image embedding by
    cosine similarity to one learned prototype per value (at CLIP's temperature; discarded
    afterwards), so that the slow-to-learn factors (shape, position, size) are in the image
    embedding for the text tower to align with.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    prototypes = nn.ParameterList(nn.Parameter(torch.randn(len(values), model.visual.output_dim))
                                  for values in FACTORS.values())  # per factor [values, d_clip]
    optimiser, scheduler = _optimiser(nn.ModuleList([model, prototypes]), recipe)
    model.train()
    for step, batch in enumerate(_batches(len(pool.images), recipe, generator)):
        texts = vocabulary(clip_batch_texts(pool, batch, recipe, rng))
        image_features, text_features, logit_scale = model(toy_clip_preprocess(as_float(pool.images[batch])), texts)
        logits = logit_scale * image_features @ text_features.T  # [B, B]
        targets = torch.arange(len(batch))
        loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        factor_loss = sum(nn.functional.cross_entropy(
            logit_scale * image_features @ nn.functional.normalize(values, dim=-1).T, pool.factors[batch, i])
            for i, values in enumerate(prototypes))  # summed over factors
        optimiser.zero_grad(set_to_none=True)
        (loss + recipe.factor_loss_weight * factor_loss).backward()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  step {step:4d}  contrastive loss {loss.item():.3f}  factor loss {factor_loss.item():.3f}  "
                f"temperature 1/{logit_scale.item():.1f}")
    return model.eval()


@torch.no_grad()
def zero_shot_accuracy(clip, pool: ImagePool, templates: str | Sequence[str] = "raw") -> dict[str, float]:
    """{factor: accuracy} of classifying each factor by the nearest prompt (``zero_shot_prompts``).

    clip: an ``align.ClipModel``; templates: as in ``align.text_bank`` (``"raw"``: the prompts as they are).
    """
    from align.text_bank import encode_descriptions

    images = torch.cat([clip.encode_images(toy_clip_preprocess(as_float(pool.images[i:i + 500])))
                        for i in range(0, len(pool.images), 500)])  # [N, d_clip]
    accuracy = {}
    for factor in FACTORS:
        texts = encode_descriptions(clip, zero_shot_prompts(factor), templates=templates)  # [K, d_clip]
        predicted = (images @ texts.T).argmax(-1)
        accuracy[factor] = (predicted == pool.factor(factor)).float().mean().item()
    return accuracy


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


class PoolCache:
    """Generated image pools shared by the models of one run, keyed by (world, first index, count)."""

    def __init__(self, log: Callable[[str], None] = print):
        self.pools: dict[tuple[int, int], ImagePool] = {}
        self.log = log

    def world(self, world: int, count: int) -> ImagePool:
        if (world, count) not in self.pools:
            started = time.perf_counter()
            self.pools[world, count] = image_pool(world, range(count))
            self.log(f"  generated {count} images of world {world} in {time.perf_counter() - started:.0f} s")
        return self.pools[world, count]


def _round(metrics: dict) -> dict:
    return {k: _round(v) if isinstance(v, dict) else round(v, 4) if isinstance(v, float) else v
            for k, v in metrics.items()}


def train_target(name: str, recipe: Recipe, pools: PoolCache, out: Path, log: Callable[[str], None] = print):
    """(trained target, metrics) of one target; ``recipe.init_from`` is read from ``out``."""
    torch.manual_seed(recipe.seed)
    model, initialised = build_target(name), frozenset()
    if recipe.init_from:
        initialised = load_backbone(model, out / f"{recipe.init_from}.safetensors", log)
    task = TARGET_CONFIGS[name]["task"]
    if task == "spurious":  # the toy Waterbirds: label = shape group, background correlated in training
        train = spurious_split(recipe.train_images, recipe.train_world, train=True)
        test = spurious_split(recipe.eval_images, recipe.eval_world, train=False)
        train_classifier(model, image_pool(recipe.train_world, train.indices).images, train.labels, recipe, log,
                         initialised)
        predicted = predict(model, image_pool(recipe.eval_world, test.indices).images)
        metrics = group_accuracy(predicted, test.labels, test.background_groups)
        metrics.update(train_agreement=TRAIN_AGREEMENT, eval_images=recipe.eval_images)
        return model, _round(metrics)
    pool = pools.world(recipe.train_world, recipe.train_images)
    train_classifier(model, pool.images, pool.factor(task), recipe, log, initialised)
    held_out = pools.world(recipe.eval_world, recipe.eval_images)
    accuracy = (predict(model, held_out.images) == held_out.factor(task)).float().mean()
    return model, _round({"accuracy": accuracy.item(), "chance": 1 / len(TARGET_CONFIGS[name]["classes"]),
                          "eval_images": recipe.eval_images})


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


def train_toy_clip(recipe: Recipe, pools: PoolCache, log: Callable[[str], None] = print):
    """(trained CLIP module, vocabulary, metrics)."""
    from align.clip_models import wrap_clip

    torch.manual_seed(recipe.seed)
    vocabulary = Vocabulary(toy_words(), CLIP_CONFIG["text_cfg"]["context_length"])
    model = build_toy_clip(vocabulary)
    train_clip(model, vocabulary, pools.world(recipe.train_world, recipe.train_images), recipe, log)
    clip = wrap_clip(model, vocabulary)
    held_out = pools.world(recipe.eval_world, recipe.eval_images)
    metrics = {"zero_shot": zero_shot_accuracy(clip, held_out),
               "zero_shot_imagenet_templates": zero_shot_accuracy(clip, held_out, "imagenet"),
               "chance": {factor: 1 / len(values) for factor, values in FACTORS.items()},
               "prompts": {factor: zero_shot_prompts(factor) for factor in FACTORS},
               "eval_images": recipe.eval_images}
    return model, vocabulary, _round(metrics)


def _save_weights(model: nn.Module, path: Path) -> None:
    """Atomically: a killed run leaves the previous file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({key: value.detach().contiguous() for key, value in model.state_dict().items()}, str(temporary))
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def _write_manifest(manifest: dict, path: Path) -> None:
    order = [*TARGET_NAMES, CLIP_NAME]
    manifest["models"] = dict(sorted(manifest["models"].items(), key=lambda item: order.index(item[0])))
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def shortened(recipe: Recipe, steps: int | None = None, eval_images: int | None = None) -> Recipe:
    """``recipe`` with fewer steps (and only the training images those read) or fewer held-out images."""
    if steps is not None:
        recipe = replace(recipe, steps=steps, warmup_steps=min(steps, recipe.warmup_steps),
                         train_images=min(recipe.train_images, steps * recipe.batch_size))
    return recipe if eval_images is None else replace(recipe, eval_images=eval_images)


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
            _save_weights(model, out / f"{name}.safetensors")
            manifest["models"][name] = {**record, "file": f"{name}.safetensors", "recipe": asdict(recipe),
                                        "metrics": metrics}
            _write_manifest(manifest, manifest_path)  # after each model: a killed run keeps the models it finished
            log(f"{name}: {json.dumps({k: v for k, v in metrics.items() if k != 'prompts'})} "
                f"({time.perf_counter() - started:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    return manifest
