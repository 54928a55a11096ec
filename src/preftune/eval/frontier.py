"""The reward-vs-KL frontier: how much reward a training run bought with how much drift from its reference.

The DPO paper compares methods by the frontier of expected reward against KL to the reference, because a
policy can always raise a judge's reward by drifting further (reward hacking). Each point here is one policy
-- a training snapshot, the final model, the reference itself -- measured on the same held-out prompts, exactly
as the evaluation measures its candidate, so that a point can become the candidate (preftune.eval.selection):

- its responses at the display settings (``temperature``, ``top_p`` of the evaluation, the same seed for every
  model): their distinct-n, length and, with judges, each judge's mean reward. The reference's reward on the
  chart is therefore the reference reward of the win-rate table.
- KL(policy || reference) per response, estimated on samples drawn at temperature 1 and top-p 1 (the display
  samples when those already are the settings), so the estimate is unbiased.
- without a judge, the held-out implicit-reward accuracy, which DPO optimises directly.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.eval.judge import Judge
from preftune.model import templating
from preftune.model.sampling import Generations, PairScorer, estimate_kl, generate_responses
from preftune.report import html as reports

Messages = list[dict[str, str]]

#: The judges a point can be scored by, and the point key of each one's mean reward.
JUDGE_KEYS = {"judge": "reward", "heldout_judge": "heldout_reward"}


def raw_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings at temperature 1 and top-p 1: samples from the model's own distribution, on which
    a KL estimate is unbiased."""
    return {**sampling, "temperature": 1.0, "top_p": 1.0}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts, on whitespace words; 0.0 when there are none.

    N-grams are taken inside each text (never across two), so the score measures repetition within and between
    responses; splitting on whitespace keeps it comparable across tokenizers.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def standardised_gain(candidate: Sequence[float], reference: Sequence[float]) -> float:
    """(mean candidate reward - mean reference reward) / the standard deviation of all of them pooled: a gain
    in the judge's own units of spread, so two judges on different scales can be compared. 0 when every
    reward is equal."""
    pooled = list(candidate) + list(reference)
    spread = statistics.pstdev(pooled) if len(pooled) > 1 else 0.0
    if spread <= 0:
        return 0.0
    return (statistics.fmean(candidate) - statistics.fmean(reference)) / spread


@dataclass
class Measured:
    """One policy measured as a candidate: its frontier ``point`` (JSON-ready) and what it was computed from --
    the display responses, the temperature-1 samples of the KL estimate, and each judge's per-prompt rewards."""

    point: dict[str, Any]
    display: Generations
    raw: Generations | None
    rewards: dict[str, list[float]] = field(default_factory=dict)
    pair_scores: dict[str, float] | None = None  # the held-out pair metrics, when the y value needed them


