"""Attention on the trunk (attention pooling with nn.MultiheadAttention): weights frozen, exact sums."""
import pytest
import torch
from torch import nn

from decompose import trace_and_decompose


class _AttentionPooled(nn.Module):
    """Patch embedding, one MLP block, and a learned query pooling the tokens with nn.MultiheadAttention."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.query = nn.Parameter(torch.randn(1, 1, 16))
        self.pool = nn.MultiheadAttention(16, 2, batch_first=batch_first)
        nn.init.normal_(self.pool.in_proj_bias)
        nn.init.normal_(self.pool.out_proj.bias)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.mlp(x)
        query = self.query.expand(x.shape[0], -1, -1)
        if not self.batch_first:
            x, query = x.transpose(0, 1), query.transpose(0, 1)
        pooled = self.pool(query, x, x, need_weights=False)[0]
        return (pooled if self.batch_first else pooled.transpose(0, 1)).flatten(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_pool_on_the_trunk_is_frozen_and_its_biases_are_one_component(batch_first):
    torch.manual_seed(0)
    model = _AttentionPooled(batch_first).eval().double()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    dec = trace_and_decompose(model)(images, level="branch")
    with torch.no_grad():  # nn.MultiheadAttention may take its fused path here: equal up to rounding
        torch.testing.assert_close(dec.representation, model(images), rtol=1e-12, atol=1e-12)
    assert dec.relative_error() <= 1e-12
    assert "pool.bias" in dec.keys  # the value bias through the frozen weights, and out_proj's bias
