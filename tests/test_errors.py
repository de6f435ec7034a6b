"""Bad input gets an error (or warning) that names the problem and the fix."""
import pytest
import timm
import torch
from torch import nn

from decompose import trace_and_decompose
from tests.models import gated_model
from tracer import NonlinearTrunkError, TracingError


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32).eval()


def test_train_mode_warns_and_leaves_model_in_train_mode(vit):
    vit.train()
    try:
        with pytest.warns(UserWarning, match="train mode.*eval-mode copy"):
            decomposer = trace_and_decompose(vit)
        assert vit.training and all(m.training for m in vit.modules())
        dec = decomposer(torch.randn(2, 3, 32, 32))
        assert dec.relative_error() < 1e-5
        vit.eval()
        with torch.no_grad():  # the decomposition is of the eval-mode model
            expected = vit.forward_head(vit.forward_features(torch.zeros(0, 3, 32, 32)), pre_logits=True)
        assert expected.shape[-1] == dec.representation.shape[-1]
    finally:
        vit.eval()


def test_model_with_an_eval_cache_filled_with_gradients_on():
    """LeViT, EfficientFormer and TinyViT keep their attention biases in an eval-mode cache; a forward
    with gradients on fills it with a tensor deepcopy refuses. The copy detaches it; the model keeps its own."""

    class CachedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, 4)
            self.bias = nn.Parameter(torch.randn(4))
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, images):
            x = self.embed(images).flatten(2).transpose(1, 2)
            if self.training:
                bias = 2 * self.bias
            else:
                bias = self.cache.setdefault(str(x.device), 2 * self.bias)
            return (x + torch.tanh(x) + bias).mean(1)

    model = CachedBias().eval()
    images = torch.randn(2, 3, 16, 16)
    expected = model(images)
    cached = model.cache["cpu"]
    assert cached.grad_fn is not None
    dec = trace_and_decompose(model)(images, level="branch")
    assert torch.allclose(dec.representation, expected.detach(), atol=1e-6)
    assert dec.relative_error() < 1e-6
    assert model.cache["cpu"] is cached


@pytest.mark.parametrize("shape, match", [
    ((3, 32, 32), "4-D batch"),
    ((2, 3, 48, 48), "failed on input of shape .*pretrained_cfg gives input_size"),
    ((2, 1, 32, 32), "failed on input of shape"),
])
def test_wrong_input_shape(vit, shape, match):
    with pytest.raises(ValueError, match=match):
        trace_and_decompose(vit)(torch.randn(*shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(vit, bad):
    images = torch.randn(3, 3, 32, 32)
    images[1, 0, 4, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or inf .*batch indices \[1\]"):
        trace_and_decompose(vit)(images)


def test_dtype_mismatch(vit):
    with pytest.raises(ValueError, match="images are torch.float64 but the model is torch.float32"):
        trace_and_decompose(vit)(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_unknown_level(vit):
    with pytest.raises(ValueError, match="level must be one of"):
        trace_and_decompose(vit)(torch.randn(1, 3, 32, 32), level="neuron")


class _Residual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _NonlinearBetweenBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.block1, self.block2 = _Residual(8), _Residual(8)
        self.squash = nn.Tanh()

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = self.squash(self.block1(x))
        return self.block2(x).mean(1)


def test_nonlinearity_on_trunk_names_node_and_module():
    with pytest.raises(NonlinearTrunkError, match=r"tanh.*in module squash.*nonlinear op on the residual trunk"):
        trace_and_decompose(_NonlinearBetweenBlocks())(torch.randn(1, 3, 8, 8))


def test_cut_nonlinear_trunk_starts_the_decomposition_after_it():
    model = _NonlinearBetweenBlocks().eval()
    dec = trace_and_decompose(model, cut_nonlinear_trunk=True)(torch.randn(2, 3, 8, 8), level="head")
    assert dec.relative_error() < 1e-5
    embedding = [label for label in dec.labels if label.kind == "embedding"]
    assert [label.name for label in embedding] == ["squash"]
    assert not any(label.name.startswith("block1") for label in dec.labels)


class _ValueControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 4, 4)

    def forward(self, images):
        x = self.embed(images)
        if x.sum() > 0:  # depends on tensor values: not traceable
            x = x * 2
        return x.mean((2, 3))


def test_tracing_failure_in_own_forward_names_it():
    with pytest.raises(TracingError, match="could not trace the model's own forward.*register_notrace"):
        trace_and_decompose(_ValueControlFlow())


def test_untraceable_submodule_is_named_and_made_opaque():
    model = gated_model()
    with pytest.warns(UserWarning, match=r"could not trace into gate \(ValueGate"):
        decomposer = trace_and_decompose(model)
    dec = decomposer(torch.randn(2, 3, 8, 8), level="head")
    assert "gate" in dec.keys and dec.relative_error() < 1e-5


def test_model_is_not_modified(vit):
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(images)
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    flags = [(p.requires_grad, p.grad) for p in vit.parameters()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules()]
    trace_and_decompose(vit)(images, level="head")
    with torch.no_grad():
        assert torch.equal(vit(images), before)
    assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items())
    assert [(p.requires_grad, p.grad) for p in vit.parameters()] == flags
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules()] == hooks
    assert not vit.training


class _MaxPooledShortcut(nn.Module):
    """A Hiera-style downsampling block: shortcut ``max-pool(proj(norm(x)))``, branch a gated MLP of
    ``norm(x)`` pooled alike; neither operand of its add reaches ``x`` affinely."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj, self.fc1, self.gate, self.fc2 = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        x_norm = self.norm(x)
        shortcut = self.proj(x_norm).view(x.shape[0], 2, -1, x.shape[-1]).amax(dim=1)  # max-pool over token pairs
        hidden = torch.relu(self.fc1(x_norm)) * torch.sigmoid(self.gate(x_norm))
        branch = self.fc2(hidden).view(x.shape[0], 2, -1, x.shape[-1]).mean(dim=1)
        return shortcut + branch


class _HieraLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.block1, self.down, self.block2 = _Residual(8), _MaxPooledShortcut(8), _Residual(8)

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)
        return self.block2(self.down(self.block1(x))).mean(1)


def test_a_max_pooled_shortcut_is_an_error_naming_it():
    with pytest.raises(NonlinearTrunkError, match=r"residual add.*amax.*cut_nonlinear_trunk=True"):
        trace_and_decompose(_HieraLike().eval())(torch.randn(1, 3, 16, 16))


def test_cut_at_a_max_pooled_shortcut_gives_an_explicit_component():
    model = _HieraLike().eval()
    dec = trace_and_decompose(model, cut_nonlinear_trunk=True)(torch.randn(2, 3, 16, 16), level="head")
    assert dec.relative_error() < 1e-5
    embedding = [label for label in dec.labels if label.kind == "embedding"]
    assert len(embedding) == 1 and embedding[0].node.startswith("amax")
    assert "everything before" in embedding[0].note and "amax" in embedding[0].note
    assert sorted(label.name.split("@")[0] for label in dec.labels if label.kind == "branch") == ["block2", "down"]
    assert not any(label.name.startswith(("block1", "embed")) for label in dec.labels)
