"""``vit-decompose demo``: the whole pipeline on the toy world, checked against ground truth.

For every shipped tiny target: decompose (levels head and token), align the components to
the tiny CLIP (CompAlign), score and rank them for each factor, describe the top ones with
TextSpan, then measure with the generator's ground truth what the selections carry
(probes, property retrieval, heatmap segmentation, spurious-correlation removal). Writes
``report.html`` (self-contained) and ``metrics.json``; both are replaced atomically after
each model, so a killed run keeps what it finished.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from align import (
    PropertyScorer,
    TensorAlignmentData,
    TrainingOptions,
    encode_descriptions,
    property_basis,
    rank_components,
    text_span,
    train_compalign,
)
from align.classifiers import fit_linear_probe
from align.clip_models import ClipModel
from align.report import Stopwatch
from decompose import trace_and_decompose
from decompose.store import atomic_write_text
from tracer.vocabulary import ComponentKind

from .alignment_bounds import alignment_bounds
from .demo_records import DemoSettings, TargetResult
from .demo_report import build_report
from .encoding import factor_probes
from .experiments import (
    decompose_batches,
    layer_ablation,
    object_directions,
    object_segmentation,
    own_head,
    property_retrieval,
    score_directions,
    spurious_removal,
)
from .generator import FACTORS
from .models import TARGET_CONFIGS, Task, load_target, load_toy_clip, toy_clip_preprocess
from .sample import FACTOR_TEXTS, ToySample, toy_sample
from .validation import selection_probe

INPUT_FREE = (ComponentKind.CONSTANT, ComponentKind.BIAS)  # kinds whose value before any norm is one per model

TEXT_TEMPLATES = ("{}", "a photo of {}")


def factor_embeddings(clip: ClipModel) -> dict[str, torch.Tensor]:
    """factor -> [values, d_clip] text embeddings of its value phrases (``FACTOR_TEXTS``)."""
    return {factor: encode_descriptions(clip, list(FACTOR_TEXTS[factor].values()), TEXT_TEMPLATES)
            for factor in FACTORS}


def describe_top_components(aligned: torch.Tensor, rankings: dict[str, list], skipped: torch.Tensor,
                            embeddings: dict[str, torch.Tensor]) -> dict[str, list[tuple[str, float]]]:
    """TextSpan of each factor's top component over a bank of every factor's value phrases (none where the
    top is ``skipped`` [C]: a constant or bias ranked first because every component is one)."""
    texts = [text for factor in FACTORS for text in FACTOR_TEXTS[factor].values()]
    bank = torch.cat([embeddings[factor] for factor in FACTORS])
    described = {}
    for ranked in rankings.values():
        top = ranked[0]
        if not bool(skipped[top.index]) and top.key not in described:
            span = text_span(aligned[top.index], bank, texts, count=3)
            described[top.key] = list(zip(span.texts, span.variance_explained))
    return described


def analyse_target(name: str, clip: ClipModel, sample: ToySample, fit: torch.Tensor, test: torch.Tensor,
                   clip_targets: torch.Tensor, embeddings: dict[str, torch.Tensor],
                   settings: DemoSettings) -> TargetResult:
    watch = Stopwatch()
    model = load_target(name, settings.weights)
    decomposer = trace_and_decompose(model)
    dec, head_error = decompose_batches(decomposer, sample.images, "head", settings.batch_size)
    encoded = factor_probes(dec.representation, {factor: sample.factor(factor) for factor in FACTORS}, fit, test)
    watch.lap("decompose")

    data = TensorAlignmentData(dec.components[:, fit], clip_targets[fit], dec.labels, heldout_fraction=0.2,
                               model=name, level="head")
    aligner, report = train_compalign(data, TrainingOptions(max_epochs=60, patience=5, lr=1e-3, progress=False))
    with torch.no_grad():
        aligned = aligner.map_components(dec.components)                           # [C, N, d_clip]
    bounds = alignment_bounds(dec.representation, clip_targets, sample, fit[~data.heldout], fit[data.heldout],
                              [factor for factor in FACTORS if encoded[factor]["encoded"]])
    watch.lap("align")

    bases = {factor: property_basis(e) for factor, e in embeddings.items()}             # factor -> [r, d_clip]
    scorer = PropertyScorer(bases)
    scorer.update(aligned[:, fit])
    scores, constant = scorer.scores(), scorer.constant()
    # rankings lead with the model's parts: constants and biases go last. Those are the same for every image
    # until a norm divides them by its per-token scale, so they all vary by that one scalar; ranked by
    # correlation they took two of deit's top-3 for size (each read size at .63, the top part .97; 2026-12-05)
    not_parts = constant | torch.tensor([label.kind in INPUT_FREE for label in dec.labels])
    rankings = {factor: rank_components(scores, dec.keys, factor, constant=not_parts) for factor in FACTORS}
    orders = {factor: [c.index for c in ranked if not bool(not_parts[c.index])] for factor, ranked in rankings.items()}
    descriptions = describe_top_components(aligned[:, fit], rankings, not_parts, embeddings)
    probe = {factor: selection_probe(dec.components, orders[factor], sample.factor(factor), fit, test,
                                     len(FACTORS[factor]), settings.k) for factor in FACTORS}
    watch.lap("score")

    validation = fit[data.heldout]                     # fit images CompAlign did not train on
    retrieval = property_retrieval(aligned, sample, validation, test, orders, bases, settings.k)
    watch.lap("retrieval")
    rows = test[:settings.token_images]
    directions = object_directions(lambda texts: encode_descriptions(clip, texts, TEXT_TEMPLATES), sample, rows)
    score = score_directions(model, dec.representation[rows], dec.representation[fit], sample.factor("shape")[fit])
    segmentation, token_error = object_segmentation(decomposer, aligner, sample, rows, directions,
                                                    settings.batch_size, score)
    watch.lap("heatmaps")
    ablation, classifier_name = None, ""
    task = TARGET_CONFIGS.get(name, {}).get("task")
    if task is not None and Task(task) is not Task.SPURIOUS:
        ablation, classifier_name = training_task_ablation(model, dec, Task(task), sample, fit, test)
        watch.lap("ablation")
    spurious = None
    if name in settings.spurious_models:
        spurious = spurious_removal(model, decomposer, scores, constant, dec.labels, settings.seed + 1,
                                    settings.spurious_images, settings.batch_size)
        watch.lap("spurious")
    return TargetResult(name, dec.labels, encoded, {"head": head_error, "token": token_error},
                        {"heldout_cosine": report.heldout_cosine, "epochs": report.epochs, "linear_fits": bounds},
                        scores, constant, rankings, descriptions, probe, retrieval, segmentation, spurious,
                        ablation, classifier_name, watch.seconds)


def training_task_ablation(model, dec, task: Task, sample: ToySample, fit: torch.Tensor, test: torch.Tensor):
    """(layer ablation curve, classifier description) on the model's training task: the object class
    with its own head (held-out images whose object is a class), or, for a model without labels,
    the shape with a linear probe fit on the fit images."""
    classifier = own_head(model, dec)
    if task is Task.OBJECT_CLASSES and classifier is not None:
        classes = sample.object_classes()
        return layer_ablation(dec, classifier, classes, test[classes[test] >= 0]), "the model's own head (object class)"
    reason = ("it was trained without labels" if task is Task.SELF_SUPERVISED
              else f"the representation stops before {dec.stopped_before}")
    probe = fit_linear_probe(dec.representation[fit], sample.factor("shape")[fit], len(FACTORS["shape"]))
    return layer_ablation(dec, probe, sample.factor("shape"), test), f"a linear probe of the shape ({reason})"


def metrics_of(results: list[TargetResult]) -> dict[str, Any]:
    """The ``metrics.json`` layout of the toy-world issue (plus per-level errors and timings).

    ``encoded``: model -> factor -> the full representation's held-out probe, its chance, the
    threshold and whether the factor counts as encoded (``toyworld.encoding``);
    ``alignment_linear_fits``: model -> the held-out cosines of linear fits of the CLIP embedding
    that bound CompAlign's (``toyworld.alignment_bounds``).
    """
    return {"encoded": {r.name: r.encoded for r in results},
            "additivity": {r.name: max(r.level_errors.values()) for r in results},
            "additivity_by_level": {r.name: r.level_errors for r in results},
            "alignment": {r.name: r.alignment["heldout_cosine"] for r in results},
            "alignment_linear_fits": {r.name: r.alignment["linear_fits"] for r in results},
            "property_probe": {r.name: r.probe for r in results},
            "retrieval_p_at_10": {r.name: r.retrieval.precision for r in results},
            "segmentation": {r.name: r.segmentation.scores for r in results},
            "spurious": {r.name: r.spurious.scores for r in results if r.spurious is not None},
            "ablation_curves": {r.name: r.ablation.as_dict() for r in results if r.ablation is not None},
            "seconds": {r.name: r.seconds for r in results}}


def run_demo(out: str | Path, settings: DemoSettings | None = None, log=print) -> dict[str, Any]:
    settings = settings or DemoSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    sample = toy_sample(settings.seed, settings.fit_images + settings.test_images)
    fit = torch.arange(settings.fit_images)
    test = torch.arange(settings.fit_images, len(sample))
    clip = load_toy_clip(settings.weights)
    clip_targets = torch.cat([clip.encode_images(toy_clip_preprocess(sample.images[s:s + 256]))
                              for s in range(0, len(sample), 256)])                # [N, d_clip]
    embeddings = factor_embeddings(clip)
    results, metrics = [], {}
    for name in settings.models:
        result = analyse_target(name, clip, sample, fit, test, clip_targets, embeddings, settings)
        results.append(result)
        log(f"{name}: additivity {max(result.level_errors.values()):.1e}, held-out cosine "
            f"{result.alignment['heldout_cosine']:.3f} ({sum(result.seconds.values()):.0f} s)")
        metrics = metrics_of(results)
        metrics["seconds"]["total"] = time.perf_counter() - started
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        atomic_write_text(out / "report.html", build_report(results, settings, sample).render())
    log(f"wrote {out / 'report.html'} and {out / 'metrics.json'} in {time.perf_counter() - started:.0f} s")
    return metrics


def quick_settings() -> DemoSettings:
    """A small run (tests, smoke checks): the same pipeline, fewer images, noisier numbers."""
    return DemoSettings(fit_images=160, test_images=96, token_images=4, spurious_images=64)
