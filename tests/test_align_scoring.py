"""Scoring and TextSpan recover planted structure."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align import (
    PropertyScorer,
    property_basis,
    property_scores,
    rank_components,
    specific_scores,
    text_span,
    variance_explained,
)

D_CLIP = 24


def unit_rows(count, generator):
    return torch.nn.functional.normalize(torch.randn(count, D_CLIP, generator=generator), dim=-1)


def planted_aligned(generator, images=400, components=6, planted=2, other=4):
    """Aligned outputs [C, N, d] where only ``planted`` varies along property P's texts and only
    ``other`` along property Q's; the rest vary outside both spans (plus a constant component 0)."""
    texts_p, texts_q = unit_rows(4, generator), unit_rows(4, generator)
    basis_pq = property_basis(torch.cat([texts_p, texts_q]))                  # [8, d]
    outside = torch.eye(D_CLIP) - basis_pq.T @ basis_pq                      # projector off both spans
    aligned = torch.randn(components, images, D_CLIP, generator=generator) @ outside
    aligned[0] = torch.randn(D_CLIP, generator=generator)                    # constant (a bias, a class token)
    aligned[planted] += torch.randn(images, 4, generator=generator) @ texts_p * 3
    basis_p = property_basis(texts_p)
    texts_q_off_p = texts_q - texts_q @ basis_p.T @ basis_p                   # Q's variation leaves P's span alone
    aligned[other] += torch.randn(images, 4, generator=generator) @ texts_q_off_p * 3
    return aligned, texts_p, texts_q


def test_planted_component_ranks_first_for_its_property_only():
    generator = torch.Generator().manual_seed(0)
    aligned, texts_p, texts_q = planted_aligned(generator)
    scores = {"p": property_scores(aligned, texts_p), "q": property_scores(aligned, texts_q)}
    assert int(scores["p"].argmax()) == 2 and int(scores["q"].argmax()) == 4
    torch.testing.assert_close(scores["p"][2], torch.tensor(1.0), atol=1e-5, rtol=0)
    assert scores["p"][0] == 0  # constant component: no correlation, no error
    ranked = rank_components(scores, [f"c{i}" for i in range(6)], "p")
    assert ranked[0].key == "c2" and ranked[0].rival == "q"
    scorer = PropertyScorer({"p": property_basis(texts_p), "q": property_basis(texts_q)})
    scorer.update(aligned)
    assert scorer.constant().tolist() == [True] + [False] * 5
    ranked = rank_components(scorer.scores(), [f"c{i}" for i in range(6)], "p", constant=scorer.constant())
    assert ranked[0].key == "c2" and ranked[-1].key == "c0"  # a constant is tied to no property
    assert rank_components(scores, [f"c{i}" for i in range(6)], "q")[0].key == "c4"
    explained = variance_explained(aligned, texts_p)
    assert int(explained.argmax()) == 2 and explained[2] > 0.5 and explained[0] == 0
    assert explained[[1, 3, 5]].abs().max() < 1e-5  # those vary only outside P's span


def test_specific_score_discounts_components_shared_by_properties():
    scores = {"p": torch.tensor([0.9, 0.6, 0.35]), "q": torch.tensor([0.8, -0.3, 0.1]),
              "r": torch.tensor([0.1, 0.0, -1.0])}
    torch.testing.assert_close(specific_scores(scores, "p"), torch.tensor([0.1, 0.6, 0.25]))
    assert [row.index for row in rank_components(scores, ["a", "b", "c"], "p")] == [1, 2, 0]
    assert [row.index for row in rank_components(scores, ["a", "b", "c"], "p", specific=False)] == [0, 1, 2]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), split=st.integers(1, 29))
def test_streamed_scores_do_not_depend_on_batching(seed, split):
    generator = torch.Generator().manual_seed(seed)
    aligned = torch.randn(3, 30, D_CLIP, generator=generator) + 5  # offset: tests the shifted sums
    bases = {"p": property_basis(unit_rows(3, generator)), "q": property_basis(unit_rows(5, generator))}
    whole, streamed = PropertyScorer(bases), PropertyScorer(bases)
    whole.update(aligned)
    streamed.update(aligned[:, :split])
    streamed.update(aligned[:, split:])
    for name in bases:
        torch.testing.assert_close(streamed.scores()[name], whole.scores()[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(streamed.variance_explained()[name], whole.variance_explained()[name],
                                   atol=1e-5, rtol=0)


def test_property_basis_is_orthonormal_and_spans_the_texts():
    generator = torch.Generator().manual_seed(3)
    texts = unit_rows(5, generator)
    texts = torch.cat([texts, texts[:2].sum(0, keepdim=True)])  # a dependent description adds no dimension
    basis = property_basis(texts)
    assert basis.shape == (5, D_CLIP)
    torch.testing.assert_close(basis @ basis.T, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(texts @ basis.T @ basis, texts, atol=1e-5, rtol=0)


def test_textspan_recovers_planted_texts_in_order():
    generator = torch.Generator().manual_seed(0)
    bank = unit_rows(60, generator)                                  # [T, d] text embeddings
    planted = [17, 3, 42]                                            # strongest first
    strengths = torch.tensor([3.0, 2.0, 1.2])
    coefficients = torch.randn(500, 3, generator=generator) * strengths
    aligned = coefficients @ bank[planted] + 0.05 * torch.randn(500, D_CLIP, generator=generator) + 2.0
    texts = [f"text {i}" for i in range(60)]
    result = text_span(aligned, bank, texts, count=3)
    print(f"TextSpan picks {result.indices}, variance explained {result.variance_explained}")
    assert result.indices == planted
    assert result.texts == [texts[i] for i in planted]
    assert result.cumulative[-1] > 0.95
    assert result.variance_explained == sorted(result.variance_explained, reverse=True)
