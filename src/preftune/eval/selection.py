"""Constrained model selection: which of a run's policies the gate should judge.

Training passes through many policies; the last one is not always the best one to ship. A run that keeps
snapshots (preftune.train.snapshots) offers the reward-vs-KL path of its training, and the evaluation picks from
it -- and from the final policy -- the point with the best score among those the gate would let through on
drift and diversity (and, with a held-out judge, on that judge confirming the gain). This is the constrained
form of early stopping: InstructGPT and "Secrets of RLHF" both choose PPO checkpoints on held-out reward rather
than ship the last one, and the frontier view of the DPO paper makes the KL spent part of the choice.

The score, best first: the held-out judge's mean reward (a reward model that training did not optimise, so a
reward-hacked point does not win), else the judge's, else the held-out implicit-reward accuracy (DPO without a
judge). The bounds are the gate's own checks (preftune.eval.gate.decide, with the champion comparison left to
the gate), evaluated on the same numbers the gate will read, so a chosen point is one the gate passes on them.
When no point is inside the bounds, the final policy is evaluated and the gate refuses it with its reasons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from preftune.eval.frontier import y_metric
from preftune.eval.gate import decide


@dataclass(frozen=True)
class Bounds:
    """The gate's drift, diversity and confirmation bounds (negative = not checked)."""

    max_kl: float
    min_diversity_ratio: float
    min_judge_confirmation: float


@dataclass
class Selection:
    """The chosen point's index in the points, and why it was chosen (a sentence for the report)."""

    index: int
    reason: str
    in_bounds: int


def gate_metrics(point: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, float]:
    """A point's numbers under the names the gate reads."""
    metrics = {
        "kl_candidate_reference": point["kl"],
        "distinct_2_candidate": point["distinct_2"],
        "distinct_2_reference": reference["distinct_2"],
    }
    for key in ("reward_gain", "heldout_reward_gain"):
        if key in point:
            metrics[f"judge_{key}" if key == "reward_gain" else key] = point[key]
    return metrics


def check_point(point: Mapping[str, Any], reference: Mapping[str, Any], bounds: Bounds) -> list[str]:
    """The gate's reasons against this point on drift, diversity and confirmation; empty when it passes."""
    decision = decide(
        gate_metrics(point, reference),
        min_win_rate_vs_champion=-1.0,
        max_kl=bounds.max_kl,
        min_diversity_ratio=bounds.min_diversity_ratio,
        min_judge_confirmation=bounds.min_judge_confirmation,
    )
    return [c["reason"] for c in decision["checks"] if not c["passed"]]


def select(points: list[dict[str, Any]], reference: Mapping[str, Any], bounds: Bounds) -> Selection:
    """Mark every point ``in_bounds`` (with ``why_not`` when it is not) and choose one (``chosen``): the best
    score inside the bounds, ties going to the smaller KL; the final policy (the last point) when none is in
    the bounds or there is nothing to score by."""
    key, what = y_metric(points)
    inside = []
    for i, point in enumerate(points):
        problems = check_point(point, reference, bounds)
        point["in_bounds"] = not problems
        if problems:
            point["why_not"] = "; ".join(problems)
        elif point.get(key) is not None:
            inside.append(i)
    final = len(points) - 1
    if not inside:
        index = final
        reason = (
            f"No policy of the run is inside the gate's bounds ({points[final].get('why_not') or 'no score'} for "
            "the final one): the final policy is evaluated, and the gate refuses it."
        )
    else:
        index = max(inside, key=lambda i: (points[i][key], -points[i]["kl"]))
        reason = _reason(points, index, key, what, len(inside))
    points[index]["chosen"] = True
    return Selection(index, reason, len(inside))


def _reason(points: Sequence[Mapping[str, Any]], index: int, key: str, what: str, inside: int) -> str:
    chosen, final = points[index], points[-1]
    text = (
        f"Chosen: {chosen['label']}, the best {what} ({chosen[key]:.4g}) of the {inside} of {len(points)} "
        f"policies inside the gate's bounds on KL and diversity"
        + (" and held-out confirmation" if "heldout_reward_gain" in chosen else "")
        + f" (KL {chosen['kl']:.3g} nats"
        + (f", diversity ratio {chosen['diversity_ratio']:.3g}" if "diversity_ratio" in chosen else "")
        + ")."
    )
    if index == len(points) - 1:
        return text
    if not final.get("in_bounds"):
        return text + f" The final policy is outside them: {final['why_not']}."
    return text + f" The final policy is inside them but scores lower ({final.get(key, float('nan')):.4g})."
