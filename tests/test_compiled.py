"""The decomposition recorded as one graph (``decomposer.compiled``) equals the interpreter on new images,
for the model matrix at every level, and so do its scores along directions (shared and per component); the
graph reads nothing back, refuses other inputs, and a read of the batch that decides what is computed
refuses to record."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decompose import trace_and_decompose
from decompose.compiled import CallPath, GraphCaptureError, GraphFallbackWarning, InputMismatchError
from decompose.directions import per_component
from decompose.sum_check import InexactSumError
from tests.models import TIMM_MODELS, gated_model, matrix_decomposer, matrix_model
from tests.test_properties import (
    FAMILIES,
    PROPERTY_SETTINGS,
    assert_heads_sum_to_branch,
    assert_sums_to,
    assert_tokens_sum_to_head,
    build,
    images_for,
    pre_logits,
)
from tests.test_scores import assert_scores_match

LEVELS = ("branch", "head", "token")
SYNCING_TAGS = {torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output}


def syncing_ops(graph: torch.fx.Graph) -> list[str]:
    """The graph's ops whose output shape or value is read back from the device (``nonzero``, ``item``,
    boolean-mask indexing, ...); indexing by integer tensors is not one."""
    found = []
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or \
                not SYNCING_TAGS & set(target.tags):
            continue
        if target is torch.ops.aten.index.Tensor and \
                all(i is None or i.meta["val"].dtype != torch.bool for i in node.args[1]):
            continue
        found.append(str(target))
    return found


@pytest.mark.parametrize("name", sorted(TIMM_MODELS) + ["open_clip"])
def test_the_graph_equals_the_interpreter_on_new_images(name):
    decomposer, size = matrix_decomposer(name)
    example, images = torch.randn(2, *size, dtype=torch.float64), torch.randn(2, *size, dtype=torch.float64)
    for level in LEVELS:
        graph = decomposer.compiled(level, example)
        assert syncing_ops(graph.graph) == [], level
        representation, components = graph(images)
        expected = decomposer(images, level=level)
        assert [label.key for label in graph.labels] == expected.keys
        scale = float(expected.representation.norm())
        assert float((representation - expected.representation).norm()) <= 1e-12 * scale
        assert components.shape == expected.components.shape
        assert float((components - expected.components).norm()) <= 1e-12 * scale, level
        checked = graph.decompose(images)
        assert checked.keys == expected.keys and checked.sum_error <= 1e-10


def assert_same_scores(graph, decomposer, images, level, directions, rel=1e-12):
    """The graph's scores on ``images`` equal the interpreter's, and its sum check along the check column holds."""
    got, expected = graph.decompose(images), decomposer(images, level=level, directions=directions)
    assert got.keys == expected.keys and got.scores.shape == expected.scores.shape
    scale = float(expected.scores.norm())
    assert float((got.scores - expected.scores).norm()) <= rel * scale, level
    assert float((got.representation - expected.representation).norm()) <= rel * float(expected.representation.norm())
    assert got.sum_error <= (1e-10 if images.dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("name", sorted(TIMM_MODELS) + ["open_clip"])
def test_scores_on_the_graph_equal_the_interpreter(name):
    decomposer, size = matrix_decomposer(name)
    example, images = torch.randn(2, *size, dtype=torch.float64), torch.randn(2, *size, dtype=torch.float64)
    directions = torch.randn(3, decomposer.output_width(example), dtype=torch.float64)
    for level in ("head", "token"):
        graph = decomposer.compiled(level, example, directions=directions)
        assert syncing_ops(graph.graph) == [], level
        assert graph(images)[1].shape == (len(graph.labels), 2, 4)  # the check direction rides along
        assert_same_scores(graph, decomposer, images, level, directions)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_per_component_directions_on_the_graph(name):
    """Rows by token parity: a head's components use several rows (each piece projected on its own)."""
    torch.manual_seed(2)
    model, size = matrix_model(name)
    decomposer = trace_and_decompose(model)
    example, images = torch.randn(2, *size, dtype=torch.float64), torch.randn(2, *size, dtype=torch.float64)
    table = torch.randn(3, 2, decomposer.output_width(example), dtype=torch.float64)
    directions = per_component(table, lambda label: 2 if label.token is None else label.token % 2)
    graph = decomposer.compiled("token", example, directions=directions)
    assert syncing_ops(graph.graph) == []
    assert_same_scores(graph, decomposer, images, "token", directions)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_tiny_tf_224"])
def test_float32_graph(name):
    torch.manual_seed(4)
    model, size = matrix_model(name)
    decomposer = trace_and_decompose(model.float())
    example, images = torch.randn(2, *size), torch.randn(2, *size)
    graph = decomposer.compiled("head", example)
    got, expected = graph.decompose(images), decomposer(images, level="head")
    assert got.keys == expected.keys and got.components.dtype == torch.float32
    assert float((got.components - expected.components).norm()) <= 1e-5 * float(expected.representation.norm())
    directions = torch.randn(2, decomposer.output_width(example))
    assert_same_scores(decomposer.compiled("head", example, directions=directions), decomposer, images, "head",
                       directions, rel=1e-5)


