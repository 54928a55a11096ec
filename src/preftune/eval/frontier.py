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
from typing import Any

from preftune.eval.judge import Judge
from preftune.model.sampling import Generations, PairScorer, estimate_kl, generate_responses
from preftune.report import html as reports

Messages = list[dict[str, str]]


def measure_point(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    rendered: Sequence[str],
    prompts: Sequence[Messages],
    sampling: Mapping[str, Any],
    *,
    label: str,
    step: float | None,
    pad_id: int,
    judge: Judge | None = None,
    pairs: PairScorer | None = None,
    samples: Generations | None = None,
    known: Mapping[str, float] | None = None,
    is_reference: bool = False,
) -> dict[str, Any]:
    """One frontier point.

    ``sampling`` holds the display settings (temperature and top-p are overridden with 1). ``samples`` reuses
    temperature-1 samples already drawn from ``policy``, and ``known`` values already measured on them
    (``kl``, ``kl_per_token``, ``implicit_reward_accuracy``), so the final model is not scored twice.
    """
    known = known or {}
    if samples is None:
        unbiased = {**sampling, "temperature": 1.0, "top_p": 1.0}
        samples = generate_responses(policy, tokenizer, rendered, desc=f"frontier: {label}", **unbiased)
    if is_reference:
        kl, kl_token = 0.0, 0.0  # KL of a model to itself, exactly
    elif "kl" in known:
        kl, kl_token = known["kl"], known["kl_per_token"]
    else:
        kl, kl_token = estimate_kl(
            policy, reference, samples, batch_size=sampling["batch_size"], pad_id=pad_id
        )
    point: dict[str, Any] = {
        "label": label,
        "step": step,
        "kl": float(kl),
        "kl_per_token": float(kl_token),
        "mean_length": sum(samples.lengths) / max(len(samples.lengths), 1),
    }
    if judge is not None:
        rewards = judge.score(list(prompts), samples.texts)
        point["reward"] = sum(rewards) / len(rewards)
    if "implicit_reward_accuracy" in known:
        point["implicit_reward_accuracy"] = known["implicit_reward_accuracy"]
    elif pairs is not None and not is_reference:
        point["implicit_reward_accuracy"] = pairs.score(policy)["implicit_reward_accuracy"]
    return point


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
