"""Trajectory classification: Sohl-Dickstein's ratio criterion and the threshold criterion."""

import math

import numpy as np
import pytest

from vmap_sweep.analysis.classify import converged_mask
from vmap_sweep.errors import ConfigError
from vmap_sweep.study.criterion import classify


def classify_ratio(losses, initial_loss, unstable=False, reference=None):
    """One trajectory through `classify` by the ratio criterion -> (label, score)."""
    labels, scores = classify([losses], [initial_loss], "ratio", unstable=[unstable],
                              references=None if reference is None else [reference])
    return str(labels[0]), float(scores[0])


def classify_threshold(losses, initial_loss, converged_below, not_converged_above=None, unstable=False):
    """One trajectory through `classify` by the threshold criterion -> (label, score)."""
    labels, scores = classify([losses], [initial_loss], "threshold", unstable=[unstable],
                              converged_below=converged_below, not_converged_above=not_converged_above)
    return str(labels[0]), float(scores[0])

# ----------------------------------------------------------------------------- ratio criterion


def test_ratio_converged_score_is_minus_sum_of_ratios():
    losses = np.array([3.0, 2.0, 1.0, 0.5])
    label, score = classify_ratio(losses, 4.0)
    assert label == "converged"
    assert score == pytest.approx(-(losses / 4.0).sum())
    assert score < 0


def test_ratio_not_converged_score_is_sum_of_inverse_ratios():
    losses = np.array([4.0, 6.0, 8.0])
    label, score = classify_ratio(losses, 4.0)
    assert label == "not_converged"
    assert score == pytest.approx(1 + 4 / 6 + 4 / 8)
    assert score > 0


def test_ratio_nonfinite_becomes_cap_and_values_are_clipped():
    # inf and nan -> 1e6; 1e9 clipped to 1e6: each contributes 1e-6 to sum(1/v)
    label, score = classify_ratio([1.0, math.inf, math.nan, 1e9], 1.0)
    assert label == "not_converged"
    assert score == pytest.approx(1.0 + 3e-6, rel=1e-12)


def test_ratio_uses_only_last_twenty_steps():
    # the spike is the 21st value from the end: outside the window
    assert classify_ratio([0.5] * 9 + [100.0] + [0.5] * 20, 1.0)[0] == "converged"
    # the spike is the 20th value from the end: inside, mean (30 + 19 * 0.5) / 20 > 1
    assert classify_ratio([0.5] * 10 + [30.0] + [0.5] * 19, 1.0)[0] == "not_converged"


def test_ratio_short_trajectory_uses_all_values_and_mean_must_be_strictly_below_one():
    assert classify_ratio([0.5, 1.4], 1.0)[0] == "converged"  # mean 0.95
    assert classify_ratio([0.5, 1.5], 1.0)[0] == "not_converged"  # mean 1.0 is not < 1


def test_ratio_unstable_flag_forces_not_converged_and_empty_trajectory():
    label, score = classify_ratio([0.1, 0.1], 1.0, unstable=True)
    assert label == "not_converged" and score == pytest.approx(20.0)
    label, score = classify_ratio([], 1.0, unstable=True)
    assert label == "not_converged" and score == 0.0
    with pytest.raises(ConfigError, match="unstable=True"):
        classify_ratio([], 1.0)


def test_ratio_zero_loss_stays_finite_and_negative():
    label, score = classify_ratio([0.0, 0.0], 2.0)
    assert label == "converged" and score < 0 and math.isfinite(score)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_initial_loss_raises(bad):
    with pytest.raises(ConfigError, match="initial_loss"):
        classify_ratio([1.0], bad)


# ----------------------------------------------------------------------------- threshold criterion


def test_threshold_labels_and_score_signs():
    c, d = 2.0, 10.0
    assert classify_threshold([5.0, 1.0], 5.0, c, d)[0] == "converged"
    assert classify_threshold([5.0, 3.0], 5.0, c, d)[0] == "marginal"
    assert classify_threshold([5.0, 11.0], 5.0, c, d)[0] == "not_converged"
    assert classify_threshold([5.0, math.nan, 1.0], 5.0, c, d)[0] == "not_converged"  # non-finite anywhere
    assert classify_threshold([5.0, math.inf], 5.0, c, d) == ("not_converged", 2.0)
    for final in (0.5, 1.9, 2.0, 5.0, 10.0, 10.5, 50.0):
        label, score = classify_threshold([final], 5.0, c, d)
        assert (score < 0) == (label == "converged"), final
        assert (score > 1) == (label == "not_converged"), final


def test_threshold_score_formula_edges_and_monotone():
    c, d = 2.0, 10.0
    assert classify_threshold([2.0], 5.0, c, d) == ("marginal", 0.0)  # not strictly below
    assert classify_threshold([10.0], 5.0, c, d) == ("marginal", pytest.approx(1.0))
    assert classify_threshold([1.0], 5.0, c, d)[1] == pytest.approx(math.log(0.5) / math.log(5.0))
    assert classify_threshold([1e-9], 5.0, c, d)[1] == -1.0  # clipped
    assert classify_threshold([1e9], 5.0, c, d)[1] == 2.0  # clipped
    finals = np.geomspace(0.1, 100.0, 40)
    scores = [classify_threshold([f], 5.0, c, d)[1] for f in finals]
    assert np.all(np.diff(scores) >= 0)


