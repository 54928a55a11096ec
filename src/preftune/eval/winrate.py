"""Win rates under a judge, raw and length-controlled.

Reward models (and people) tend to prefer longer answers, so a policy can "win" by saying more rather than
better. The length-controlled win rate asks what the win rate would be if both answers had the same length: a
logistic model of the per-prompt outcome on the (scaled) length difference,

    P(candidate wins) = sigmoid(a + b * (len_candidate - len_other) / s),

fitted by Newton's method on the outcomes (1 win, 0 loss, 0.5 tie as a soft label), with ``s`` the standard
deviation of the length differences and a small ridge penalty on ``b`` only (so the fit stays finite when the
outcomes separate perfectly by length). The length-controlled win rate is ``sigmoid(a)``: the predicted win
probability at equal length. With no length difference at all it equals the raw win rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-prompt outcome of ``a`` against ``b``: 1 when a's reward is higher, 0 when lower, 0.5 for a tie."""
    if len(a) != len(b):
        raise ValueError(f"win rate: {len(a)} rewards against {len(b)}")
    return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(a, b, strict=True)]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of prompts where ``a`` has the higher reward, a tie counting half."""
    results = outcomes(a, b)
    if not results:
        raise ValueError("win rate: no prompts to compare")
    return sum(results) / len(results)


@dataclass
class LengthControlled:
    """The fitted length model: the win rate at equal length and how much one length deviation moves it."""

    win_rate: float
    intercept: float
    length_coefficient: float  # per standard deviation of the length difference
    length_scale: float


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def length_controlled_win_rate(
    a: Sequence[float],
    b: Sequence[float],
    a_lengths: Sequence[float],
    b_lengths: Sequence[float],
    *,
    ridge: float = 0.1,
    max_iterations: int = 100,
) -> LengthControlled:
    """Win rate of ``a`` over ``b`` with the length difference regressed out (see the module docstring).

    When every outcome is the same (all wins, all losses or all ties) length cannot explain anything: the raw
    win rate is returned.
    """
    y = outcomes(a, b)
    if not y:
        raise ValueError("length-controlled win rate: no prompts to compare")
    if len(a_lengths) != len(y) or len(b_lengths) != len(y):
        raise ValueError("length-controlled win rate: one length per response is needed")
    raw = sum(y) / len(y)
    diffs = [float(x) - float(z) for x, z in zip(a_lengths, b_lengths, strict=True)]
    mean = sum(diffs) / len(diffs)
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
    # scale by the spread of the differences, not centred: x = 0 must mean "equal length"
    scale = spread if spread > 0 else (max(abs(d) for d in diffs) or 1.0)
    x = [d / scale for d in diffs]
    if all(v == y[0] for v in y):
        return LengthControlled(raw, math.inf if raw == 1 else -math.inf if raw == 0 else 0.0, 0.0, scale)

    a0, b0 = 0.0, 0.0
    for _ in range(max_iterations):
        # gradient and Hessian of the mean soft-label log-loss + ridge/2 * b^2 / n
        g0 = g1 = h00 = h01 = h11 = 0.0
        for xi, yi in zip(x, y, strict=True):
            p = _sigmoid(a0 + b0 * xi)
            w = p * (1.0 - p)
            g0 += p - yi
            g1 += (p - yi) * xi
            h00 += w
            h01 += w * xi
            h11 += w * xi * xi
        g1 += ridge * b0
        h11 += ridge
        det = h00 * h11 - h01 * h01
        if det <= 1e-300:
            break
        step0 = (h11 * g0 - h01 * g1) / det
        step1 = (h00 * g1 - h01 * g0) / det
        largest = max(abs(step0), abs(step1))
        if largest > 4.0:  # damped Newton: a full step can overshoot while the fit is far off
            step0, step1 = step0 * 4.0 / largest, step1 * 4.0 / largest
        a0, b0 = a0 - step0, b0 - step1
        if abs(step0) < 1e-12 and abs(step1) < 1e-12:
            break
    return LengthControlled(_sigmoid(a0), a0, b0, scale)