@dataclass
class FrontierProbe:
    """What every frontier point is measured with: the reference, the tokenizer both models share, the prompts
    (as messages for the judges, rendered for the models), the display sampling settings, the ``judges`` by
    role (``judge``, ``heldout_judge``), and the held-out ``pairs`` that give the y value without a judge."""

    reference: Any
    tokenizer: Any
    prompts: Sequence[Messages]
    rendered: Sequence[str]
    sampling: Mapping[str, Any]
    judges: Mapping[str, Judge] = field(default_factory=dict)
    pairs: PairScorer | None = None
    baseline: Measured | None = None  # the reference, once measured: gains and ratios are taken against it

    def generate(self, policy: Any, label: str, raw: bool = False) -> Generations:
        settings = raw_sampling(self.sampling) if raw else self.sampling
        what = "kl samples" if raw else "generate"
        return generate_responses(policy, self.tokenizer, self.rendered, desc=f"{what}: {label}", **settings)

    def measure(
        self,
        policy: Any,
        *,
        label: str,
        step: float | None,
        display: Generations | None = None,
        is_reference: bool = False,
    ) -> Measured:
        """Measure ``policy`` as a candidate (``display``: its display responses, when already generated). The
        reference is measured first and becomes the baseline of every later point."""
        display = display or self.generate(policy, label)
        raw = None if is_reference else self._raw(policy, label, display)
        kl, kl_token = (0.0, 0.0) if raw is None else self._kl(policy, raw)
        point: dict[str, Any] = {
            "label": label,
            "step": step,
            "kl": float(kl),
            "kl_per_token": float(kl_token),
            "distinct_1": distinct_n(display.texts, 1),
            "distinct_2": distinct_n(display.texts, 2),
            "mean_length": sum(display.lengths) / max(len(display.lengths), 1),
        }
        measured = Measured(point, display, raw)
        for role, judge in self.judges.items():
            measured.rewards[role] = judge.score(list(self.prompts), display.texts)
            point[JUDGE_KEYS[role]] = statistics.fmean(measured.rewards[role])
        if self.pairs is not None and not self.judges and not is_reference:
            measured.pair_scores = self.pairs.score(policy)
            point["implicit_reward_accuracy"] = measured.pair_scores["implicit_reward_accuracy"]
        if is_reference:
            self.baseline = measured
        else:
            self._relative(measured)
        return measured

    def _raw(self, policy: Any, label: str, display: Generations) -> Generations:
        if self.sampling["temperature"] == 1.0 and self.sampling["top_p"] == 1.0:
            return display  # the display samples already come from the raw distribution
        return self.generate(policy, label, raw=True)

    def _kl(self, policy: Any, samples: Generations) -> tuple[float, float]:
        return estimate_kl(
            policy,
            self.reference,
            samples,
            batch_size=self.sampling["batch_size"],
            pad_id=templating.pad_id(self.tokenizer),
        )

    def _relative(self, measured: Measured) -> None:
        """The point against the reference: its diversity ratio, and each judge's standardised gain."""
        base, point = self.baseline, measured.point
        if base is None:
            raise RuntimeError("measure the reference before any other point")
        if base.point["distinct_2"] > 0:
            point["diversity_ratio"] = point["distinct_2"] / base.point["distinct_2"]
        for role in measured.rewards:
            point[f"{JUDGE_KEYS[role]}_gain"] = standardised_gain(measured.rewards[role], base.rewards[role])


def y_metric(points: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The value the chart puts on the y axis, and its label: the held-out judge's reward when there is one,
    else the judge's, else the held-out implicit-reward accuracy."""
    if any("heldout_reward" in p for p in points):
        return "heldout_reward", "mean held-out judge reward"
    if any("reward" in p for p in points):
        return "reward", "mean judge reward"
    return "implicit_reward_accuracy", "held-out implicit-reward accuracy"


def frontier_chart(points: Sequence[Mapping[str, Any]], sampling: Mapping[str, Any]) -> str:
    """Reward (or implicit-reward accuracy) against KL, the training path joined in step order; only the
    reference, the final policy and the chosen one are named on the chart (the table names every point)."""
    key, label = y_metric(points)
    if key != "implicit_reward_accuracy":
        label += f" (T={sampling['temperature']:g}, top-p {sampling['top_p']:g})"
    title = f"{label[0].upper()}{label[1:]} vs KL to the reference"
    drawn = [p for p in points if p.get(key) is not None]
    path = sorted((p for p in drawn if p.get("step") is not None), key=lambda p: p["step"])
    series = {"training path": [(p["kl"], p[key]) for p in path]}
    chosen = [p for p in drawn if p.get("chosen")]
    if chosen:
        series["chosen"] = [(p["kl"], p[key]) for p in chosen]
    names = [(p["kl"], p[key], _short(p)) for p in drawn if _short(p)]
    return reports.scatter_path(series, names, title, "KL(policy || reference) per response, nats", label)


def _short(point: Mapping[str, Any]) -> str:
    if point["label"] in ("reference", "final"):
        return point["label"] + (" (chosen)" if point.get("chosen") else "")
    return f"chosen: {point['label']}" if point.get("chosen") else ""


FRONTIER_COLUMNS = (
    "label",
    "step",
    "kl",
    "kl_per_token",
    "reward",
    "heldout_reward",
    "reward_gain",
    "heldout_reward_gain",
    "implicit_reward_accuracy",
    "distinct_2",
    "diversity_ratio",
    "mean_length",
    "in_bounds",
    "chosen",
    "why_not",
)


def frontier_rows(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points as report rows, in a stable column order (columns no point has are left out)."""
    columns = [c for c in FRONTIER_COLUMNS if c in ("label", "step") or any(c in p for p in points)]
    return [{c: p.get(c) for c in columns} for p in points]
