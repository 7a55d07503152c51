"""Verdicts and orderings: the helpers every notebook's Predict and Learn cells use."""
import pytest

from labkit.claims import Spread, compare, verdict


def test_verdict_names_the_prediction_and_the_measurement():
    assert verdict(True, "x < 1", "0.5").startswith("✓ prediction held: predicted x < 1; measured 0.5")
    missed = verdict(False, "x < 1", "1.5")
    assert missed.startswith("✗ prediction missed") and "measured 1.5" in missed


def test_an_ordering_needs_a_gap_larger_than_the_spread_and_three_seeds():
    a, b = Spread([1.0, 1.1, 1.05]), Spread([2.0, 2.1, 1.9])
    assert compare(a, b, "a", "b").better == "a"                              # losses: lower wins
    assert compare(a, b, "a", "b", lower_is_better=False).better == "b"       # accuracies: higher wins
    overlapping = compare(Spread([1.0, 1.5, 1.2]), Spread([1.3, 1.4, 1.35]), "a", "b")
    assert not overlapping.decided and overlapping.better is None
    assert "no difference measurable" in str(overlapping)
    assert not compare(Spread([1.0, 1.0]), Spread([5.0, 5.0]), "a", "b").decided, "2 seeds never decide"


def test_an_empty_spread_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        Spread([])
