"""Ground-truth probes of the demo: a planted factor-carrying component is found by the probe."""
import torch

from toyworld.validation import linear_probe_accuracy, selection_probe


def test_probe_reads_a_linearly_encoded_label_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(900, 16, generator=generator)
    labels = features[:, :4].argmax(1)
    assert linear_probe_accuracy(features[:600], labels[:600], features[600:], labels[600:], 4) > 0.85
    noise = torch.randn(900, 16, generator=generator)
    assert linear_probe_accuracy(noise[:600], labels[:600], noise[600:], labels[600:], 4) < 0.4


def test_selection_probe_ranks_the_planted_component_above_random_and_bottom():
    generator = torch.Generator().manual_seed(1)
    components, count, width = 8, 800, 12
    labels = torch.randint(0, 3, (count,), generator=generator)
    data = torch.randn(components, count, width, generator=generator)
    data[5] = torch.nn.functional.one_hot(labels, width).float() * 3 + 0.3 * torch.randn(count, width,
                                                                                         generator=generator)
    order = [5, 0, 1, 2, 3, 4, 6, 7]                       # the planted component first
    train, test = torch.arange(500), torch.arange(500, count)
    result = selection_probe(data, order, labels, train, test, classes=3, k=1, draws=8)
    assert result["top_k"] > 0.95
    assert result["bottom_k"] < 0.5
    assert result["top_k"] > result["random_k"] + 0.3      # random draws rarely hit the one planted row
