"""`vit-decompose demo`: the toy-world pipeline writes metrics.json and a report that renders."""
import json

import pytest
from browser import find_browser, render_page

from toyworld import FACTORS
from vit_decompose.cli import main

SECTIONS = {"overview", "encoded", "additivity", "alignment", "rankings", "textspan", "property-probe", "retrieval",
            "heatmaps", "segmentation", "spurious", "ablation"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, shortened_toy_weights):
    """The quick demo on throwaway models from a 2-step `toyworld train` (the pipeline, not the accuracies,
    is under test here; the shipped models' accuracies are tested in test_toyworld_models.py)."""
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quick", "--weights", str(shortened_toy_weights)]) == 0
    return out


def test_metrics_follow_the_documented_layout(demo_out):
    metrics = json.loads((demo_out / "metrics.json").read_text())
    models = set(metrics["additivity"])
    assert models and all(error < 1e-4 for error in metrics["additivity"].values())
    for section in ("alignment", "property_probe", "retrieval_p_at_10", "segmentation"):
        assert set(metrics[section]) == models, section
    assert all(-1 <= cosine <= 1 for cosine in metrics["alignment"].values())
    assert set(metrics["alignment_linear_fits"]) == models
    for fits in metrics["alignment_linear_fits"].values():
        assert set(fits) == {"representation", "encoded_factors", "all_factors"} and fits["all_factors"] > 0.5
    for factors in metrics["property_probe"].values():
        for probe in factors.values():
            assert set(probe) >= {"k", "top_k", "random_k", "bottom_k"}
            assert all(0 <= probe[key] <= 1 for key in ("top_k", "random_k", "bottom_k"))
    for factors in metrics["retrieval_p_at_10"].values():
        assert all(set(p) >= {"components", "full"} for p in factors.values())
    assert set(metrics["encoded"]) == models
    for factors in metrics["encoded"].values():
        assert set(factors) == set(FACTORS)
        for probe in factors.values():
            assert set(probe) == {"probe", "chance", "threshold", "encoded"}
            assert probe["encoded"] == (probe["probe"] >= probe["threshold"]) and probe["threshold"] > probe["chance"]
    for scores in metrics["segmentation"].values():
        assert set(scores) >= {"pixel_acc", "miou", "iou", "map", "baseline", "gradient_baseline"}
        for baseline in ("baseline", "gradient_baseline"):
            assert set(scores[baseline]) >= {"pixel_acc", "miou", "iou", "map", "method"}
        assert scores["by_branch"] and set(scores["by_branch"]) == set(scores["baseline"]["by_layer"])
    assert metrics["spurious"], "the spurious-split model is analysed"
    for result in metrics["spurious"].values():
        assert set(result) >= {"k", "worst_group_before", "worst_group_after", "average_before", "average_after"}


def test_report_renders_in_headless_chromium(demo_out):
    assert find_browser(), "install Chromium (Debian: apt-get install chromium; `make test` does it)"
    page = render_page(demo_out / "report.html")
    assert set(page["sections"]) >= SECTIONS, SECTIONS - set(page["sections"])
    assert page["images"] and all(image["complete"] and image["width"] > 0 for image in page["images"])
    assert page["svgs"] > 0
    assert not page["console_errors"] and not page["exceptions"] and not page["log_errors"]
    assert not page["failed_loads"]


def test_render_check_sees_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><html><body><section id='a'><img src='missing.png' alt='gone'>"
                    "<script>console.error('boom')</script></section></body></html>")
    state = render_page(page)
    assert state["sections"] == ["a"]
    assert not all(image["complete"] and image["width"] > 0 for image in state["images"])
    assert state["console_errors"] and state["failed_loads"]
