"""The applications run on the toy world, each scored against the generator's ground truth.

* property retrieval: does summing a factor's top components retrieve images sharing that
  factor better than the full representation?
* heatmaps: do token contributions along the object's text land on the object's mask?
* spurious split: does mean-ablating background components raise worst-group accuracy?
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align import CompAlign
from align.ablation import AblationCurve, ablation_curve, component_means, layer_steps
from align.debias import LabelledSplit, remove_spurious, spurious_order
from align.heatmaps import attention_heatmaps, branch_grids, token_heatmaps, upsample
from align.parent_maps import per_image_aligner_directions
from align.retrieval import choose_retrieval, image_retrieval_scores, precision_at_k, ranked, shares_value
from align.segmentation import segmentation_scores
from decompose import Decomposition
from decompose.attention_maps import AttentionMapCapture

from .gradient_maps import gradient_attention_map
from .models import target_preprocess
from .sample import ToySample
from .spurious import spurious_split


def decompose_batches(decomposer, images: torch.Tensor, level: str, batch_size: int) -> tuple[Decomposition, float]:
    """One Decomposition of images [N, 3, S, S] in [0, 1] ([C, N, D]) and the largest per-batch relative error."""
    parts, worst = [], 0.0
    for start in range(0, len(images), batch_size):
        dec = decomposer(target_preprocess(images[start:start + batch_size]), level=level)
        worst = max(worst, dec.relative_error())
        parts.append(dec)
    first = parts[0]
    return Decomposition(torch.cat([p.components for p in parts], 1), first.labels,
                         torch.cat([p.representation for p in parts]), level, first.target,
                         first.stopped_before), worst


def text_scores(decomposer, aligner: CompAlign, images: torch.Tensor, texts: torch.Tensor, batch_size: int
                ) -> tuple[torch.Tensor, list, float]:
    """([C, N] ⟨a_i(x_b), t_b⟩ at level token for images [N, 3, S, S] in [0, 1], each along its own CLIP
    direction ``texts`` [N, d_clip]; the labels; the largest per-batch relative error of the scores' sum).
    Scores along directions: the token components [C, N, D] are never built."""
    parts, worst, labels = [], 0.0, []
    for start in range(0, len(images), batch_size):
        batch = slice(start, start + batch_size)
        dec = decomposer(target_preprocess(images[batch]), level="token",
                         directions=per_image_aligner_directions(aligner, texts[batch]))
        worst = max(worst, dec.sum_error)  # checked by the call, along a random direction riding along
        parts.append(dec.scores[..., 0])
        labels = dec.labels
    return torch.cat(parts, 1), labels, worst


@dataclass
class RetrievalResult:
    # factor -> {"components": p@10 of the chosen selection, "full": p@10 of all components, "count": top
    # components summed, "projected": compared inside the factor's text subspace, "validation": the chosen
    # selection's p@10 on the validation images, "top_k": p@10 of the fixed top-k (whole space),
    # "full_projected": p@10 of all components inside the subspace}; p@10 on the test images
    precision: dict[str, dict[str, float]]
    examples: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # factor -> query/components/full rows


def property_retrieval(aligned: torch.Tensor, sample: ToySample, validation: torch.Tensor, test: torch.Tensor,
                       orders: dict[str, list[int]], bases: dict[str, torch.Tensor], top_k: int, k: int = 10,
                       shown: int = 5) -> RetrievalResult:
    """Image-based retrieval w.r.t. each factor among the ``test`` rows, every image querying all others.

    The selection (how many of the factor's top components, inside its text subspace or not) is chosen
    by precision@k among the ``validation`` rows (``choose_retrieval``), never the test rows.
    aligned: [C, N, d_clip]; orders: factor -> eligible component rows, most tied first;
    bases: factor -> orthonormal [r, d_clip] text subspace (``property_basis``); top_k: the fixed count
    reported alongside
    """
    features = aligned[:, test]
    queries = list(range(len(test)))
    result = RetrievalResult({})
    for factor, order in orders.items():
        values = sample.value_names(factor)
        choice = choose_retrieval(aligned[:, validation], order,
                                  shares_value([values[i] for i in validation.tolist()], range(len(validation))),
                                  bases[factor], k)
        relevant = shares_value([values[i] for i in test.tolist()], queries)
        subspace = bases[factor] if choice.projected else None
        by_components = image_retrieval_scores(features, queries, order[:choice.count], subspace=subspace)
        full = image_retrieval_scores(features, queries, None)
        fixed = image_retrieval_scores(features, queries, order[:top_k])
        full_projected = image_retrieval_scores(features, queries, None, subspace=bases[factor])
        result.precision[factor] = {"components": precision_at_k(by_components, relevant, k),
                                    "full": precision_at_k(full, relevant, k), "count": choice.count,
                                    "projected": choice.projected, "validation": choice.precision,
                                    "top_k": precision_at_k(fixed, relevant, k),
                                    "full_projected": precision_at_k(full_projected, relevant, k)}
        result.examples[factor] = {"query": [int(test[0])],
                                   "components": test[ranked(by_components[0], shown)].tolist(),
                                   "full": test[ranked(full[0], shown)].tolist()}
    return result


def object_directions(embed, sample: ToySample, rows: torch.Tensor) -> torch.Tensor:
    """[len(rows), d_clip] per image: its object's text ("a red circle") minus the mean scene text.

    embed: list of texts -> [T, d_clip]; subtracting the scenes points the direction at the
    object rather than at what every caption shares.
    """
    names = [f"a {c} {s}" for c, s in zip(sample.value_names("colour"), sample.value_names("shape"))]
    objects = embed([names[i] for i in rows.tolist()])
    scenes = embed(sorted({f"on {s}" for s in sample.value_names("scene")}))
    return objects - scenes.mean(0)


@dataclass
class SegmentationResult:
    scores: dict                     # metrics.json "segmentation" entry
    heatmaps: torch.Tensor           # [B, S, S] token heatmaps along each object's direction
    baseline: torch.Tensor           # [B, S, S] last-layer attention of the output-reading queries
    gradient: torch.Tensor           # [B, S, S] Grad-CAM on the last attention layer (gradient_maps)


def score_directions(model, representation: torch.Tensor, fit_representation: torch.Tensor,
                     fit_labels: torch.Tensor) -> tuple[torch.Tensor, str]:
    """([B, D] one direction per image in representation space, what it is) for the gradient baseline.

    The model's own linear head: the row of the predicted class (its logit is the score). A model
    without one: the centroid of the fit images sharing the nearest centroid's label, minus the
    mean of all fit images (a nearest-centroid classifier of ``fit_labels``).
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, torch.nn.Linear) and head.in_features == representation.shape[-1]:
        with torch.no_grad():
            predicted = head(representation).argmax(-1)
        return head.weight.detach()[predicted], "the model's own head, predicted class"
    labels = fit_labels.unique()
    centroids = torch.stack([fit_representation[fit_labels == y].mean(0) for y in labels])   # [K, D]
    centred = centroids - fit_representation.mean(0)
    nearest = torch.cdist(representation, centroids).argmin(-1)
    return centred[nearest], "nearest-centroid direction of the shape (no head)"


def object_segmentation(decomposer, aligner: CompAlign, sample: ToySample, rows: torch.Tensor,
                        directions: torch.Tensor, batch_size: int,
                        score: tuple[torch.Tensor, str]) -> tuple[SegmentationResult, float]:
    """Token heatmaps (all heads) along each image's object direction vs the object masks.

    Scores also each attention branch's own heatmap (``by_branch``) and each layer's attention
    (``baseline.by_layer``), so a multi-stage model shows which stage's grid carries the object,
    and a gradient baseline (``gradient``: Grad-CAM on the last attention layer reaching the output
    for the score ⟨representation, score[0]⟩, score[0] [B, D] as ``score_directions`` gives it).
    Returns the result and the token level's largest relative additivity error.
    """
    images = sample.images[rows]
    contributions, labels, error = text_scores(decomposer, aligner, images, directions, batch_size)
    size = tuple(images.shape[-2:])
    heatmaps = token_heatmaps(contributions, labels, size)                                # [B, S, S]
    capture = AttentionMapCapture(decomposer)
    maps = capture(target_preprocess(images))
    baseline = attention_heatmaps(maps, size)
    gradient_map = gradient_attention_map(capture, target_preprocess(images), score[0])
    gradient = attention_heatmaps([gradient_map], size)
    masks = sample.masks[rows]
    ours, theirs = segmentation_scores(heatmaps, masks), segmentation_scores(baseline, masks)
    by_gradient = segmentation_scores(gradient, masks)
    by_branch = {name: _iou_and_map(upsample(grid, size), masks)
                 for name, grid in branch_grids(contributions, labels).items()}
    by_layer = {m.name: _iou_and_map(attention_heatmaps(maps, size, layer=i), masks) for i, m in enumerate(maps)}
    queries = maps[-1].queries
    scores = {**_paper_scores(ours), "by_branch": by_branch,
              "baseline": {**_paper_scores(theirs), "by_layer": by_layer,
                           "method": f"last-layer attention ({maps[-1].name}) received from the {queries} "
                                     f"output-reading quer{'y' if queries == 1 else 'ies'} per image, mean over "
                                     "queries and heads"},
              "gradient_baseline": {**_paper_scores(by_gradient),
                                    "method": f"Grad-CAM on {gradient_map.name}: ReLU(dscore/dA * A), mean over heads "
                                              f"and output-reading queries; score: {score[1]}"}}
    return SegmentationResult(scores, heatmaps, baseline, gradient), error


def _paper_scores(scores) -> dict[str, float]:
    """Pixel accuracy, mIoU (mean of foreground and background IoU) and mAP, as the paper reports them,
    and the foreground IoU ("iou")."""
    return {"pixel_acc": scores.pixel_accuracy, "miou": scores.mean_iou, "map": scores.mean_average_precision,
            "iou": scores.foreground_iou}


def _iou_and_map(heatmaps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    scores = segmentation_scores(heatmaps, masks)
    return {"iou": scores.foreground_iou, "map": scores.mean_average_precision}


@dataclass
class SpuriousResult:
    scores: dict                     # metrics.json "spurious" entry
    per_group_before: dict[str, float]
    per_group_after: dict[str, float]
    validation_worst: list[float]    # worst-group accuracy on validation per k = 0 .. max_k
    ablated: list[str]


def spurious_removal(model, decomposer, scores: dict[str, torch.Tensor], constant: torch.Tensor, labels: list,
                     seed: int, images: int, batch_size: int, max_k: int = 12) -> SpuriousResult:
    """Mean-ablate the components most tied to the scene and least to the shape (order from ``scores``),
    k chosen on a balanced validation split, evaluated once on a balanced test split; the
    classifier is the model's own head on the (ablated) representation."""
    splits = []
    for world in (seed, seed + 1):                     # validation, test: balanced groups, disjoint worlds
        split = spurious_split(images, world, train=False)
        pixels = torch.stack([split[i][0] for i in range(len(split))])
        dec, _ = decompose_batches(decomposer, pixels, "head", batch_size)
        groups = [f"label {int(y)} / {'water' if int(g) else 'land'}"
                  for y, g in zip(split.labels, split.background_groups)]
        splits.append(LabelledSplit(dec, split.labels, groups))
    classifier = own_head(model, splits[0].components)
    if classifier is None:
        raise ValueError(f"the spurious-split model's representation stops before {splits[0].components.stopped_before}"
                         "; its own head cannot classify the ablated representation")
    order = spurious_order(scores["scene"], scores["shape"], constant)
    result = remove_spurious(order, classifier, splits[0], splits[1], max_k=max_k)
    return SpuriousResult({"k": result.k, "worst_group_before": result.before.worst,
                           "worst_group_after": result.after.worst, "average_before": result.before.average,
                           "average_after": result.after.average},
                          result.before.per_group, result.after.per_group,
                          [v.worst for v in result.validation], [labels[i].key for i in result.ablated])


def own_head(model, dec: Decomposition):
    """The model's own classifier on the decomposed representation, or None when the representation
    stops before a nonlinear pre-logits op (then the head does not read it directly)."""
    if dec.stopped_before is not None or not hasattr(model, "get_classifier"):
        return None
    return model.get_classifier()


@torch.no_grad()
def layer_ablation(dec: Decomposition, classifier, targets: torch.Tensor, rows: torch.Tensor) -> AblationCurve:
    """Accuracy on ``rows`` as whole residual blocks are mean-ablated, last block first
    (means over all images of ``dec``)."""
    reference = component_means(dec.components)
    test = Decomposition(dec.components[:, rows], dec.labels, dec.representation[rows], dec.level)
    return ablation_curve(test, layer_steps(dec.labels, last_first=True), classifier, targets[rows],
                          reference=reference)
