"""Notebook display: ``Decomposition._repr_html_`` / ``plot``, a ranking's ``_repr_html_`` and the heatmap figure
show the decomposition's own numbers."""
import pytest
import timm
import torch
from matplotlib.figure import Figure

from align import heatmap_figure, rank_components
from decompose import trace_and_decompose
from decompose.display import component_values


@pytest.fixture(scope="module")
def dec():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8).eval()
    return trace_and_decompose(model)(torch.randn(3, 3, 32, 32), level="head"), model


def test_repr_html_lists_the_largest_components_with_a_bar_plot(dec):
    decomposition, _ = dec
    markup = decomposition._repr_html_()
    norms = decomposition.components.flatten(2).norm(dim=-1).mean(1)
    largest = decomposition.labels[int(norms.argmax())].key
    assert largest in markup and "<svg" in markup and "<table>" in markup
    assert f"{len(decomposition.labels)} components" in markup


def test_plot_bars_are_the_components_values_and_sum_to_the_logit(dec):
    decomposition, model = dec
    figure = decomposition.plot(top=5)
    assert isinstance(figure, Figure)
    bars = sorted((p.get_width() for p in figure.axes[0].patches), reverse=True)
    expected = component_values(decomposition).sort(descending=True).values[:5]
    torch.testing.assert_close(torch.tensor(bars, dtype=torch.float32), expected, rtol=1e-5, atol=1e-6)
    # along a class's classifier row, the components' values sum to that logit (less the head's bias)
    row = model.get_classifier().weight[3].detach()
    along = component_values(decomposition, direction=row)
    torch.testing.assert_close(along.sum(), (decomposition.representation @ row).mean(), rtol=1e-4, atol=1e-5)
    one = decomposition.plot(top=len(decomposition.labels), image=1, direction=row)
    assert sum(p.get_width() for p in one.axes[0].patches) == pytest.approx(
        float(decomposition.representation[1] @ row), rel=1e-4, abs=1e-5)


def test_ranking_repr_html_and_heatmap_figure():
    keys = [f"blocks.0.attn.h{i}" for i in range(4)]
    scores = {"colour": torch.tensor([0.1, 0.9, 0.3, -0.2]), "shape": torch.tensor([0.5, 0.1, 0.2, 0.0])}
    ranking = rank_components(scores, keys, "colour")
    assert [c.key for c in ranking][:2] == ["blocks.0.attn.h1", "blocks.0.attn.h2"]
    markup = ranking._repr_html_()
    assert markup.index("blocks.0.attn.h1") < markup.index("blocks.0.attn.h2") and "<svg" in markup
    images, heatmaps = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16)
    figure = heatmap_figure(images, heatmaps, ["a", "b"])
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["a", "b"] and all(len(ax.images) == 2 for ax in panels)
    with pytest.raises(ValueError, match="do not match"):
        heatmap_figure(images, heatmaps[:1])
