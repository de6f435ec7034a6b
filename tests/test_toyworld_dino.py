"""The DINO-style objective: crops, the teacher's moving average, and a training step that learns."""
import dataclasses
import math

import pytest
import timm
import torch

from toyworld.dino import Dino, DinoOptions, koleo, random_crops, random_grayscale
from toyworld.models import target_preprocess
from toyworld.pools import as_float, image_pool

TINY = DinoOptions(prototypes=64, hidden=32, bottleneck=16, global_size=32, local_crops=2, local_size=16,
                   teacher_momentum=0.9)


def tiny_backbone():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                             depth=1, num_heads=2, num_classes=0, dynamic_img_size=True)


def test_crops_have_the_asked_size_and_are_reproducible_from_the_generator():
    images = torch.rand(5, 3, 32, 32)
    first = random_crops(images, 3, 16, (0.1, 0.4), torch.Generator().manual_seed(1))
    again = random_crops(images, 3, 16, (0.1, 0.4), torch.Generator().manual_seed(1))
    assert len(first) == 3 and all(crop.shape == (5, 3, 16, 16) for crop in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


def test_a_crop_shows_only_pixels_of_its_image():
    """Each crop resamples inside its own image: a constant image gives that constant."""
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 24, 24)
    for crop in random_crops(images, 2, 8, (0.2, 1.0), torch.Generator().manual_seed(0)):
        torch.testing.assert_close(crop, images[:, :, :8, :8])


def test_teacher_is_the_moving_average_of_the_student():
    dino = Dino(tiny_backbone(), TINY)
    teacher = [p.detach().clone() for p in dino.teacher.parameters()]
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(1.0)
    dino.update_teacher(1.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher, dino.teacher.parameters()))
    dino.update_teacher(0.75)
    for old, new, student in zip(teacher, dino.teacher.parameters(), dino.student.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * student)
    assert not any(p.requires_grad for p in dino.teacher.parameters())
    assert dino.teacher_momentum(0, 10) == TINY.teacher_momentum and dino.teacher_momentum(9, 10) == 1.0


def test_training_steps_lower_the_loss_on_a_tiny_run():
    """From a random start the outputs first spread over the prototypes (the centre pushes the loss up
    towards log K, the loss of a uniform output); training then brings it well below that, without
    collapsing the teacher onto one prototype."""
    images = as_float(image_pool(3, range(64), size=32).images)
    dino = Dino(tiny_backbone(), TINY, target_preprocess)
    optimiser = torch.optim.AdamW(dino.student.parameters(), lr=1e-3)
    generator, losses = torch.Generator().manual_seed(0), []
    for step in range(60):
        loss = dino.loss(images, generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        dino.update_teacher(dino.teacher_momentum(step, 60))
        losses.append(loss.item())
    peak, final = max(losses), sum(losses[-5:]) / 5
    assert peak > 0.7 * math.log(TINY.prototypes), losses
    assert final < 0.5 * peak, losses
    with torch.no_grad():
        assigned = (dino.teacher["head"](dino.teacher_backbone(target_preprocess(images))) - dino.center).argmax(-1)
    assert len(assigned.unique()) > 1, assigned                     # not one prototype for every image


def test_grayscale_views_keep_the_luma_and_only_some_views_turn_grey():
    images = torch.rand(200, 3, 4, 4)
    grey = random_grayscale(images, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    torch.testing.assert_close(grey[:, 0], 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])
    assert torch.equal(random_grayscale(images, 0.0, torch.Generator().manual_seed(0)), images)
    half = random_grayscale(images, 0.5, torch.Generator().manual_seed(0))
    turned = (half[:, 0] == half[:, 1]).flatten(1).all(1).float().mean()
    assert 0.35 < float(turned) < 0.65


def test_koleo_falls_as_the_batch_spreads_over_the_sphere():
    """KoLeo reads only directions, and is lowest when each row's nearest neighbour is far."""
    spread = torch.eye(4)                                     # orthogonal: neighbours at sqrt(2)
    bunched = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert koleo(spread) == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert koleo(3 * spread) == pytest.approx(float(koleo(spread)), abs=1e-6)
    assert koleo(bunched) > koleo(spread) + 3


def test_koleo_term_spreads_the_student_features():
    """With the KoLeo term on, a few steps leave the student's class tokens of a batch further apart."""
    images = as_float(image_pool(3, range(32), size=32).images)

    def nearest_distance(weight: float) -> float:
        dino = Dino(tiny_backbone(), dataclasses.replace(TINY, koleo_weight=weight), target_preprocess)
        optimiser = torch.optim.AdamW(dino.student.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            loss = dino.loss(images, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            return -float(koleo(dino.student["backbone"](target_preprocess(images))))

    assert nearest_distance(1.0) > nearest_distance(0.0)
