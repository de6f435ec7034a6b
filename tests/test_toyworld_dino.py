"""The DINO-style objective: crops, the teacher's moving average, and a training step that learns."""
import copy
import dataclasses
import math

import pytest
import timm
import torch

from toyworld.dino import (
    Centering,
    Dino,
    DinoOptions,
    box_in_view,
    crop,
    info_nce,
    koleo,
    random_blur,
    random_boxes,
    random_channel_permutation,
    random_crops,
    random_grayscale,
    random_patch_masks,
    restyle_objects,
    sincos_position_init,
    swap_backgrounds,
)
from toyworld.models import target_preprocess
from toyworld.pools import as_float, background_textures, image_pool

# DINO's own recipe (the former defaults)
TINY = DinoOptions(prototypes=64, hidden=32, bottleneck=16, global_size=32, local_crops=2, local_size=16,
                   teacher_momentum=0.9, global_scale=(0.5, 1.0), flip_probability=0.5, centering=Centering.MOMENTUM,
                   sincos_positions=False, region_weight=0.0, background_swap_probability=0.0,
                   restyle_probability=0.0, contrastive_weight=0.0)
SHIPPED_TINY = DinoOptions(prototypes=64, hidden=32, bottleneck=16, global_size=32, region_size=16)  # the defaults


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
    for view in random_crops(images, 2, 8, (0.2, 1.0), torch.Generator().manual_seed(0)):
        torch.testing.assert_close(view, images[:, :, :8, :8])


def test_without_flips_a_crop_keeps_left_and_right_and_with_them_swaps_them():
    """A left-to-right ramp stays increasing in every crop when flips are off, decreasing when always on."""
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(6, 3, 32, 32)
    for probability, sign in ((0.0, 1), (1.0, -1)):
        for view in random_crops(ramp, 3, 16, (0.3, 1.0), torch.Generator().manual_seed(2), probability):
            assert (sign * view.diff(dim=-1) > 0).all()


