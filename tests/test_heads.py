"""Heads are the attention axes that split a projection's channels, whatever else the layout holds.

Outlook attention's weights are ``[B, heads, positions, k², k²]``: its positions are a batch of
windows, not heads; SAM folds windows and heads into one batch axis. The number of heads of every
attention equals its module's own ``num_heads``.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from decompose import trace_and_decompose
from tests.models import TIMM_MODELS, input_size, tiny_open_clip_vision
from tests.test_architectures import FAMILIES, IMAGE_SIZES, OPTIONS, _image_size
from tracer.tracing import module_path

MODELS = {name: (lambda name=name: timm.create_model(name, **TIMM_MODELS[name])) for name in TIMM_MODELS}
MODELS.update(FAMILIES)
MODELS["tiny_open_clip_vision"] = tiny_open_clip_vision


def _declared_heads(model: nn.Module, path: str) -> int:
    """``num_heads`` (or ``heads``) of the nearest module on ``path`` (a birth node's module) that has one."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        module = model.get_submodule(".".join(parts[:end]))
        heads = getattr(module, "num_heads", getattr(module, "heads", None))  # Hiera calls it heads
        if isinstance(heads, int):
            return heads
    raise AssertionError(f"no module on the path {path} has num_heads")


def _size(name: str, model: nn.Module) -> tuple[int, int]:
    if name in TIMM_MODELS:
        return tuple(input_size(model, TIMM_MODELS[name])[1:])
    size = 64 if name == "tiny_open_clip_vision" else IMAGE_SIZES.get(name) or _image_size(model)
    return size, size


@pytest.mark.parametrize("name", list(MODELS))
def test_every_attention_has_its_modules_number_of_heads(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    decomposer = trace_and_decompose(model, **OPTIONS.get(name, {}))
    dec = decomposer(torch.randn(1, 3, *_size(name, model)), level="head")
    assert dec.relative_error() <= 1e-5
    module_of = {node.name: module_path(node) for node in decomposer.graph_module.graph.nodes}
    heads: dict[str, set] = {}
    for label in dec.labels:
        if label.kind == "attention":
            heads.setdefault(module_of[label.node], set()).add(label.head)
    for attention, found in heads.items():
        assert found == set(range(_declared_heads(model, attention))), f"{attention}: heads {sorted(found)}"


class OutlookAttention(nn.Module):
    """Outlook attention: per position p and head h, weights [k², k²] from a linear map of the token
    at p, over the values of p's k×k neighbourhood (unfolded); the outputs are folded back."""

    def __init__(self, dim: int, num_heads: int, kernel: int = 3):
        super().__init__()
        self.num_heads, self.kernel = num_heads, kernel
        self.v = nn.Linear(dim, dim)
        self.attn = nn.Linear(dim, kernel ** 4 * num_heads)
        self.proj = nn.Linear(dim, dim)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weights [B, heads, P, k², k²] and values [B, heads, P, k², d] of ``x`` [B, H, W, C]."""
        batch, height, width, channels = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        k, heads = self.kernel, self.num_heads
        v = F.unfold(self.v(x).permute(0, 3, 1, 2), k, padding=k // 2)         # [B, C·k², P]
        v = v.reshape(batch, heads, channels // heads, k * k, height * width).permute(0, 1, 4, 3, 2)
        a = self.attn(x).reshape(batch, height * width, heads, k * k, k * k).permute(0, 2, 1, 3, 4)
        return a.softmax(-1), v

    def tail(self, out: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``weights @ values`` [N, heads, P, k², d] -> folded and projected (no bias): [N, H, W, C]."""
        n, heads, positions, d = out.shape[0], out.shape[1], out.shape[2], out.shape[4]
        folded = out.permute(0, 1, 4, 3, 2).reshape(n, heads * d * self.kernel ** 2, positions)
        folded = F.fold(folded, (height, width), self.kernel, padding=self.kernel // 2)   # [N, C, H, W]
        return F.linear(folded.permute(0, 2, 3, 1), self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, v = self.parts(x)
        return self.tail(a @ v, x.shape[1], x.shape[2]) + self.proj.bias


class TinyOutlooker(nn.Module):
    """Patch embedding, one residual outlook-attention block, mean over positions: [B, C]."""

    def __init__(self, dim: int = 8, num_heads: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.LayerNorm(dim)
        self.attn = OutlookAttention(dim, num_heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images).permute(0, 2, 3, 1)                                 # [B, H, W, C]
        return (x + self.attn(self.norm(x))).mean((1, 2))


def test_outlook_attention_positions_are_windows_not_heads():
    """heads == num_heads; every level sums exactly; at level token each (position p, key j) of head h
    is a source: exactly the planted A[.., h, p, :, j] ⊗ V[.., h, p, j, :] through the tail. (Its image
    position is not found yet: each token feeds k² windows' keys, which the position codes cannot tell.)"""
    torch.manual_seed(0)
    model = TinyOutlooker().double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    decomposer = trace_and_decompose(model)
    decs = {level: decomposer(images, level=level) for level in ("branch", "head", "token")}
    for level, dec in decs.items():
        assert dec.relative_error() <= 1e-12, level
        torch.testing.assert_close(dec.representation, model(images), rtol=1e-12, atol=1e-12)
    head = decs["head"]
    assert {label.head for label in head.labels if label.kind == "attention"} == {0, 1}
    token = decs["token"]
    rows = [i for i, label in enumerate(token.labels) if label.kind == "attention"]
    grid, k = 4, 3
    positions, keys = grid * grid, k * k
    assert [(token.labels[i].head, token.labels[i].token) for i in rows] == \
        [(h, s) for h in range(2) for s in range(positions * keys)]

    with torch.no_grad():  # the planted truth, from the module's own weights and values
        x = model.norm(model.stem(images).permute(0, 2, 3, 1))
        a, v = model.attn.parts(x)                                        # [B, h, P, k², k²], [B, h, P, k², d]
        source = torch.eye(2 * positions * keys, dtype=a.dtype).view(-1, 1, 2, positions, 1, keys)
        per_source = (a.unsqueeze(0) * source) @ v.unsqueeze(0)          # [S, B, h, P, k², d]
        expected = model.attn.tail(per_source.flatten(0, 1), grid, grid).mean((1, 2)).unflatten(0, (-1, 2))
    torch.testing.assert_close(token.components[rows], expected, rtol=1e-10, atol=1e-12)

    for i in rows:  # a position, where one is found, is the image position of p's neighbour j
        label = token.labels[i]
        p, j = divmod(label.token, keys)
        row, col = p // grid + j // k - 1, p % grid + j % k - 1
        inside = 0 <= row < grid and 0 <= col < grid
        assert label.position in (None, (row, col) if inside else "padding"), (label.token, label.position)
