"""The demo's HTML report: every number comes from the run's results; each claim is stated as
holding or not, with the numbers behind it."""
from __future__ import annotations

import torch

from align.report import (
    AblationRecord,
    AdditivityRow,
    DescribedComponent,
    HeatmapRow,
    Report,
    ablation_section,
    additivity_section,
    heatmap_rows,
    ranking_section,
    textspan_section,
)

from .alignment_bounds import ALIGNMENT_GOAL
from .demo_records import DemoSettings, TargetResult
from .generator import FACTORS
from .models import read_manifest, shipped_metrics
from .sample import ToySample
from .validation import RANDOM_DRAWS

EXAMPLE_FACTORS = ("colour", "pattern")   # retrieval examples drawn in the report
SPURIOUS_FACTORS = ("scene", "shape")     # the spurious claim needs both: the background and the label's factor


CEILING = 0.995  # both numbers at or above it: a comparison cannot separate them (reported as a tie at the ceiling)


def compared(values: dict[str, tuple[float, float]]) -> tuple[list[str], list[str], list[str]]:
    """(factors where ours beats theirs, ties at the ceiling, the others) of {factor: (ours, theirs)}."""
    beats = [f for f, (ours, theirs) in values.items() if ours > theirs]
    ties = [f for f, (ours, theirs) in values.items() if f not in beats and min(ours, theirs) >= CEILING]
    return beats, ties, [f for f in values if f not in beats and f not in ties]


def comparison_verdict(report: Report, claim: str, values: dict[str, tuple[float, float]], note: str = "") -> None:
    """One verdict over the encoded factors' (ours, theirs): holds when ours wins everywhere but at the ceiling."""
    beats, ties, losses = compared(values)
    report.verdict(claim, not losses, "; ".join(filter(None, [
        f"better for {len(beats)}/{len(values)} encoded factors: {', '.join(beats) or 'none'}",
        f"tied at the ceiling (both >= {CEILING}): {', '.join(ties)}" if ties else "",
        "not for " + ", ".join(f"{f} ({values[f][0]:.3f} vs {values[f][1]:.3f})" for f in losses) if losses else "",
        note])))


def encoded_in(result: TargetResult, factors=FACTORS) -> list[str]:
    """The ``factors`` the model's full representation encodes (the claims are checked on these only)."""
    return [f for f in factors if result.encoded[f]["encoded"]]


def not_encoded_note(result: TargetResult, factors=FACTORS) -> str:
    """'not checked, not encoded: pattern 0.31 (needs 0.625), ...' or ''."""
    missing = [f for f in factors if not result.encoded[f]["encoded"]]
    return ("not checked, not encoded: " + ", ".join(
        f"{f} {result.encoded[f]['probe']:.2f} (needs {result.encoded[f]['threshold']:.3g})" for f in missing)
            if missing else "")


def _encoded(report: Report, results: list[TargetResult], settings: DemoSettings) -> None:
    report.section("encoded", "Which factors each model encodes")
    report.paragraph(f"Held-out accuracy of a linear (ridge) probe on each model's full representation, fit on the "
                     f"{settings.fit_images} fit images, scored on the {settings.test_images} held-out ones. A factor "
                     "with K values counts as encoded when the probe reaches chance plus half the headroom, "
                     "1/K + 0.5 (1 − 1/K). The claims below are checked on the encoded factors only; the others "
                     "are listed as not encoded, with their probe.")
    first = results[0].encoded
    rows = [[r.name, *(f"{r.encoded[f]['probe']:.3f} {'encoded' if r.encoded[f]['encoded'] else 'NOT encoded'}"
                       for f in FACTORS), f"{len(encoded_in(r))}/{len(FACTORS)}"] for r in results]
    rows.append(["threshold (chance)", *(f"{first[f]['threshold']:.3g} ({first[f]['chance']:.3g})" for f in FACTORS),
                 ""])
    report.table(["model", *FACTORS, "encoded"], rows)


