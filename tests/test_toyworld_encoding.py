"""The encoded gate: a factor counts as encoded when a held-out probe clears chance by half the headroom,
and the demo's report lists a factor that is not encoded as such instead of checking claims on it."""
import pytest
import torch

from toyworld.demo_records import TargetResult
from toyworld.demo_report import encoded_in, not_encoded_note
from toyworld.encoding import encoded_factors, encoded_threshold, factor_probes
from toyworld.generator import FACTORS


@pytest.mark.parametrize("values, threshold", [(8, 0.5625), (4, 0.625), (5, 0.6), (2, 0.75)])
def test_thresholds_are_chance_plus_half_the_headroom(values, threshold):
    assert encoded_threshold(values) == pytest.approx(threshold)


def planted_features(count: int = 1500, seed: int = 0):
    """Features [N, 16] in which shape and scene are linearly readable and the other factors are not."""
    generator = torch.Generator().manual_seed(seed)
    factors = {name: torch.randint(len(values), (count,), generator=generator) for name, values in FACTORS.items()}
    features = torch.randn(count, 16, generator=generator)
    features[:, :8] += 4 * torch.nn.functional.one_hot(factors["shape"], 8)
    features[:, 8:12] += 4 * torch.nn.functional.one_hot(factors["scene"], 4)
    return features, factors


def test_planted_factors_are_encoded_and_the_others_are_not():
    features, factors = planted_features()
    probes = factor_probes(features, factors, torch.arange(1000), torch.arange(1000, 1500))
    assert encoded_factors(probes) == ["shape", "scene"]
    for name, probe in probes.items():
        assert probe["chance"] == pytest.approx(1 / len(FACTORS[name]))
        assert probe["encoded"] == (probe["probe"] >= probe["threshold"])
    assert probes["pattern"]["probe"] < probes["pattern"]["threshold"]


def test_a_factor_that_is_not_encoded_is_reported_as_not_encoded():
    features, factors = planted_features()
    probes = factor_probes(features, factors, torch.arange(1000), torch.arange(1000, 1500))
    result = TargetResult("planted", [], probes, {}, {}, {}, torch.zeros(0), {}, {}, {}, None, None)
    assert encoded_in(result) == ["shape", "scene"]
    note = not_encoded_note(result)
    for name in ("colour", "pattern", "position", "size"):
        assert f"{name} {probes[name]['probe']:.2f} (needs {probes[name]['threshold']:.3g})" in note
    assert "shape" not in note and "scene" not in note
    assert not_encoded_note(result, ("shape", "scene")) == ""


def test_claims_are_checked_on_encoded_factors_only():
    """top-k losing to random-k on a factor the model does not encode leaves the claim holding, and the
    report names that factor as not encoded, with its probe."""
    from align.report import Report
    from toyworld.demo_records import DemoSettings
    from toyworld.demo_report import _probe

    features, factors = planted_features()
    probes = factor_probes(features, factors, torch.arange(1000), torch.arange(1000, 1500))
    selection = {f: {"k": 3, "top_k": 0.9 if probes[f]["encoded"] else 0.1, "random_k": 0.5, "bottom_k": 0.2}
                 for f in FACTORS}
    result = TargetResult("planted", [], probes, {}, {}, {}, torch.zeros(0), {}, {}, selection, None, None)
    report = Report("gate")
    _probe(report, [result], DemoSettings())
    page = report.render()
    assert "holds</span>: planted: the top-k components beat k random ones for every encoded factor" in page
    assert "better for 2/2 encoded factors: shape, scene" in page and "not checked, not encoded: colour" in page
    selection["scene"].update(top_k=1.0, random_k=1.0)                      # both at the ceiling: a tie, not a loss
    report = Report("gate")
    _probe(report, [result], DemoSettings())
    assert "holds</span>: planted" in report.render() and "tied at the ceiling" in report.render()
    selection["scene"].update(top_k=0.1, random_k=0.5)                      # an encoded factor that loses
    report = Report("gate")
    _probe(report, [result], DemoSettings())
    assert "does NOT hold</span>: planted" in report.render() and "not for scene (0.100 vs 0.500)" in report.render()