def test_threshold_flag_empty_and_bad_thresholds():
    assert classify_threshold([0.1], 5.0, 2.0, unstable=True) == ("not_converged", 2.0)
    assert classify_threshold([], 5.0, 2.0, unstable=True) == ("not_converged", 2.0)
    with pytest.raises(ConfigError, match="unstable=True"):
        classify_threshold([], 5.0, 2.0)
    with pytest.raises(ConfigError, match="not_converged_above"):
        classify_threshold([1.0], 5.0, 2.0, not_converged_above=1.0)
    with pytest.raises(ConfigError, match="converged_below"):
        classify_threshold([1.0], 5.0, 0.0)


# ----------------------------------------------------------------------------- grid


def _ragged(seed: int, n: int = 40) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    trajs, flags = [], []
    for _ in range(n):
        length = int(rng.integers(0, 35))
        t = np.exp(rng.normal(0.0, 1.0, size=length)) * rng.choice([0.3, 1.0, 3.0])
        if length and rng.random() < 0.15:
            t[rng.integers(0, length)] = rng.choice([np.nan, np.inf])
        trajs.append(t)
        flags.append(length == 0 or rng.random() < 0.1)
    return trajs, rng.uniform(0.5, 2.0, size=n), np.array(flags)


def test_grid_matches_scalar_ratio():
    trajs, init, flags = _ragged(0)
    labels, scores = classify(trajs, init, criterion="ratio", unstable=flags)
    for t, i0, f, lab, sc in zip(trajs, init, flags, labels, scores, strict=True):
        assert (lab, sc) == pytest.approx(classify_ratio(t, i0, unstable=bool(f)))
    assert set(labels) == {"converged", "not_converged"}


def test_grid_matches_scalar_threshold():
    trajs, init, flags = _ragged(1)
    labels, scores = classify(
        trajs, init, criterion="threshold", unstable=flags, converged_below=1.0, not_converged_above=4.0
    )
    for t, i0, f, lab, sc in zip(trajs, init, flags, labels, scores, strict=True):
        assert (lab, sc) == pytest.approx(classify_threshold(t, i0, 1.0, 4.0, unstable=bool(f)))
    assert set(labels) == {"converged", "not_converged", "marginal"}


def test_grid_accepts_2d_array_and_scalar_initial_loss():
    mat = np.array([[1.0, 0.5], [1.0, 3.0]])
    labels, scores = classify(mat, 2.0)  # ratios [.5, .25] and [.5, 1.5] (mean 1: not < 1)
    assert labels.tolist() == ["converged", "not_converged"]
    assert scores == pytest.approx([-0.75, 2.0 + 2.0 / 3.0])
    labels, scores = classify(mat, 4.0)
    assert labels.tolist() == ["converged", "converged"]
    assert scores == pytest.approx([-0.375, -1.0])


def test_grid_errors():
    with pytest.raises(ConfigError, match="criterion"):
        classify([[1.0]], [1.0], criterion="vibes")
    with pytest.raises(ConfigError, match="initial_losses"):
        classify([[1.0], [1.0]], [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="unstable"):
        classify([[1.0], [1.0]], 1.0, unstable=[True])
    with pytest.raises(ConfigError, match="converged_below"):
        classify([[1.0]], 1.0, criterion="threshold")
    with pytest.raises(ConfigError, match="no options"):
        classify([[1.0]], 1.0, criterion="ratio", converged_below=1.0)
    labels, scores = classify([], [])
    assert labels.shape == (0,) and scores.shape == (0,)


def test_converged_mask():
    labels = np.array([["converged", "marginal"], ["not_converged", "converged"]])
    assert converged_mask(labels).tolist() == [[True, False], [False, True]]
    with pytest.raises(ConfigError, match="unknown"):
        converged_mask(["converged", "ok"])


def test_ratio_with_per_step_references_divides_step_by_step():
    # A model that halves the base model's loss on every batch converged, however hard each batch is.
    base = np.array([3.0, 1.0, 4.0, 1.5])
    label, score = classify_ratio(base * 0.5, 3.0, reference=base)
    assert label == "converged" and score == pytest.approx(-2.0)
    # Against the scalar initial loss the same run looks not converged (batch 2 is harder than batch 0).
    assert classify_ratio(np.array([3.0, 3.0, 6.0, 6.0]), 3.0)[0] == "not_converged"
    assert classify_ratio(np.array([3.0, 3.0, 6.0, 6.0]), 3.0, reference=[6.0, 6.0, 12.0, 12.0])[0] == "converged"
    with pytest.raises(ConfigError, match="references"):
        classify([base], [3.0], references=[base[:2]])