def _overview(report: Report, results: list[TargetResult], settings: DemoSettings, sample: ToySample) -> None:
    report.section("overview", "Overview")
    report.paragraph(f"{len(sample)} generated images (world seed {settings.seed}): {settings.fit_images} fit the "
                     f"CompAlign maps and the component scores, {settings.test_images} are held out for the checks. "
                     "Every number below is computed in this run against the generator's ground truth; the "
                     "training metrics are those recorded in the shipped models.json.")
    report.figures([(sample.images[i].permute(1, 2, 0), sample.captions[i]) for i in range(6)])
    trained, manifest = shipped_metrics(settings.weights), read_manifest(settings.weights)["models"]
    rows = [[name, str(manifest[name]["task"]), *_training_result(trained[name])]
            for name in (r.name for r in results) if name in trained]
    report.table(["target", "trained on", "held-out result at training", "chance / worst group"], rows)
    if "clip" in trained:
        zero_shot = trained["clip"]["zero_shot"]
        report.table(["tiny CLIP zero-shot", *zero_shot], [["accuracy", *zero_shot.values()],
                                                           ["chance", *trained["clip"]["chance"].values()]])


def _training_result(metrics: dict) -> list:
    """[result, chance or worst group] of one target's recorded training metrics."""
    if "class_accuracy" in metrics:
        return [f"class accuracy {metrics['class_accuracy']:.3f}", metrics["chance"]]
    if "worst_group_accuracy" in metrics:
        return [f"average over groups {metrics['average_group_accuracy']:.3f}", metrics["worst_group_accuracy"]]
    return [f"no labels; encodes {', '.join(metrics.get('encoded', [])) or 'none'}", ""]


def _alignment(report: Report, results: list[TargetResult]) -> None:
    report.section("alignment", "CompAlign: held-out cosine to the tiny CLIP")
    report.paragraph("Beside CompAlign's held-out cosine, closed-form ridge fits of the CLIP embedding on the same "
                     "train / held-out images: from the model's full representation, and from the one-hot values "
                     "of the factors it encodes or of all six (what a representation holding exactly those factors "
                     "could reach). The tiny CLIP reads every factor, so a factor the target does not encode "
                     "bounds the alignment, whatever its training.")
    report.table(["model", "held-out cosine", "epochs", "linear fit: representation", "encoded factors' one-hots",
                  "all factors' one-hots"],
                 [[r.name, r.alignment["heldout_cosine"], r.alignment["epochs"],
                   *(r.alignment["linear_fits"][k] for k in ("representation", "encoded_factors", "all_factors"))]
                  for r in results])
    for r in results:
        fits = r.alignment["linear_fits"]
        report.verdict(f"{r.name}: CompAlign's held-out cosine reaches {ALIGNMENT_GOAL}",
                       r.alignment["heldout_cosine"] >= ALIGNMENT_GOAL,
                       f"{r.alignment['heldout_cosine']:.3f}; linear fits: representation "
                       f"{fits['representation']:.3f}, one-hots of its {len(encoded_in(r))} encoded factors "
                       f"{fits['encoded_factors']:.3f}, of all six {fits['all_factors']:.3f}")


def _rankings(report: Report, results: list[TargetResult]) -> None:
    ranking_section(report, {r.name: r.rankings for r in results}, {r.name: r.constant for r in results},
                    title="Components ranked per factor")
    described = []
    for r in results:
        for factor in FACTORS:
            top = r.rankings[factor][0]
            described.append(DescribedComponent(r.name, factor, top.key, r.descriptions.get(top.key, [])))
    textspan_section(report, described, "TextSpan descriptions of each factor's top component")


def _probe(report: Report, results: list[TargetResult], settings: DemoSettings) -> None:
    report.section("property-probe", f"Linear probe of each factor from {settings.k} selected components")
    report.paragraph("Ridge-regression probe on the sum of the selected components' raw contributions, fit on "
                     "the fit images, accuracy on the held-out images. Selections are among the model's parts, not "
                     f"its constants and biases; random-k is the mean of {RANDOM_DRAWS} draws.")
    for r in results:
        report.heading(r.name)
        report.table(["factor", "k", "top-k", "random-k", "bottom-k"],
                     [[f, p["k"], p["top_k"], p["random_k"], p["bottom_k"]] for f, p in r.probe.items()])
        comparison_verdict(report, f"{r.name}: the top-k components beat k random ones for every encoded factor",
                           {f: (r.probe[f]["top_k"], r.probe[f]["random_k"]) for f in encoded_in(r)},
                           not_encoded_note(r))


