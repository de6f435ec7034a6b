"""On a GPU the decomposer must make the same plan and the same components as on the CPU.

Much of the graph analysis runs inside ``try`` blocks that fall back to a slower but still exact
path when a check fails; a tensor left on the wrong device would fail such a check silently.
So these tests compare the plans' structure too, not only the sums. Skipped without CUDA.
"""
import copy

import pytest
import timm
import torch

from decompose import trace_and_decompose
from decompose.compiled import CallPath
from tests.models import TIMM_MODELS, input_size

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LEVELS = ("branch", "head", "token")


def plan_summary(decomposer, images: torch.Tensor) -> dict:
    """What the analysis decided, by node name (roles, compaction, pooling, key positions)."""
    plan = decomposer.plan(images)
    summary = {"roles": sorted((n.name, role.name) for n, role in plan.roles.items()),
               "births": sorted((n.name, b.kind) for n, b in plan.births.items()),
               "compact": None, "pooling": None}
    if plan.compact is not None:
        summary["compact"] = sorted(n.name for n in (*plan.compact.slices, *plan.compact.nodes))
    pooling = plan.pooling
    if pooling is not None:
        summary["pooling"] = {
            "nodes": sorted((n.name, p.token_axes, p.small_shape, p.slots.tolist()) for n, p in pooling.nodes.items()),
            "static": sorted(n.name for n in pooling.static),
            "branches": sorted((b.name, p.node.name, [(n.name, step) for n, step in p.steps],
                                None if p.heads is None else p.heads.tolist(),
                                None if p.within is None else p.within.tolist())
                               for b, p in pooling.branches.items())}
    return summary


def matrix_row_in_float64(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the model matrix's row ``name`` in float64, three images for it)."""
    torch.manual_seed(0)
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().double()
    images = torch.randn(3, *input_size(model, kwargs), generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    return model, images


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_cuda_plan_and_components_match_cpu(name):
    model, images = matrix_row_in_float64(name)
    on_cpu = trace_and_decompose(model)
    on_gpu = trace_and_decompose(copy.deepcopy(model).cuda())
    assert plan_summary(on_gpu, images.cuda()) == plan_summary(on_cpu, images)
    for level in LEVELS:
        expected = on_cpu(images, level=level)
        found = on_gpu(images.cuda(), level=level)
        assert found.labels == expected.labels, level
        assert found.relative_error() <= 1e-10, level
        scale = expected.representation.abs().max()
        assert torch.allclose(found.components.cpu(), expected.components, rtol=0, atol=1e-10 * scale), level


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "swin_tiny_patch4_window7_224",
                                  "maxvit_tiny_tf_224"])
def test_cuda_float32_sums_to_the_output(name):
    """float32 on the GPU, TF32 off (with TF32 products the components and the output round apart)."""
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, **kwargs).eval().cuda()
    images = torch.randn(4, *input_size(model, kwargs), device="cuda")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        decomposer = trace_and_decompose(model)
        for level in LEVELS:
            assert decomposer(images, level=level).relative_error() <= 1e-4, level
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_cuda_recorded_graphs_match_the_cpu_interpreter(name):
    """The compiled path on the GPU (``graphs=True``: each call runs its recorded graph), level by level."""
    model, images = matrix_row_in_float64(name)
    on_cpu = trace_and_decompose(model)
    on_gpu = trace_and_decompose(copy.deepcopy(model).cuda(), graphs=True)
    for level in LEVELS:
        expected = on_cpu(images, level=level)
        for _ in range(2):  # the first call records, the second runs the recorded graph
            found = on_gpu(images.cuda(), level=level)
            assert on_gpu.last_path is CallPath.GRAPH, level
        assert found.labels == expected.labels, level
        scale = expected.representation.abs().max()
        assert torch.allclose(found.components.cpu(), expected.components, rtol=0, atol=1e-10 * scale), level
