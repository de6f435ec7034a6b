"""Applications recover planted truth: retrieval, token heatmaps and segmentation, ablation curves,
spurious-correlation removal. Plain tensors and labels only, as a toy world would pass them."""
import pytest
import torch
from PIL import Image

from align import (
    CompAlign,
    LabelledSplit,
    ablate,
    ablation_curve,
    average_precision,
    binarize,
    branch_grids,
    choose_retrieval,
    component_means,
    fit_linear_probe,
    grid_layout,
    group_accuracy,
    head_selector,
    image_retrieval_scores,
    layer_steps,
    line_plot,
    map_components_by_parent,
    ordered_steps,
    precision_at_k,
    property_scores,
    ranked,
    remove_spurious,
    segmentation_scores,
    shares_value,
    spurious_order,
    text_contributions,
    text_retrieval_scores,
    token_heatmaps,
    top_components,
    zero_shot_classifier,
)
from decompose import ComponentLabel, Decomposition

D = 8


def unit(vector):
    return torch.nn.functional.normalize(vector, dim=-1)


# --- retrieval -----------------------------------------------------------------------------

def planted_retrieval(generator, images=120):
    """Aligned [4, N, D]: component 0 carries the property (factor value v -> direction t_v), component 1
    a dominating nuisance (a random direction in another subspace, 5× larger), 2-3 small noise."""
    directions = torch.linalg.qr(torch.randn(D, D, generator=generator))[0].T          # orthonormal rows
    factor = torch.randint(0, 3, (images,), generator=generator)
    nuisance = unit(torch.randn(images, D - 3, generator=generator))                   # [N, 5]
    aligned = 0.05 * torch.randn(4, images, D, generator=generator)
    aligned[0] += directions[factor]
    aligned[1] += 5 * nuisance @ directions[3:]
    return aligned, factor, nuisance, directions


def test_text_retrieval_ranks_images_with_the_planted_factor_first():
    generator = torch.Generator().manual_seed(0)
    aligned, factor, _, directions = planted_retrieval(generator)
    text = directions[1]
    selected = top_components(property_scores(aligned, directions[:3]), 1)            # the property's component
    assert selected == [0]
    scores = text_retrieval_scores(aligned, text, selected)                            # [N]
    relevant = factor == 1
    count = int(relevant.sum())
    assert precision_at_k(scores, relevant, count) == 1.0
    assert set(ranked(scores, count).tolist()) == set(relevant.nonzero().flatten().tolist())
    # the full representation ranks by the same text too (the nuisance is orthogonal to it)
    assert precision_at_k(text_retrieval_scores(aligned, text), relevant, count) > 0.9
    many = text_retrieval_scores(aligned, directions[:3], selected)                    # [T, N]
    assert many.shape == (3, 120) and torch.allclose(many[1], scores)
    wrong = text_retrieval_scores(aligned, text, [2, 3])                               # noise components
    assert precision_at_k(wrong, relevant, count) < 0.7


def test_property_image_retrieval_beats_the_full_representation_when_a_nuisance_dominates():
    generator = torch.Generator().manual_seed(1)
    aligned, factor, nuisance, _ = planted_retrieval(generator)
    queries = list(range(20))
    relevant = shares_value(factor.tolist(), queries)                                  # [Q, N]
    relevant[torch.arange(20), torch.tensor(queries)] = False
    by_property = image_retrieval_scores(aligned, queries, [0])
    full = image_retrieval_scores(aligned, queries)
    assert torch.isinf(by_property[torch.arange(20), torch.tensor(queries)]).all()     # never itself
    precision_property = precision_at_k(by_property, relevant, 10)
    precision_full = precision_at_k(full, relevant, 10)
    assert precision_property == 1.0 and precision_full < 0.6                          # ~1/3: chance
    nearest = full.argmax(1)                                                           # full follows the nuisance
    assert (nuisance[queries] * nuisance[nearest]).sum(1).mean() > 0.8
    raw_like = torch.einsum("cnd,cde->cne", aligned, torch.linalg.qr(torch.randn(4, D, D, generator=generator))[0])
    assert precision_at_k(image_retrieval_scores(raw_like, queries, [0]), relevant, 10) == 1.0  # raw components too


