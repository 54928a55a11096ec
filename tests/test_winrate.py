"""Win rates under a judge: the raw share of wins and the length-controlled estimate."""

from __future__ import annotations

import math
import random

import pytest

from preftune.eval.winrate import length_controlled_win_rate, outcomes, win_rate


def test_outcomes_and_win_rate_by_hand() -> None:
    assert outcomes([2, 1, 1], [1, 1, 3]) == [1.0, 0.5, 0.0]
    assert win_rate([2, 1, 1], [1, 1, 3]) == pytest.approx(0.5)
    assert win_rate([1.0], [0.0]) == 1.0
    with pytest.raises(ValueError, match="no prompts"):
        win_rate([], [])
    with pytest.raises(ValueError, match="2 rewards against 1"):
        win_rate([1, 2], [1])


def test_equal_lengths_leave_the_win_rate_as_it_is() -> None:
    a, b = [1, 0, 1, 1, 0], [0, 1, 0, 0, 1]
    fit = length_controlled_win_rate(a, b, [7] * 5, [7] * 5)
    assert fit.win_rate == pytest.approx(0.6)
    assert fit.length_coefficient == pytest.approx(0.0)


def test_unanimous_outcomes_cannot_be_explained_by_length() -> None:
    assert length_controlled_win_rate([2, 2], [1, 1], [10, 3], [1, 9]).win_rate == 1.0
    assert length_controlled_win_rate([0, 0], [1, 1], [10, 3], [1, 9]).win_rate == 0.0
    assert length_controlled_win_rate([1, 1], [1, 1], [10, 3], [1, 9]).win_rate == 0.5


def test_a_judge_that_only_counts_length_gives_no_length_controlled_advantage() -> None:
    rng = random.Random(0)
    longer = [rng.randint(5, 30) for _ in range(300)]
    shorter = [rng.randint(1, 20) for _ in range(300)]
    raw = win_rate(longer, shorter)  # the judge's reward is the length itself
    fit = length_controlled_win_rate(longer, shorter, longer, shorter)
    assert raw > 0.7
    assert fit.win_rate == pytest.approx(0.5, abs=0.05)
    assert fit.length_coefficient > 3  # strongly "longer wins"


def test_quality_that_is_not_length_survives_the_control() -> None:
    rng = random.Random(1)
    n = 400
    la = [rng.randint(1, 20) for _ in range(n)]
    lb = [rng.randint(1, 20) for _ in range(n)]
    a = [1.0 if rng.random() < 0.75 else 0.0 for _ in range(n)]  # wins 3 in 4, whatever the length
    b = [0.5] * n
    fit = length_controlled_win_rate(a, b, la, lb)
    assert fit.win_rate == pytest.approx(win_rate(a, b), abs=0.03)
    assert abs(fit.length_coefficient) < 0.3


def test_symmetry_and_scale_invariance() -> None:
    rng = random.Random(2)
    a = [rng.random() for _ in range(60)]
    b = [rng.random() for _ in range(60)]
    la = [rng.randint(1, 40) for _ in range(60)]
    lb = [rng.randint(1, 40) for _ in range(60)]
    ab = length_controlled_win_rate(a, b, la, lb)
    ba = length_controlled_win_rate(b, a, lb, la)
    assert ab.win_rate + ba.win_rate == pytest.approx(1.0, abs=1e-9)
    scaled = length_controlled_win_rate(a, b, [3 * x for x in la], [3 * x for x in lb])
    assert scaled.win_rate == pytest.approx(ab.win_rate, abs=1e-9)
    assert math.isfinite(ab.intercept)


def test_perfect_separation_by_length_stays_finite() -> None:
    a, b = [1, 1, 1, 0], [0, 0, 0, 1]
    fit = length_controlled_win_rate(a, b, [10, 10, 10, 5], [5, 5, 5, 10])
    assert math.isfinite(fit.intercept) and math.isfinite(fit.length_coefficient)
    # every win came with the longer answer: controlling for length takes most of the 0.75 away
    assert 0.5 < fit.win_rate < 0.75
