"""How each toy-world model is trained: its ``Recipe``, and the schedule, batches and optimiser it drives."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from .dino import DinoOptions
from .pools import World


@dataclass(frozen=True)
class Recipe:
    """How one model is trained and evaluated.

    seed: torch seed (initialisation, batch order, crops, caption templates); train_world /
    eval_world: world seeds of the training and held-out images; world: the generator the
    training images come from (the held-out class accuracy reads ``eval_world`` of the same
    generator; the factor probes read ``eval_world`` of the factor world).
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
    world: World = World.FACTORS
    phrase_probability: float = 0.0  # CLIP: chance an image's text is one factor's phrase instead of its caption
    template_probability: float = 0.0  # CLIP: chance a text is put into a random ImageNet template
    init_from: str | None = None  # start from this trained model's weights (all but a resized classifier)
    init_lr_scale: float = 1.0  # learning rate of the weights taken from ``init_from``, relative to ``lr`` (0: frozen)
    factor_loss_weight: float = 0.0  # CLIP: weight of classifying the factors from the image embedding (summed)
    dino: DinoOptions | None = None  # the self-supervised objective's settings (DINO targets only)
    gradient_clip: float | None = None  # largest gradient norm (None: not clipped)


def shortened(recipe: Recipe, steps: int | None = None, eval_images: int | None = None) -> Recipe:
    """``recipe`` with fewer steps (and only the training images those read) or fewer held-out images."""
    if steps is not None:
        recipe = replace(recipe, steps=steps, warmup_steps=min(steps, recipe.warmup_steps),
                         train_images=min(recipe.train_images, steps * recipe.batch_size))
    return recipe if eval_images is None else replace(recipe, eval_images=eval_images)


def schedule(recipe: Recipe) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero (a factor on ``recipe.lr``)."""
    def factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def batches(count: int, recipe: Recipe, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``recipe.steps`` batches of indices into ``count`` items: shuffled epochs, no repeats within one."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(recipe.steps):
        while len(order) < recipe.batch_size:
            order = torch.cat([order, torch.randperm(count, generator=generator)])
        yield order[:recipe.batch_size]
        order = order[recipe.batch_size:]


def optimiser(model: nn.Module, recipe: Recipe, initialised: frozenset[str] = frozenset()):
    """(AdamW, its LambdaLR scheduler): no decay on norms, biases and the logit scale; the
    ``initialised`` parameters (names) at ``recipe.init_lr_scale`` times the learning rate, frozen at 0."""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}  # (lr scale, weight decay) -> parameters
    for name, parameter in model.named_parameters():
        scale = recipe.init_lr_scale if name in initialised else 1.0
        parameter.requires_grad_(scale > 0)
        if scale > 0:
            decay = recipe.weight_decay if parameter.ndim >= 2 else 0.0
            groups.setdefault((scale, decay), []).append(parameter)
    adamw = torch.optim.AdamW([{"params": parameters, "lr": recipe.lr * scale, "weight_decay": decay}
                               for (scale, decay), parameters in groups.items()], lr=recipe.lr)
    return adamw, torch.optim.lr_scheduler.LambdaLR(adamw, schedule(recipe))


def clip_gradients(parameters, recipe: Recipe) -> None:
    if recipe.gradient_clip is not None:
        nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], recipe.gradient_clip)
