"""Constrained model selection (preftune.eval.selection): which of a run's policies the gate should judge."""

from __future__ import annotations

import pytest

from preftune.eval.gate import decide
from preftune.eval.selection import Bounds, gate_metrics, select

BOUNDS = Bounds(max_kl=10.0, min_diversity_ratio=0.8, min_judge_confirmation=0.5)
REFERENCE = {"label": "reference", "step": 0, "kl": 0.0, "distinct_2": 0.5, "reward": 0.0}


def _point(label: str, step: int, kl: float, distinct_2: float, reward: float, **extra: float) -> dict:
    return {"label": label, "step": step, "kl": kl, "distinct_2": distinct_2, "reward": reward, **extra}


def test_selection_picks_a_snapshot_inside_the_bounds_when_the_final_policy_is_outside_them() -> None:
    """The final policy has the best reward but drifted past max_kl; an early snapshot lost diversity; the
    middle snapshot is inside both bounds, so it is chosen -- not the highest reward, the highest allowed."""
    points = [
        _point("step 10", 10, kl=2.0, distinct_2=0.30, reward=1.5),  # diversity ratio 0.6: out
        _point("step 20", 20, kl=4.0, distinct_2=0.45, reward=1.2),  # inside
        _point("step 30", 30, kl=6.0, distinct_2=0.48, reward=0.9),  # inside, lower reward
        _point("final", 40, kl=14.0, distinct_2=0.50, reward=2.0),  # KL 14 > 10: out
    ]
    chosen = select(points, REFERENCE, BOUNDS)
    assert chosen.index == 1 and points[1]["chosen"] is True
    assert [p["in_bounds"] for p in points] == [False, True, True, False]
    assert chosen.in_bounds == 2
    assert "diversity" in points[0]["why_not"] and "kl_candidate_reference" in points[3]["why_not"]
    assert "step 20" in chosen.reason and "The final policy is outside them" in chosen.reason
    # the gate, reading the chosen point's numbers, lets it through on drift and diversity
    decision = decide(
        gate_metrics(points[1], REFERENCE), min_win_rate_vs_champion=-1, max_kl=10.0, min_diversity_ratio=0.8
    )
    assert decision["promote"] is True
    assert not any(p.get("chosen") for i, p in enumerate(points) if i != 1)


def test_a_reward_hacked_snapshot_is_not_chosen_and_ties_go_to_less_drift() -> None:
    """With a held-out judge the score is its reward, and a point whose training-judge gain it does not
    confirm is out of bounds however high the training judge rates it."""
    points = [
        _point("step 5", 5, 3.0, 0.5, 0.5, heldout_reward=0.4, reward_gain=0.6, heldout_reward_gain=0.5),
        _point("step 9", 9, 2.0, 0.5, 0.5, heldout_reward=0.4, reward_gain=0.6, heldout_reward_gain=0.5),
        _point("final", 12, 5.0, 0.5, 3.0, heldout_reward=0.9, reward_gain=2.0, heldout_reward_gain=0.1),
    ]
    chosen = select(points, REFERENCE, BOUNDS)
    assert points[2]["in_bounds"] is False and "possible reward hacking" in points[2]["why_not"]
    assert chosen.index == 1  # the same held-out reward as step 5, for less KL
    assert "held-out confirmation" in chosen.reason


@pytest.mark.parametrize("final_kl", [14.0, 3.0])
def test_the_final_policy_is_kept_when_nothing_else_is_better(final_kl: float) -> None:
    points = [
        _point("step 10", 10, kl=12.0, distinct_2=0.5, reward=1.0),
        _point("final", 20, kl=final_kl, distinct_2=0.5, reward=2.0),
    ]
    chosen = select(points, REFERENCE, BOUNDS)
    assert chosen.index == 1  # inside the bounds and best, or no point is inside them at all
    if final_kl > BOUNDS.max_kl:
        assert chosen.in_bounds == 0 and "the gate refuses it" in chosen.reason
    else:
        assert chosen.in_bounds == 1 and chosen.reason.startswith("Chosen: final")


def test_without_a_judge_the_held_out_implicit_reward_accuracy_decides() -> None:
    points = [
        {"label": "step 3", "step": 3, "kl": 1.0, "distinct_2": 0.5, "implicit_reward_accuracy": 0.8},
        {"label": "final", "step": 6, "kl": 2.0, "distinct_2": 0.5, "implicit_reward_accuracy": 0.7},
    ]
    reference = {"label": "reference", "step": 0, "kl": 0.0, "distinct_2": 0.5}
    assert select(points, reference, BOUNDS).index == 0
