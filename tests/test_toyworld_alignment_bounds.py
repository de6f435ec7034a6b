"""The linear fits that bound CompAlign: a planted CLIP embedding that is linear in the factors' one-hots is
fit exactly from them, and a representation missing one factor falls short by what that factor carries."""
import pytest
import torch

from toyworld.alignment_bounds import alignment_bounds, linear_fit_cosine, one_hot_factors
from toyworld.generator import FACTORS
from toyworld.sample import toy_sample


@pytest.fixture(scope="module")
def planted():
    """(sample, embedding [N, 16] linear in every factor's one-hot)."""
    sample = toy_sample(5, 600)
    generator = torch.Generator().manual_seed(0)
    everything = one_hot_factors(sample, list(FACTORS))
    return sample, everything.float() @ torch.randn(everything.shape[1], 16, generator=generator)


def test_an_embedding_linear_in_the_factors_is_fit_exactly_from_their_one_hots(planted):
    sample, embedding = planted
    train, test = torch.arange(400), torch.arange(400, 600)
    assert linear_fit_cosine(one_hot_factors(sample, list(FACTORS)), embedding, train, test) > 0.99


def test_a_representation_missing_a_factor_is_bounded_below_one_holding_them_all(planted):
    sample, embedding = planted
    train, test = torch.arange(400), torch.arange(400, 600)
    without_position = [f for f in FACTORS if f != "position"]
    representation = one_hot_factors(sample, without_position).float() @ torch.randn(26, 40)
    bounds = alignment_bounds(representation, embedding, sample, train, test, without_position)
    assert bounds["all_factors"] > 0.99
    assert bounds["representation"] == pytest.approx(bounds["encoded_factors"], abs=0.02)
    assert bounds["encoded_factors"] < bounds["all_factors"] - 0.05


def test_a_target_that_encodes_nothing_has_no_encoded_factor_fit(planted):
    sample, embedding = planted
    bounds = alignment_bounds(torch.randn(600, 8), embedding, sample, torch.arange(400), torch.arange(400, 600), [])
    assert set(bounds) == {"representation", "encoded_factors", "all_factors"}
    assert bounds["encoded_factors"] != bounds["encoded_factors"]    # nan: nothing to fit from
