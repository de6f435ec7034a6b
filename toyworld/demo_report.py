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

from .demo_records import DemoSettings, TargetResult
from .generator import FACTORS
from .models import shipped_metrics
from .sample import ToySample

UNTRAINED_FACTORS = ("colour", "scene")   # the targets were trained on shape only


def _overview(report: Report, results: list[TargetResult], settings: DemoSettings, sample: ToySample) -> None:
    report.section("overview", "Overview")
    report.paragraph(f"{len(sample)} generated images (world seed {settings.seed}): {settings.fit_images} fit the "
                     f"CompAlign maps and the component scores, {settings.test_images} are held out for the checks. "
                     "Every number below is computed in this run against the generator's ground truth; the "
                     "training metrics are those recorded in the shipped models.json.")
    report.figures([(sample.images[i].permute(1, 2, 0), sample.captions[i]) for i in range(6)])
    trained = shipped_metrics(settings.weights)
    rows = [[name, trained[name].get("accuracy", trained[name].get("average", float("nan"))),
             trained[name].get("worst", "")] for name in (r.name for r in results) if name in trained]
    report.table(["target", "held-out accuracy at training (average over groups for the spurious split)",
                  "worst group"], rows)
    if "clip" in trained:
        zero_shot = trained["clip"]["zero_shot"]
        report.table(["tiny CLIP zero-shot", *zero_shot], [["accuracy", *zero_shot.values()],
                                                           ["chance", *trained["clip"]["chance"].values()]])


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
    report.paragraph("Logistic regression on the sum of the selected components' raw contributions, fit on the "
                     "fit images, accuracy on the held-out images; random-k is the mean of 5 draws.")
    for r in results:
        report.heading(r.name)
        report.table(["factor", "k", "top-k", "random-k", "bottom-k"],
                     [[f, p["k"], p["top_k"], p["random_k"], p["bottom_k"]] for f, p in r.probe.items()])
        wins = [f for f, p in r.probe.items() if p["top_k"] > p["random_k"]]
        report.verdict(f"{r.name}: the top-k components beat k random ones for every factor",
                       len(wins) == len(r.probe), f"{len(wins)}/{len(r.probe)} factors: {', '.join(wins)}")


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
        better = [f for f in UNTRAINED_FACTORS if r.retrieval.precision[f]["components"] > r.retrieval.precision[f]["full"]]
        report.verdict(f"{r.name}: selected components beat the full representation for the factors it was not "
                       f"trained on ({', '.join(UNTRAINED_FACTORS)})", len(better) == len(UNTRAINED_FACTORS),
                       f"better for: {', '.join(better) or 'none'}")
        beyond = [f for f in UNTRAINED_FACTORS
                  if r.retrieval.precision[f]["components"] > r.retrieval.precision[f]["full_projected"]]
        report.verdict(f"{r.name}: for those factors, picking components adds to comparing the full representation "
                       "inside the factor's text subspace", len(beyond) == len(UNTRAINED_FACTORS),
                       f"better for: {', '.join(beyond) or 'none'}")
        for factor in UNTRAINED_FACTORS:
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
                     "queries and heads.")
    rows = torch.arange(settings.fit_images, settings.fit_images + settings.token_images)
    for r in results:
        report.heading(r.name)
        heatmap_rows(report, [HeatmapRow(sample.images[row], sample.captions[row],
                                         [(r.segmentation.heatmaps[i], "token heatmap"),
                                          (r.segmentation.baseline[i], "attention baseline")],
                                         [(sample.masks[row].float().unsqueeze(-1).expand(-1, -1, 3), "object mask")])
                              for i, row in enumerate(rows[:4].tolist())],
                     meaning="high = tokens pushing most along the object text (token heatmap), most attended "
                             "(attention baseline)")
    report.section("segmentation", "Zero-shot segmentation from the heatmaps")
    report.paragraph("Binarised at the mean of the clipped, max-normalised map; scored against the object masks.")
    table = []
    for r in results:
        s = r.segmentation.scores
        table += [[r.name, "token heatmap", s["pixel_acc"], s["iou"], s["map"]],
                  [r.name, "attention baseline", s["baseline"]["pixel_acc"], s["baseline"]["iou"],
                   s["baseline"]["map"]]]
    report.table(["model", "method", "pixel accuracy", "IoU", "mAP"], table)
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
        report.verdict(f"{r.name}: heatmap IoU above the attention baseline", s["iou"] > s["baseline"]["iou"],
                       f"{s['iou']:.3f} vs {s['baseline']['iou']:.3f}")


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
        report.verdict(f"{r.name}: removing the background components raises worst-group accuracy on the test split",
                       s.scores["worst_group_after"] > s.scores["worst_group_before"],
                       f"{s.scores['worst_group_before']:.3f} → {s.scores['worst_group_after']:.3f}")


def _ablation(report: Report, results: list[TargetResult]) -> None:
    ablation_section(report, [AblationRecord(r.name, r.ablation, r.ablation_classifier)
                              for r in results if r.ablation is not None],
                     "Accuracy on the model's training task (held-out images) as whole residual blocks are "
                     "mean-ablated cumulatively, last block first.")


def build_report(results: list[TargetResult], settings: DemoSettings, sample: ToySample) -> Report:
    report = Report("vit-decompose on the toy world")
    _overview(report, results, settings, sample)
    additivity_section(report, [AdditivityRow(r.name, len(r.labels), r.level_errors) for r in results],
                       note="Components: at level head. Errors: the largest per-batch relative error at each level.")
    report.section("alignment", "CompAlign: held-out cosine to the tiny CLIP")
    report.table(["model", "held-out cosine", "epochs"],
                 [[r.name, r.alignment["heldout_cosine"], r.alignment["epochs"]] for r in results])
    _rankings(report, results)
    _probe(report, results, settings)
    _retrieval(report, results, sample, settings)
    _heatmaps(report, results, sample, settings)
    _spurious(report, results)
    _ablation(report, results)
    return report