@FAMILIES
@settings(PROPERTY_SETTINGS, max_examples=3)
@given(data=st.data())
def test_properties_hold_on_the_graph(configs, data):
    """``tests/test_properties``'s additivity and refinement, and ``tests/test_scores``'s scores, on graphs
    recorded on another batch of the same shape (random ViT and Swin configs)."""
    case = data.draw(configs, label="case")
    model = build(case)
    images, example = images_for(model, case), images_for(model, case, seed_offset=500)
    decomposer = trace_and_decompose(model)
    found = {level: decomposer.compiled(level, example).decompose(images) for level in LEVELS}
    expected = pre_logits(model, images)
    for level, dec in found.items():
        assert_sums_to(dec, expected, level)
    assert_heads_sum_to_branch(model, found["branch"], found["head"])
    assert_tokens_sum_to_head(model, found["head"], found["token"])
    assert_scores_match(decomposer, images, data.draw(st.sampled_from(LEVELS)), k=data.draw(st.integers(1, 4)),
                        compiled=True)


@pytest.fixture(scope="module")
def vit_graph():
    torch.manual_seed(1)
    model, size = matrix_model("vit_tiny_patch16_224")
    decomposer = trace_and_decompose(model)
    return decomposer, decomposer.compiled("head", torch.randn(2, *size, dtype=torch.float64)), size


def test_other_inputs_are_refused(vit_graph):
    _, graph, size = vit_graph
    for images in (torch.randn(3, *size, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64),
                   torch.randn(2, *size)):
        with pytest.raises(InputMismatchError, match=r"recorded for images \(2, 3, 64, 64\) torch.float64"):
            graph(images)


def test_the_sum_check_still_runs(vit_graph):
    _, graph, size = vit_graph
    images = torch.randn(2, *size, dtype=torch.float64)
    representation, components = graph(images)
    assert graph.wrap(images, representation, components).sum_error <= 1e-10
    wrong = components.clone()
    wrong[3] *= 1.01
    with pytest.raises(InexactSumError, match="do not sum"):
        graph.wrap(images, representation, wrong)


def test_structural_reads_are_listed(vit_graph):
    _, graph, _ = vit_graph
    assert any("blockwise_linear" in site for site in graph.structural)


def test_early_poolings_check_runs_on_the_example_while_recording():
    """An average-pooled ViT without a class token pools early; its per-batch check that the trunk after the
    pool is still a per-token multiple of the unit tail read the batch and stopped the recording (found by
    ``test_properties_hold_on_the_graph``). It runs on the example; the graph sums exactly on new images."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=16, num_heads=1,
                              patch_size=16, img_size=32, class_token=False, global_pool="avg", reg_tokens=4,
                              fc_norm=False, num_classes=7).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    decomposer = trace_and_decompose(model)
    example, images = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for level in LEVELS:
        graph = decomposer.compiled(level, example)
        assert "early pooling's per-token multiple" in graph.checks
        assert_sums_to(graph.decompose(images), pre_logits(model, images), level)


def test_a_decision_on_the_batch_refuses_to_record():
    with pytest.warns(UserWarning, match="could not trace into gate"):
        decomposer = trace_and_decompose(gated_model())
    with pytest.raises(GraphCaptureError, match=r"reads a value of the batch.*models.py:\d+ \(forward"):
        decomposer.compiled("head", torch.randn(2, 3, 8, 8))


def test_graphs_option_records_once_per_signature_and_equals_the_interpreter():
    model, size = matrix_model("swin_tiny_patch4_window7_224")
    decomposer, graphs = trace_and_decompose(model), trace_and_decompose(model, graphs=True)
    images = torch.randn(2, *size, dtype=torch.float64)
    for level in ("head", "token"):
        expected = decomposer(images, level=level)
        for call in range(2):
            got = graphs(images + call, level=level)
            assert graphs.last_path is CallPath.GRAPH
            assert got.labels == expected.labels
        assert torch.allclose(got.components, decomposer(images + 1, level=level).components, rtol=0, atol=1e-12)
    assert graphs.graphs.recordings == 2  # one per level, not per call
    assert decomposer.last_path is CallPath.INTERPRETER


def test_graphs_option_falls_back_visibly_where_no_graph_can_record():
    with pytest.warns(UserWarning, match="could not trace into gate"):
        decomposer = trace_and_decompose(gated_model(), graphs=True)
    images = torch.randn(2, 3, 8, 8)
    with pytest.warns(GraphFallbackWarning, match="run in the interpreter"):
        dec = decomposer(images, level="head")
    assert decomposer.last_path is CallPath.INTERPRETER
    assert torch.allclose(dec.components.sum(0), dec.representation, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphFallbackWarning)  # warned once per signature
        decomposer(images, level="head")
    assert decomposer.graphs.recordings == 0