def _retrieval(report: Report, results: list[TargetResult], sample: ToySample, settings: DemoSettings) -> None:
    report.section("retrieval", "Image retrieval with respect to a factor (precision@10)")
    report.paragraph("Each held-out image queries all others by the cosine of its summed selected (CompAlign-mapped) "
                     "components; relevant = shares the factor's value with the query. 'full' uses all components. "
                     "The selection (how many of the factor's top-ranked components, compared in the whole CLIP "
                     "space or inside the factor's text subspace, the span of its value phrases) is chosen per "
                     "factor by precision@10 on the validation images (the fit images CompAlign did not train on), "
                     "never on the held-out images. With every eligible component inside the subspace, the "
                     "selection is the full representation restricted to the factor's texts: the gain then comes "
                     f"from the texts, not from picking components. 'top-{settings.k}' is the fixed selection "
                     "in the whole space.")
    for r in results:
        report.heading(r.name)
        eligible = int((~r.constant).sum())
        report.table(["factor", "chosen selection", "validation", "selected components", "full representation",
                      "full inside the subspace", f"top-{settings.k}"],
                     [[f, f"top {p['count']} of {eligible}{', in the subspace' if p['projected'] else ''}",
                       p["validation"], p["components"], p["full"], p["full_projected"], p["top_k"]]
                      for f, p in r.retrieval.precision.items()])
        checked, precision = encoded_in(r), r.retrieval.precision
        comparison_verdict(report, f"{r.name}: selected components beat the full representation for every encoded "
                           "factor", {f: (precision[f]["components"], precision[f]["full"]) for f in checked},
                           not_encoded_note(r))
        comparison_verdict(report, f"{r.name}: for those factors, picking components adds to comparing the full "
                           "representation inside the factor's text subspace",
                           {f: (precision[f]["components"], precision[f]["full_projected"]) for f in checked})
        for factor in EXAMPLE_FACTORS:
            example = r.retrieval.examples[factor]
            query = example["query"][0]
            wanted = sample.value_names(factor)[query]
            items = [(sample.images[query].permute(1, 2, 0), f"query: {wanted}")]
            for source in ("components", "full"):
                items += [(sample.images[i].permute(1, 2, 0),
                           f"{source}: {sample.value_names(factor)[i]}{' ✓' if sample.value_names(factor)[i] == wanted else ''}")
                          for i in example[source]]
            report.figures(items)


def _heatmaps(report: Report, results: list[TargetResult], sample: ToySample, settings: DemoSettings) -> None:
    report.section("heatmaps", "Token heatmaps along each image's object text")
    report.paragraph("Level token, all heads: ⟨a_i,token(x), t⟩ with t = the text of the image's object "
                     "('a red circle') minus the mean scene text, per source position on its stage's grid, "
                     "each grid upsampled to the image, summed. Baseline: last-layer attention received from "
                     "the output-reading queries (the class token, or every token of a pooled model), mean over "
                     "queries and heads. Gradient baseline: Grad-CAM on the same last attention layer, "
                     "ReLU(∂score/∂A ⊙ A) averaged over heads and output-reading queries (the last step of Chefer "
                     "et al.'s relevance), found from the traced graph like the attention maps; the score is the "
                     "model's own logit of its predicted class, or for a model without a head the image's "
                     "nearest shape centroid.")
    rows = torch.arange(settings.fit_images, settings.fit_images + settings.token_images)
    for r in results:
        report.heading(r.name)
        heatmap_rows(report, [HeatmapRow(sample.images[row], sample.captions[row],
                                         [(r.segmentation.heatmaps[i], "token heatmap"),
                                          (r.segmentation.baseline[i], "attention baseline"),
                                          (r.segmentation.gradient[i], "Grad-CAM baseline")],
                                         [(sample.masks[row].float().unsqueeze(-1).expand(-1, -1, 3), "object mask")])
                              for i, row in enumerate(rows[:4].tolist())],
                     meaning="high = tokens pushing most along the object text (token heatmap), most attended "
                             "(attention baseline)")
    report.section("segmentation", "Zero-shot segmentation from the heatmaps")
    report.paragraph("Binarised at the mean of the clipped, max-normalised map; scored against the object masks "
                     "as the paper does: pixel accuracy, mIoU (mean of object and background IoU) and mAP, with "
                     "the object's IoU alongside. For orientation, the paper's ImageNet-segmentation numbers on "
                     "DeiT: decomposition .772 / .529 / .831, Chefer et al. .731 / .479 / .787.")
    table = []
    for r in results:
        s = r.segmentation.scores
        for method, scores in (("token heatmap", s), ("attention baseline", s["baseline"]),
                               ("Grad-CAM baseline", s["gradient_baseline"])):
            table.append([r.name, method, scores["pixel_acc"], scores["miou"], scores["map"], scores["iou"]])
    report.table(["model", "method", "pixel accuracy", "mIoU", "mAP", "object IoU"], table)
    report.paragraph("Per attention layer: the token heatmap of that layer's heads alone, and that layer's "
                     "attention as the baseline map.")
    layers = []
    for r in results:
        s = r.segmentation.scores
        for name, ours in s.get("by_branch", {}).items():
            theirs = s["baseline"].get("by_layer", {}).get(name, {"iou": float("nan"), "map": float("nan")})
            layers.append([r.name, name, ours["iou"], ours["map"], theirs["iou"], theirs["map"]])
    report.table(["model", "attention layer", "token heatmap IoU", "mAP", "attention IoU", "mAP"], layers)
    for r in results:
        s = r.segmentation.scores
        for method, key in (("attention", "baseline"), ("Grad-CAM", "gradient_baseline")):
            report.verdict(f"{r.name}: token heatmap mIoU above the {method} baseline", s["miou"] > s[key]["miou"],
                           f"{s['miou']:.3f} vs {s[key]['miou']:.3f}")