def test_image_retrieval_centres_away_what_every_image_shares():
    """A factor that only changes the length along a shared direction is invisible to a raw
    cosine; after centring it is the main direction of variation."""
    generator = torch.Generator().manual_seed(2)
    values = torch.arange(60) % 2                                                      # the factor, 2 values
    shared = torch.randn(8, generator=generator)
    noise = 0.05 * torch.randn(60, 8, generator=generator)
    features = (shared * (1 + 0.5 * (2 * values[:, None] - 1)) + noise)[None]        # [1, 60, 8]
    queries = list(range(60))
    relevant = shares_value(values.tolist(), queries)
    relevant[torch.arange(60), torch.tensor(queries)] = False
    centred = precision_at_k(image_retrieval_scores(features, queries), relevant, 10)
    raw = precision_at_k(image_retrieval_scores(features, queries, centre=False), relevant, 10)
    assert centred > 0.95 and raw < 0.8                                                # chance: 29/59


def spread_property(generator, images=200):
    """Aligned [3, N, D]: a 4-valued property written as two bits, bit 0 along direction 0 in component 0
    and bit 1 along direction 1 in component 1, each component dominated by its own nuisance (a random
    unit vector in directions 2.., 3× larger); component 2 is nuisance only. No single component
    tells the value, and the nuisance dominates every sum of components."""
    directions = torch.linalg.qr(torch.randn(D, D, generator=generator))[0].T          # orthonormal rows
    value = torch.randint(0, 4, (images,), generator=generator)
    bits = torch.stack([value % 2, value // 2]).float() * 2 - 1                        # [2, N] of ±1
    nuisance = unit(torch.randn(3, images, D - 2, generator=generator)) @ directions[2:]  # [3, N, D]
    aligned = 3 * nuisance
    aligned[:2] += bits[:, :, None] * directions[:2, None, :]
    return aligned, value, directions[:2]


def test_subspace_retrieval_recovers_a_property_spread_over_components():
    generator = torch.Generator().manual_seed(3)
    aligned, value, subspace = spread_property(generator)
    queries = list(range(len(value)))
    relevant = shares_value(value.tolist(), queries)
    relevant[torch.arange(len(queries)), torch.tensor(queries)] = False

    def precision(selected, space=None):
        return precision_at_k(image_retrieval_scores(aligned, queries, selected, subspace=space), relevant, 10)

    assert precision([0, 1], subspace) == 1.0                                          # both bits, inside the span
    assert precision([0], subspace) < 0.7 and precision([1], subspace) < 0.7           # one bit: half the values
    assert precision(None) < 0.6 and precision([0, 1]) < 0.6                           # the nuisance wins outside it
    projector = subspace.T @ subspace                                                  # [D, D]
    assert torch.allclose(image_retrieval_scores(aligned, queries, [0, 1], subspace=subspace),
                          image_retrieval_scores(aligned @ projector, queries, [0, 1]), atol=1e-6)
    choice = choose_retrieval(aligned, [0, 1, 2], relevant, subspace)
    assert (choice.count, choice.projected, choice.precision) == (2, True, 1.0)       # fewest components that tie
    assert choose_retrieval(aligned, [0, 1, 2], relevant).precision < 0.6             # no subspace: no good choice


def test_choose_retrieval_keeps_one_component_when_it_carries_the_property():
    generator = torch.Generator().manual_seed(4)
    aligned, factor, _, directions = planted_retrieval(generator)
    queries = list(range(len(factor)))
    relevant = shares_value(factor.tolist(), queries)
    choice = choose_retrieval(aligned, [0, 2, 3, 1], relevant, directions[:3])        # nuisance ranked last
    assert (choice.count, choice.projected, choice.precision) == (1, False, 1.0)      # ties: the whole space first
    with pytest.raises(ValueError, match="no component"):
        choose_retrieval(aligned, [], relevant)


def test_precision_at_k_counts_relevant_items_in_the_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.1, 0.2, 0.3, 0.4]])
    relevant = torch.tensor([[True, False, False, True], [True, True, False, False]])
    assert precision_at_k(scores, relevant, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert precision_at_k(scores, relevant, 4) == pytest.approx(0.5)


# --- heatmaps and segmentation ---------------------------------------------------------------

def token_labels(layers=2, heads=2, grid=8):
    """Token-level labels of a class-token model: embeddings, per (layer, head) a class token and a grid."""
    labels = [ComponentLabel("patch_embed.proj", "embedding"), ComponentLabel("cls_token", "constant")]
    for layer in range(layers):
        for head in range(heads):
            labels.append(ComponentLabel(f"blocks.{layer}.attn", "attention", layer, head, 0, position="cls_token"))
            labels += [ComponentLabel(f"blocks.{layer}.attn", "attention", layer, head, 1 + r * grid + c,
                                      position=(r, c)) for r in range(grid) for c in range(grid)]
        labels.append(ComponentLabel(f"blocks.{layer}.mlp", "branch", layer))
    return labels


def head_aligner(labels, generator):
    """Head-level CompAlign with square orthogonal maps (a = c W, c = a Wᵀ)."""
    head_labels = list(dict.fromkeys(ComponentLabel(l.name, l.kind, l.layer, l.head) for l in labels))
    weights = torch.stack([torch.linalg.qr(torch.randn(D, D, generator=generator))[0] for _ in head_labels])
    return CompAlign(head_labels, D, D, weights=weights)


def test_planted_token_lights_up_its_grid_cell_through_its_heads_map():
    generator = torch.Generator().manual_seed(0)
    labels = token_labels()
    aligner = head_aligner(labels, generator)
    text = unit(torch.randn(D, generator=generator))
    components = 0.01 * torch.randn(len(labels), 3, D, generator=generator)           # [C, B, D]
    planted = next(i for i, l in enumerate(labels) if l.layer == 1 and l.head == 0 and l.position == (5, 2))
    head_map = aligner.weights[aligner.keys.index("blocks.1.attn.h0")]                 # [D, D]
    components[planted, 1] = 3 * head_map @ text                                       # its map sends it to 3 t
    contributions = text_contributions(aligner, components, labels, text)             # [C, B]
    mapped = map_components_by_parent(aligner, components, labels)                     # [C, B, D]
    torch.testing.assert_close(contributions, mapped @ text, atol=1e-5, rtol=1e-5)
    assert float(contributions[planted, 1]) == pytest.approx(3.0, abs=1e-4)
    grids = branch_grids(contributions, labels, head_selector(["blocks.1.attn.h0"]))
    assert list(grids) == ["blocks.1.attn"] and grids["blocks.1.attn"].shape == (3, 8, 8)
    cell = int(grids["blocks.1.attn"][1].flatten().argmax())
    assert divmod(cell, 8) == (5, 2)
    assert grids["blocks.1.attn"][[0, 2]].abs().max() < 0.5                            # other images stay dark
    heatmaps = token_heatmaps(contributions, labels, (32, 32))                          # every head, both layers
    peak = int(heatmaps[1].flatten().argmax())
    assert divmod(peak, 32)[0] // 4 == 5 and divmod(peak, 32)[1] // 4 == 2
    other_head = token_heatmaps(contributions, labels, (32, 32), head_selector(["blocks.1.attn.h1"]))
    assert other_head[1].abs().max() < 0.5


def two_stage_labels():
    """Token labels of a pooled two-stage model: stage 0 on an 8×8 grid in four 4×4 windows (sources
    numbered ``window * 16 + key``, as windowed attention numbers them), stage 1 on a 4×4 grid (one window)."""
    labels = [ComponentLabel("patch_embed.proj", "embedding")]
    for window in range(4):
        for key in range(16):
            row, col = 4 * (window // 2) + key // 4, 4 * (window % 2) + key % 4
            labels.append(ComponentLabel("stages.0.attn", "attention", 0, 0, window * 16 + key, position=(row, col)))
    labels += [ComponentLabel("stages.1.attn", "attention", 1, 0, key, position=divmod(key, 4)) for key in range(16)]
    return labels


def test_each_stage_grid_covers_the_whole_image():
    """A coarse stage's token lights up its own image region (4× larger cells), a fine stage's token its
    smaller one, and a stage whose every token contributes 1 adds a flat 1 over the whole image."""
    labels = two_stage_labels()
    contributions = torch.zeros(len(labels), 3)
    coarse = labels.index(ComponentLabel("stages.1.attn", "attention", 1, 0, 6, position=(1, 2)))
    fine = next(i for i, l in enumerate(labels) if l.name == "stages.0.attn" and l.position == (5, 2))
    contributions[coarse, 0] = 1.0
    contributions[fine, 1] = 1.0
    contributions[[i for i, l in enumerate(labels) if l.name == "stages.1.attn"], 2] = 1.0
    heatmaps = token_heatmaps(contributions, labels, (64, 64))                          # [3, 64, 64]
    assert divmod(int(heatmaps[0].flatten().argmax()), 64)[0] // 16 == 1                # 16-pixel cells
    assert divmod(int(heatmaps[0].flatten().argmax()), 64)[1] // 16 == 2
    assert heatmaps[0, 16:32, 32:48].sum() > 0.5 * heatmaps[0].sum()
    assert divmod(int(heatmaps[1].flatten().argmax()), 64)[0] // 8 == 5                 # 8-pixel cells
    assert divmod(int(heatmaps[1].flatten().argmax()), 64)[1] // 8 == 2
    torch.testing.assert_close(heatmaps[2], torch.ones(64, 64))
    grids = branch_grids(contributions, labels)
    assert grids["stages.0.attn"].shape == (3, 8, 8) and grids["stages.1.attn"].shape == (3, 4, 4)
    assert grids["stages.0.attn"][1, 5, 2] == 1.0 and grids["stages.1.attn"][0, 1, 2] == 1.0


def test_segmentation_recovers_a_planted_mask():
    labels = token_labels(layers=1, heads=1)
    grid_mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    grid_mask[0, 2:4, 5:7] = True                                                      # a 2×2-cell object
    grid_mask[1, 6, 1] = True                                                          # a one-cell object
    contributions = torch.zeros(len(labels), 2)
    for row, label in enumerate(labels):
        if isinstance(label.position, tuple):
            r, c = label.position
            contributions[row] = torch.where(grid_mask[:, r, c], 1.0, -1.0)             # object along t, rest against
    heatmaps = token_heatmaps(contributions, labels, (16, 16))
    pixel_mask = grid_mask.repeat_interleave(2, 1).repeat_interleave(2, 2)             # [2, 16, 16]
    assert torch.equal(binarize(heatmaps), pixel_mask)
    scores = segmentation_scores(heatmaps, pixel_mask)
    assert scores.foreground_iou == 1.0 and scores.pixel_accuracy == 1.0 and scores.mean_average_precision == 1.0
    shifted = segmentation_scores(heatmaps.roll(4, dims=2), pixel_mask)
    assert shifted.foreground_iou < 0.5 and shifted.mean_average_precision < 0.5


def test_average_precision_and_grid_layout():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(
        (1 + 2 / 3) / 2)
    assert average_precision(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([1, 0, 0])) == pytest.approx(1 / 3)
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    grid = grid_layout(values, ["cls_token", (1, 0), (0, 1), "padding"])
    assert torch.equal(grid, torch.tensor([[[0.0, 3.0], [2.0, 0.0]]]))
    with pytest.raises(ValueError, match="grid position"):
        grid_layout(values, ["cls_token"] * 4)


# --- ablation ------------------------------------------------------------------------------

def layered_classification(generator, images=200, layers=4):
    """Components [layers + 1, N, 2]: layer l adds class evidence a_l (2y − 1) on axis 0; the last
    component (no layer) is image noise. The classifier reads the sign of axis 0."""
    targets = torch.arange(images) % 2                                                 # balanced classes
    sign = (2 * targets - 1).float()
    components = torch.zeros(layers + 1, images, 2)
    for layer in range(layers):
        components[layer, :, 0] = 0.5 * sign
    components[layers, :, 0] = torch.randn(images, generator=generator)
    labels = [ComponentLabel(f"blocks.{l}.mlp", "branch", l) for l in range(layers)] + [
        ComponentLabel("noise", "constant")]
    classifier = lambda r: torch.stack([-r[:, 0], r[:, 0]], dim=1)
    return components, labels, targets, classifier


def test_ablation_curve_is_monotone_and_ends_at_chance(tmp_path):
    generator = torch.Generator().manual_seed(0)
    components, labels, targets, classifier = layered_classification(generator)
    curve = ablation_curve(components, layer_steps(labels), classifier, targets, labels=labels)
    assert curve.steps == ["none", "layer 0", "layer 1", "layer 2", "layer 3"] and curve.ablated == [0, 1, 2, 3, 4]
    assert all(a >= b for a, b in zip(curve.accuracy, curve.accuracy[1:]))
    assert curve.accuracy[0] > 0.9 and curve.accuracy[-1] < 0.65
    reverse = ablation_curve(components, layer_steps(labels, last_first=True), classifier, targets)
    assert reverse.steps[1] == "layer 3" and reverse.accuracy[-1] == curve.accuracy[-1]
    by_order = ablation_curve(components, ordered_steps([3, 1], labels), classifier, targets, labels=labels)
    assert by_order.steps == ["none", "blocks.3.mlp", "blocks.1.mlp"]
    png = line_plot(curve.ablated, {"accuracy": curve.accuracy}, tmp_path / "curve.png", "ablated")
    with Image.open(png) as image:
        assert image.size == (640, 420)


def test_ablate_replaces_components_by_their_reference_means():
    generator = torch.Generator().manual_seed(0)
    components = torch.randn(5, 6, 3, generator=generator)
    labels = [ComponentLabel(f"c{i}", "branch", i) for i in range(5)]
    dec = Decomposition(components, labels, components.sum(0), "branch")
    reference = component_means(torch.randn(5, 10, 3, generator=generator))
    expected = components.sum(0) - components[[1, 3]].sum(0) + reference[[1, 3]].sum(0)
    torch.testing.assert_close(ablate(dec, ["c1", "c3"], reference=reference), expected)
    torch.testing.assert_close(ablate(components, [1, 3], reference=reference), expected)
    torch.testing.assert_close(ablate(components, [1, 3], mode="zero"), components[[0, 2, 4]].sum(0))
    everything = ablate(components, range(5))                                          # own mean by default
    torch.testing.assert_close(everything, components.sum(0).mean(0).expand(6, 3))
    with pytest.raises(ValueError, match="unknown components"):
        ablate(dec, ["c9"], reference=reference)


# --- spurious correlations -------------------------------------------------------------------

def waterbirds(generator, images, spurious_agreement):
    """Components [4, N, D]: 0 core (class y along e0), 1 spurious (background s along e1, 3× larger),
    2-3 tiny noise. ``spurious_agreement``: P(s == y)."""
    targets = torch.randint(0, 2, (images,), generator=generator)
    agree = torch.rand(images, generator=generator) < spurious_agreement
    background = torch.where(agree, targets, 1 - targets)
    components = 0.01 * torch.randn(4, images, D, generator=generator)
    components[0, :, 0] += (2 * targets - 1) * (1 + 0.3 * torch.rand(images, generator=generator))
    components[1, :, 1] += (2 * background - 1) * 3.0
    groups = [f"y{y}-s{s}" for y, s in zip(targets.tolist(), background.tolist())]
    return components, targets, groups


def test_mean_ablating_the_spurious_component_raises_worst_group_accuracy():
    generator = torch.Generator().manual_seed(0)
    # a head that learned to read background and class together (as on a biased training set)
    classifier = lambda r: torch.stack([-(r[:, 0] + r[:, 1]), r[:, 0] + r[:, 1]], dim=1)
    validation = LabelledSplit(*waterbirds(generator, 400, 0.5))
    test = LabelledSplit(*waterbirds(generator, 400, 0.5))
    e0, e1 = torch.eye(D)[0:1], torch.eye(D)[1:2]                                      # core / spurious texts
    aligned = validation.components                                                    # identity CompAlign
    order = spurious_order(property_scores(aligned, e1), property_scores(aligned, e0))
    assert order[0] == 1 and order[-1] == 0
    result = remove_spurious(order, classifier, validation, test, max_k=4)
    assert result.k == 1 and result.ablated == [1]
    assert result.before.worst < 0.1 and result.after.worst > 0.95
    assert result.after.average > result.before.average + 0.4
    assert len(result.validation) == 5 and result.validation[1].worst > 0.95
    assert result.validation[4].worst < 0.9                                           # ablating the core too hurts
    # k comes from validation alone: another test split changes nothing about it
    shuffled = LabelledSplit(test.components, test.targets[torch.randperm(400, generator=generator)], test.groups)
    again = remove_spurious(order, classifier, validation, shuffled, max_k=4)
    assert again.k == result.k and [v.worst for v in again.validation] == [v.worst for v in result.validation]
    assert again.after.worst < 0.8                                                     # the test labels are noise


def test_group_accuracy_and_classifiers():
    result = group_accuracy(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]), ["a", "a", "b", "b"])
    assert result.per_group == {"a": 0.5, "b": 1.0} and result.worst == 0.5 and result.average == 0.75
    generator = torch.Generator().manual_seed(0)
    classes = unit(torch.randn(3, D, generator=generator))
    zero_shot = zero_shot_classifier(classes)
    assert zero_shot(classes * 2).argmax(1).tolist() == [0, 1, 2]
    features = torch.randn(300, 4, generator=generator)
    targets = (features[:, 2] > 0).long()
    probe = fit_linear_probe(features, targets)
    assert (probe(features).argmax(1) == targets).double().mean() > 0.97
