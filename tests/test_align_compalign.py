"""CompAlign: planted maps are recovered; the penalty, chunking and files behave."""
import pytest
import torch

from align import AlignerMismatch, CompAlign, TensorAlignmentData, TrainingOptions, train_compalign
from align.compalign import semi_orthogonal
from decompose import ComponentLabel


def labels(count):
    return [ComponentLabel(f"blocks.{i}.attn", "attention", i, 0) for i in range(count)]


def planted_pairs(count, d_model, d_clip, images, noise, seed=0):
    """Components [C, N, D] and normalised targets from planted semi-orthogonal maps [C, D, d_clip]."""
    generator = torch.Generator().manual_seed(seed)
    maps = semi_orthogonal(count, d_model, d_clip, generator)
    components = torch.randn(count, images, d_model, generator=generator)
    targets = torch.einsum("cnd,cde->ne", components, maps) + noise * torch.randn(images, d_clip, generator=generator)
    return components, torch.nn.functional.normalize(targets, dim=-1), maps


@pytest.mark.parametrize("d_model, d_clip", [(8, 6), (6, 8)])
def test_planted_maps_are_recovered(d_model, d_clip):
    components, targets, maps = planted_pairs(4, d_model, d_clip, images=1024, noise=0.01)
    data = TensorAlignmentData(components, targets, labels(4), batch_size=64, heldout_fraction=0.2)
    options = TrainingOptions(lr=1e-2, max_epochs=200, patience=10, progress=False, device="cpu")
    aligner, report = train_compalign(data, options)
    map_error = (aligner.weights.detach() - maps).norm(dim=(1, 2)) / maps.norm(dim=(1, 2))
    print(f"D={d_model} d={d_clip}: held-out cosine {report.heldout_cosine:.6f}, "
          f"relative map errors {map_error.tolist()}, epochs {report.epochs}")
    assert report.heldout_cosine > 0.999
    assert map_error.max() < 0.03
    assert max(report.orthogonality_deviation.values()) < 1e-3
    assert set(report.orthogonality_deviation) == {label.key for label in labels(4)}


def test_penalty_uses_gram_of_smaller_side():
    for d_model, d_clip in [(5, 3), (3, 5)]:
        aligner = CompAlign(labels(2), d_model, d_clip)
        assert aligner.orthogonality_deviation().abs().max() < 1e-10  # semi-orthogonal init
        with torch.no_grad():
            aligner.weights.mul_(2.0)  # Gram = 4 I on the smaller side: ‖3 I‖² / m² = 9 / m
        m = min(d_model, d_clip)
        torch.testing.assert_close(aligner.orthogonality_deviation(), torch.full((2,), 9.0 / m))


def test_chunked_maps_equal_one_einsum():
    generator = torch.Generator().manual_seed(1)
    aligner = CompAlign(labels(7), 4, 3, component_chunk=3, generator=generator)
    components = torch.randn(7, 5, 4, generator=generator, dtype=torch.float64).to(torch.float16)
    expected = torch.einsum("cbd,cde->be", components.float(), aligner.weights) + aligner.bias
    torch.testing.assert_close(aligner(components), expected)
    torch.testing.assert_close(aligner.map_components(components).sum(0) + aligner.bias, expected)
    torch.testing.assert_close(aligner.map_component(2, components[2]), aligner.map_components(components)[2])


def test_save_load_round_trip_and_refusals(tmp_path):
    aligner = CompAlign(labels(3), 4, 6, model="vit_tiny", level="head", clip={"identity": "toy"})
    with torch.no_grad():
        aligner.bias.normal_()
    aligner.training_summary = {"heldout_cosine": 0.5}
    aligner.save(tmp_path)
    loaded = CompAlign.load(tmp_path, model="vit_tiny", level="head", labels=labels(3))
    assert torch.equal(loaded.weights, aligner.weights) and torch.equal(loaded.bias, aligner.bias)
    assert loaded.labels == aligner.labels and loaded.clip == {"identity": "toy"}
    assert loaded.training_summary == {"heldout_cosine": 0.5}
    with pytest.raises(AlignerMismatch, match="model='vit_tiny'"):
        CompAlign.load(tmp_path, model="deit_small")
    with pytest.raises(AlignerMismatch, match="level='head'"):
        CompAlign.load(tmp_path, level="branch")
    with pytest.raises(AlignerMismatch, match="components differ"):
        CompAlign.load(tmp_path, labels=labels(4))
    with pytest.raises(AlignerMismatch, match="do not fit"):
        loaded(torch.zeros(3, 2, 5))


def test_chunked_penalty_backward_gives_the_full_gradient():
    from align.training import cosine_loss, orthogonality_term, training_step_backward

    generator = torch.Generator().manual_seed(2)
    aligner = CompAlign(labels(5), 6, 4, component_chunk=2, generator=generator)
    with torch.no_grad():
        aligner.weights.add_(0.3 * torch.randn(aligner.weights.shape, generator=generator))
    components, targets = torch.randn(5, 8, 6, generator=generator), torch.randn(8, 4, generator=generator)
    loss = training_step_backward(aligner, components, targets, orthogonality_weight=0.7)
    chunked = aligner.weights.grad.clone()
    aligner.weights.grad = None
    full = cosine_loss(aligner, components, targets).mean() + 0.7 * orthogonality_term(aligner)
    full.backward()
    torch.testing.assert_close(chunked, aligner.weights.grad)
    assert abs(loss - float(full.detach())) < 1e-5
