"""The reward-vs-KL frontier: how much reward a training run bought with how much drift from its reference.

The DPO paper compares methods by the frontier of expected reward against KL to the reference, because a
policy can always raise a judge's reward by drifting further (reward hacking). Each point here is one policy
-- a training snapshot, the final model, the reference itself -- measured on the same held-out prompts: its
responses sampled at temperature 1 (so the KL estimate is unbiased and the reward is that of the same
distribution), KL(policy || reference) per response, and the judge's mean reward of those responses. Without a
judge the y value is the held-out implicit-reward accuracy, which DPO optimises directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from preftune.eval.judge import Judge
from preftune.model import templating
from preftune.model.sampling import Generations, PairScorer, estimate_kl, generate_responses
from preftune.report import html as reports

Messages = list[dict[str, str]]


def raw_sampling(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling settings at temperature 1 and top-p 1: samples from the model's own distribution, on which
    a KL estimate is unbiased."""
    return {**sampling, "temperature": 1.0, "top_p": 1.0}


@dataclass
class FrontierProbe:
    """What every frontier point is measured with: the reference, the tokenizer both models share, the prompts
    (as messages for the judge, rendered for the models), the display sampling settings (temperature and top-p
    are overridden with 1), and what gives the y value: the ``judge``, or held-out ``pairs``."""

    reference: Any
    tokenizer: Any
    prompts: Sequence[Messages]
    rendered: Sequence[str]
    sampling: Mapping[str, Any]
    judge: Judge | None = None
    pairs: PairScorer | None = None

    def point(
        self,
        policy: Any,
        *,
        label: str,
        step: float | None,
        samples: Generations | None = None,
        known: Mapping[str, float] | None = None,
        is_reference: bool = False,
    ) -> dict[str, Any]:
        """One frontier point. ``samples`` reuses temperature-1 samples already drawn from ``policy``, and
        ``known`` values already measured on them (``kl``, ``kl_per_token``, ``implicit_reward_accuracy``), so
        the final model is not scored twice."""
        known = known or {}
        if samples is None:
            samples = generate_responses(
                policy,
                self.tokenizer,
                self.rendered,
                desc=f"frontier: {label}",
                **raw_sampling(self.sampling),
            )
        kl, kl_token = self._kl(policy, samples, known, is_reference)
        point: dict[str, Any] = {
            "label": label,
            "step": step,
            "kl": float(kl),
            "kl_per_token": float(kl_token),
            "mean_length": sum(samples.lengths) / max(len(samples.lengths), 1),
        }
        if self.judge is not None:
            rewards = self.judge.score(list(self.prompts), samples.texts)
            point["reward"] = sum(rewards) / len(rewards)
        if "implicit_reward_accuracy" in known:
            point["implicit_reward_accuracy"] = known["implicit_reward_accuracy"]
        elif self.pairs is not None and not is_reference:
            point["implicit_reward_accuracy"] = self.pairs.score(policy)["implicit_reward_accuracy"]
        return point

    def _kl(
        self, policy: Any, samples: Generations, known: Mapping[str, float], is_reference: bool
    ) -> tuple[float, float]:
        if is_reference:
            return 0.0, 0.0  # KL of a model to itself, exactly
        if "kl" in known:
            return known["kl"], known["kl_per_token"]
        return estimate_kl(
            policy,
            self.reference,
            samples,
            batch_size=self.sampling["batch_size"],
            pad_id=templating.pad_id(self.tokenizer),
        )


def y_metric(points: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The value the chart puts on the y axis, and its label: judge reward when there is one."""
    if any("reward" in p for p in points):
        return "reward", "mean judge reward (temperature-1 samples)"
    return "implicit_reward_accuracy", "held-out implicit-reward accuracy"


def frontier_chart(points: Sequence[Mapping[str, Any]]) -> str:
    """Reward (or implicit-reward accuracy) against KL, the training path joined in step order."""
    key, label = y_metric(points)
    what = "Judge reward" if key == "reward" else "Held-out implicit-reward accuracy"
    title = f"{what} vs KL to the reference, over training"
    drawn = [p for p in points if p.get(key) is not None]
    path = sorted((p for p in drawn if p.get("step") is not None), key=lambda p: p["step"])
    series = {"training path": [(p["kl"], p[key]) for p in path]}
    labels = [(p["kl"], p[key], p["label"]) for p in drawn]
    return reports.scatter_path(series, labels, title, "KL(policy || reference) per response, nats", label)


def frontier_rows(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points as report rows, in a stable column order."""
    columns = ("label", "step", "kl", "kl_per_token", "reward", "implicit_reward_accuracy", "mean_length")
    return [{c: p.get(c) for c in columns if c in p or c in ("label", "step")} for p in points]