def _spurious(report: Report, results: list[TargetResult]) -> None:
    report.section("spurious", "Removing the spurious background (toy Waterbirds)")
    analysed = [r for r in results if r.spurious is not None]
    if not analysed:
        report.paragraph("No spurious-split model was part of this run.")
        return
    report.paragraph("Label: shape group; in training it agreed with the background group (water-like vs land) 95% "
                     "of the time, in these balanced splits 50%. Components are ordered by score(scene) − "
                     "score(shape); k is chosen on a validation split, then the top k are mean-ablated on the test "
                     "split. Classifier: the model's own head on the (ablated) representation.")
    for r in analysed:
        s = r.spurious
        report.heading(r.name)
        report.table(["group", "accuracy before", "accuracy after"],
                     [[g, s.per_group_before[g], s.per_group_after.get(g, float("nan"))] for g in s.per_group_before])
        report.table(["k (validation)", "worst group before", "worst group after", "average before", "average after"],
                     [[s.scores["k"], s.scores["worst_group_before"], s.scores["worst_group_after"],
                       s.scores["average_before"], s.scores["average_after"]]])
        report.paragraph("Ablated: " + (", ".join(s.ablated) or "nothing (k = 0 was best on validation)"))
        report.line_chart(f"{r.name}: validation worst-group accuracy vs components ablated",
                          list(range(len(s.validation_worst))), {"worst group": s.validation_worst},
                          "components ablated (score order)", "accuracy")
        detail = f"{s.scores['worst_group_before']:.3f} → {s.scores['worst_group_after']:.3f}"
        if len(encoded_in(r, SPURIOUS_FACTORS)) < len(SPURIOUS_FACTORS):
            report.paragraph(f"{r.name}: the claim is not checked ({not_encoded_note(r, SPURIOUS_FACTORS)}); "
                             f"measured {detail}.")
            continue
        report.verdict(f"{r.name}: removing the background components raises worst-group accuracy on the test split",
                       s.scores["worst_group_after"] > s.scores["worst_group_before"], detail)


def _ablation(report: Report, results: list[TargetResult]) -> None:
    ablation_section(report, [AblationRecord(r.name, r.ablation, r.ablation_classifier)
                              for r in results if r.ablation is not None],
                     "Accuracy on the model's training task (held-out images) as whole residual blocks are "
                     "mean-ablated cumulatively, last block first.")


def build_report(results: list[TargetResult], settings: DemoSettings, sample: ToySample) -> Report:
    report = Report("vit-decompose on the toy world")
    _overview(report, results, settings, sample)
    _encoded(report, results, settings)
    additivity_section(report, [AdditivityRow(r.name, len(r.labels), r.level_errors) for r in results],
                       note="Components: at level head. Errors: the largest per-batch relative error at each level; at "
                            "level token the heatmaps are scores along each image's text (the token vectors are "
                            "never built), checked along a random direction that rides along.")
    _alignment(report, results)
    _rankings(report, results)
    _probe(report, results, settings)
    _retrieval(report, results, sample, settings)
    _heatmaps(report, results, sample, settings)
    _spurious(report, results)
    _ablation(report, results)
    return report
