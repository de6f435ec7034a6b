"""Training and evaluating the toy CLIP: contrastive on captions, with factor prototypes on the image side."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .generator import FACTORS
from .manifest import rounded
from .models import CLIP_CONFIG, build_toy_clip, toy_clip_preprocess, zero_shot_prompts
from .pools import ImagePool, PoolCache, as_float
from .recipes import Recipe, batches, clip_gradients, optimiser
from .vocabulary import Vocabulary, toy_words


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
    adamw, scheduler = optimiser(nn.ModuleList([model, prototypes]), recipe)
    model.train()
    for step, batch in enumerate(batches(len(pool.images), recipe, generator)):
        texts = vocabulary(clip_batch_texts(pool, batch, recipe, rng))
        image_features, text_features, logit_scale = model(toy_clip_preprocess(as_float(pool.images[batch])), texts)
        logits = logit_scale * image_features @ text_features.T  # [B, B]
        targets = torch.arange(len(batch))
        loss = (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.T, targets)) / 2
        factor_loss = sum(nn.functional.cross_entropy(
            logit_scale * image_features @ nn.functional.normalize(values, dim=-1).T, pool.factors[batch, i])
            for i, values in enumerate(prototypes))  # summed over factors
        adamw.zero_grad(set_to_none=True)
        (loss + recipe.factor_loss_weight * factor_loss).backward()
        clip_gradients(model.parameters(), recipe)
        adamw.step()
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
    return model, vocabulary, rounded(metrics)