def test_channel_permutation_reorders_the_channels_of_the_chosen_images_only():
    images = torch.rand(300, 3, 4, 4)
    always = random_channel_permutation(images, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(always.sort(1).values, images.sort(1).values)   # the same values per pixel
    assert not (always == images).flatten(1).all(1).any()                      # never the identity
    orders = {tuple(images[i, :, 0, 0].tolist().index(v) for v in always[i, :, 0, 0].tolist()) for i in range(300)}
    assert len(orders) == 5
    assert torch.equal(random_channel_permutation(images, 0.0, torch.Generator().manual_seed(0)), images)
    half = random_channel_permutation(images, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(half, random_channel_permutation(images, 0.5, torch.Generator().manual_seed(0)))
    assert 0.35 < float((half != images).flatten(1).any(1).float().mean()) < 0.65


def test_blur_keeps_constants_and_the_mean_and_smooths_only_the_chosen_images():
    constant = torch.full((3, 3, 16, 16), 0.3)
    torch.testing.assert_close(random_blur(constant, 1.0, (0.5, 2.0), torch.Generator().manual_seed(0)), constant)
    noise = torch.rand(200, 3, 16, 16)
    blurred = random_blur(noise, 0.5, (1.0, 2.0), torch.Generator().manual_seed(0))
    changed = (blurred != noise).flatten(1).any(1)
    assert 0.35 < float(changed.float().mean()) < 0.65
    assert (blurred[changed].std((1, 2, 3)) < 0.6 * noise[changed].std((1, 2, 3))).all()  # smoothed
    torch.testing.assert_close(blurred.mean(), noise.mean(), atol=2e-3, rtol=0)
    assert torch.equal(blurred, random_blur(noise, 0.5, (1.0, 2.0), torch.Generator().manual_seed(0)))


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


def tiny_run(options: DinoOptions, steps: int = 60):
    """(losses, trained Dino, its images in [0, 1]): ``steps`` AdamW steps on 64 tiny images."""
    pool = image_pool(3, range(64), size=32)
    images = as_float(pool.images)
    dino = Dino(tiny_backbone(), options, target_preprocess, background_textures(32))
    optimiser = torch.optim.AdamW(dino.student.parameters(), lr=1e-3)
    generator, losses = torch.Generator().manual_seed(0), []
    for step in range(steps):
        loss = dino.loss(images, generator, pool.masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        dino.update_teacher(dino.teacher_momentum(step, steps))
        losses.append(loss.item())
    return losses, dino, images


def test_training_steps_lower_the_loss_on_a_tiny_run():
    """From a random start the outputs first spread over the prototypes (the centre pushes the loss up
    towards log K, the loss of a uniform output); training then brings it well below that, without
    collapsing the teacher onto one prototype."""
    losses, dino, images = tiny_run(TINY)
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


def test_patch_masks_cover_the_asked_fraction_of_the_chosen_images_and_are_reproducible():
    masks = random_patch_masks(2, 400, 16, 0.5, (0.25, 0.5), torch.Generator().manual_seed(0))
    assert masks.shape == (2, 400, 16) and masks.dtype == torch.bool
    counts = masks.sum(-1)
    chosen = counts > 0
    assert 0.4 < float(chosen.float().mean()) < 0.6
    assert counts[chosen].min() >= 4 and counts[chosen].max() <= 8
    assert torch.equal(masks, random_patch_masks(2, 400, 16, 0.5, (0.25, 0.5), torch.Generator().manual_seed(0)))
    assert not random_patch_masks(2, 10, 16, 0.0, (0.25, 0.5), torch.Generator().manual_seed(0)).any()


def test_masking_changes_only_the_student_and_no_mask_leaves_the_backbone_as_it_is():
    """The mask token enters the student's masked patches only: with no patch masked (and in the teacher)
    the tokens are the backbone's own; a masked patch's embedding is the learnt mask token."""
    dino = Dino(tiny_backbone(), dataclasses.replace(TINY, ibot_weight=1.0))
    with torch.no_grad():
        dino.student["mask_token"].embedding.normal_()
    view = torch.rand(3, 3, 32, 32)
    backbone = dino.student["backbone"]
    unmasked = torch.zeros(3, 16, dtype=torch.bool)
    torch.testing.assert_close(dino._student_tokens(view, unmasked), backbone.forward_features(view))
    torch.testing.assert_close(backbone.forward_head(backbone.forward_features(view)), backbone(view))
    masked = unmasked.clone()
    masked[0, 5] = True
    tokens = dino._student_tokens(view, masked)
    torch.testing.assert_close(tokens[1:], backbone.forward_features(view)[1:])
    assert not torch.allclose(tokens[0], backbone.forward_features(view)[0])
    assert "mask_token" not in dict(dino.teacher_backbone.named_parameters())


def test_ibot_term_falls_on_a_tiny_run():
    """The student's masked patches learn to predict the teacher's patch tokens of the unmasked view:
    after the centre's first push towards log K (as the DINO term's), the iBOT term falls well below its peak."""
    images = as_float(image_pool(3, range(64), size=32).images)
    options = dataclasses.replace(TINY, ibot_weight=1.0, mask_probability=1.0)
    dino = Dino(tiny_backbone(), options, target_preprocess)
    optimiser = torch.optim.AdamW(dino.student.parameters(), lr=1e-3)
    generator, ibot = torch.Generator().manual_seed(0), []
    for step in range(100):
        terms = dino.terms(images, generator)
        loss = terms["dino"] + terms["koleo"] * options.koleo_weight + terms["ibot"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        dino.update_teacher(dino.teacher_momentum(step, 100))
        ibot.append(terms["ibot"].item())
    assert set(terms) == {"dino", "koleo", "ibot"}
    peak, final = max(ibot), sum(ibot[-5:]) / 5
    assert peak > 0.7 * math.log(TINY.prototypes), ibot
    assert final < 0.6 * peak, ibot


def test_box_in_view_says_where_a_crop_lies_in_another_crop():
    """Cropping the view at the box ``box_in_view`` gives is cropping the image at the box: exact on an
    image linear in x and y (bilinear resampling keeps it), with and without flips."""
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    images = torch.stack([cols, rows, 0.3 * cols + 0.7 * rows]).expand(5, 3, 48, 48).contiguous()
    for flips in (0.0, 0.5):
        generator = torch.Generator().manual_seed(3)
        views = random_boxes(1, 5, (0.6, 1.0), generator, flips)[0]                   # [B, 2, 3]
        boxes = random_boxes(1, 5, (0.05, 0.1), generator, flips)[0]
        half = lambda theta: theta[:, [0, 1], [0, 1]].abs()                            # [B, 2] half-sides
        inside = ((views[:, :, 2] - boxes[:, :, 2]).abs() + half(boxes) <= half(views)).all(-1)
        where = box_in_view(boxes, views)                                             # [B, 5]
        theta = torch.zeros(5, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = where[:, 2] * where[:, 4], where[:, 0]
        theta[:, 1, 1], theta[:, 1, 2] = where[:, 3], where[:, 1]
        view = crop(images, views[None], 32)[0]
        twice, direct = crop(view, theta[None], 8)[0], crop(images, boxes[None], 8)[0]
        torch.testing.assert_close(twice[inside], direct[inside], atol=1e-4, rtol=0)
        assert inside.sum() >= 2


def test_region_term_trains_the_student_and_its_predictor_only():
    options = dataclasses.replace(TINY, region_weight=1.0, region_crops=3, region_size=16, local_crops=0)
    dino = Dino(tiny_backbone(), options, target_preprocess)
    images = as_float(image_pool(3, range(8), size=32).images)
    terms = dino.terms(images, torch.Generator().manual_seed(0))
    assert set(terms) == {"dino", "koleo", "region"} and torch.isfinite(terms["region"])
    terms["region"].backward()
    assert dino.student["predictor"][0].weight.grad.abs().sum() > 0
    assert dino.student["backbone"].cls_token.grad.abs().sum() > 0                 # through the class token
    assert all(p.grad is None for p in dino.teacher.parameters())
    assert float(dino.region_center.abs().sum()) > 0


def test_only_momentum_centering_moves_the_centres():
    images = as_float(image_pool(3, range(8), size=32).images)
    for centering, moved in ((Centering.MOMENTUM, True), (Centering.SINKHORN, False)):
        options = dataclasses.replace(TINY, centering=centering, region_weight=1.0, region_crops=2, region_size=16,
                                      ibot_weight=1.0, mask_probability=1.0)
        dino = Dino(tiny_backbone(), options, target_preprocess)
        dino.terms(images, torch.Generator().manual_seed(0))
        for center in (dino.center, dino.patch_center, dino.region_center):
            assert bool(center.abs().sum() > 0) is moved, (centering, center)


def test_sincos_positions_start_the_patch_embeddings_at_distinct_sin_cos_rows_and_stay_trainable():
    backbone = tiny_backbone()
    dino = Dino(backbone, dataclasses.replace(TINY, sincos_positions=True))
    table = dino.student["backbone"].pos_embed                                   # [1, 1 + 16, 32]
    assert torch.equal(table[0, 0], torch.zeros(32)) and table.requires_grad
    rows = table[0, 1:]
    assert rows.abs().max() <= 1 and len({tuple(r.tolist()) for r in rows}) == 16   # one row per patch
    torch.testing.assert_close(dino.teacher_backbone.pos_embed, table)          # the teacher starts the same


def test_sincos_positions_refuse_a_backbone_without_a_position_table():
    backbone = tiny_backbone()
    backbone.pos_embed = None
    with pytest.raises(ValueError, match="sincos_positions"):
        sincos_position_init(backbone)


def test_the_shipped_objective_learns_on_a_tiny_run_without_collapsing():
    """The defaults (background swaps, object restyles, Sinkhorn-Knopp targets, the region and contrastive
    terms, sin-cos positions): on one fixed batch of views every term falls (DINO, KoLeo and region terms
    well below their start; the contrastive one from above log B towards it), and the teacher does not put
    every image on one prototype."""
    pool = image_pool(3, range(64), size=32)

    def terms(dino: Dino) -> dict[str, float]:
        with torch.no_grad():
            measured = dino.terms(as_float(pool.images), torch.Generator().manual_seed(1), pool.masks)
        return {name: term.item() for name, term in measured.items()}

    before = terms(Dino(tiny_backbone(), SHIPPED_TINY, target_preprocess, background_textures(32)))
    losses, dino, images = tiny_run(SHIPPED_TINY)
    after = terms(dino)
    assert set(after) == {"dino", "koleo", "region", "contrastive"}, after
    assert all(after[name] < 0.8 * before[name] for name in ("dino", "koleo", "region")), (before, after)
    assert after["contrastive"] < before["contrastive"] - 0.5, (before, after)
    assert sum(losses[-5:]) / 5 < 0.8 * max(losses[:5]), losses
    with torch.no_grad():
        assigned = dino.teacher["head"](dino.teacher_backbone(target_preprocess(images))).argmax(-1)
    assert len(assigned.unique()) > 1, assigned                     # not one prototype for every image


def test_background_swaps_keep_the_object_and_take_every_other_pixel_from_one_texture():
    pool = image_pool(4, range(6), size=32)
    images, backgrounds = as_float(pool.images), background_textures(32)
    inside = pool.masks.unsqueeze(1).expand_as(images)
    assert torch.equal(swap_backgrounds(images, pool.masks, backgrounds, 0.0, torch.Generator()), images)
    swapped = swap_backgrounds(images, pool.masks, backgrounds, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(swapped[inside], images[inside])
    for image, mask in zip(swapped, pool.masks):
        matches = [bool((image[:, ~mask] == texture[:, ~mask]).all()) for texture in backgrounds]
        assert sum(matches) >= 1, "the background is not one of the textures"
    assert not torch.equal(swapped, images)
    half = [swap_backgrounds(images, pool.masks, backgrounds, 0.5, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*half)


def test_background_swaps_name_what_they_need():
    with pytest.raises(ValueError, match="needs backgrounds"):
        Dino(tiny_backbone(), SHIPPED_TINY, target_preprocess)
    dino = Dino(tiny_backbone(), SHIPPED_TINY, target_preprocess, background_textures(32))
    with pytest.raises(ValueError, match="need the objects' masks"):
        dino.loss(torch.rand(4, 3, 32, 32), torch.Generator())


def test_object_restyles_keep_the_background_and_fill_each_chosen_object_with_one_colour():
    pool = image_pool(4, range(40), size=32)
    images = as_float(pool.images)
    outside = ~pool.masks.unsqueeze(1).expand_as(images)
    assert torch.equal(restyle_objects(images, pool.masks, 0.0, torch.Generator()), images)
    restyled = restyle_objects(images, pool.masks, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(restyled[outside], images[outside])
    for image, original, mask in zip(restyled, images, pool.masks):
        fill = image[:, mask]                                                 # [3, pixels of the object]
        assert torch.equal(fill, fill[:, :1].expand_as(fill)), "the object is not one flat colour"
        assert not torch.equal(fill, original[:, mask])
    half = restyle_objects(images, pool.masks, 0.5, torch.Generator().manual_seed(1))
    changed = (half != images).flatten(1).any(1).float().mean()
    assert 0.25 < float(changed) < 0.75


def test_info_nce_is_low_when_each_query_finds_its_own_key_and_log_batch_when_none_can():
    keys = torch.eye(8)
    assert float(info_nce(3 * keys, keys, 0.1)) < 1e-3                    # directions only; each row's own key
    assert float(info_nce(keys, keys[torch.arange(8).roll(1)], 0.1)) > 5  # every query nearest a wrong key
    same = torch.ones(8, 4)
    assert float(info_nce(same, same, 0.2)) == pytest.approx(math.log(8), abs=1e-5)


def test_contrastive_term_trains_the_student_only_and_falls_on_a_fixed_batch():
    """Descending the contrastive term alone on one batch's views (restyled objects on) lowers it: the
    student's class token of each view moves towards the teacher's of the image's other view."""
    options = dataclasses.replace(SHIPPED_TINY, restyle_probability=0.5, contrastive_weight=1.0)
    pool = image_pool(3, range(32), size=32)
    dino = Dino(tiny_backbone(), options, target_preprocess, background_textures(32))
    teacher = copy.deepcopy(dino.teacher.state_dict())
    optimiser = torch.optim.AdamW(dino.student.parameters(), lr=1e-3)
    values = []
    for _ in range(30):
        term = dino.terms(as_float(pool.images), torch.Generator().manual_seed(0), pool.masks)["contrastive"]
        optimiser.zero_grad()
        term.backward()
        optimiser.step()
        values.append(term.item())
    assert values[-1] < 0.8 * values[0], values
    assert all(torch.equal(value, teacher[name]) for name, value in dino.teacher.state_dict().items())
