"""Which alignment method, on your data? Any subset of them side by side, with a verdict that shows its numbers.

The compare pipeline trains each chosen method (DPO, RLHF with PPO, GRPO, RLOO, KTO, online DPO) from one SFT
model and evaluates every policy on the same held-out prompts with the same seed and the same judge. This module
reads what those steps produced -- training metrics, evaluation metrics, the generations with their per-prompt
judge rewards, the reward-vs-KL points -- and puts them in one table: cost (wall time, GPU-hours requested,
tokens processed, peak memory), quality under the judge (reward, win rate against the SFT model, head to head),
drift (KL to the SFT model), diversity and response length.

Head to head, every pair of policies answered each prompt and the judge scored both answers: the share of
prompts where one method's answer scores higher (ties split) -- so a pair's two win rates sum to 1 exactly. A
method's head-to-head score is its mean length-controlled win rate against every other method compared; the
verdict ranks by it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from preftune.data.records import read_artifact_rows
from preftune.eval.methods import LABELS, METHODS, REWARD_MODEL_METHODS, STAGES, long_label
from preftune.eval.winrate import length_controlled_win_rate, win_rate
from preftune.report import html as reports

log = logging.getLogger(__name__)


def chosen_methods(methods: Sequence[str]) -> list[str]:
    """The methods to compare, in report order; refuses an unknown name or fewer than two."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    chosen = [m for m in METHODS if m in methods]
    if len(chosen) < 2:
        raise ValueError(f"a comparison needs at least two methods; got {chosen or 'none'}")
    return chosen


def parse_methods(text: str) -> list[str]:
    """The methods a comma-separated list names (``all`` = every one), checked by :func:`chosen_methods`."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    return chosen_methods(METHODS if names == ["all"] else names)


def _generations(path: str, method: str) -> list[dict[str, Any]]:
    rows = [row.record or {} for row in read_artifact_rows(path)]
    if not rows:
        raise ValueError(f"{method} generations {path!r} are empty")
    missing = [i for i, r in enumerate(rows) if "candidate_reward" not in r]
    if missing:
        raise ValueError(
            f"{method} generations {path!r}: row {missing[0] + 1} has no candidate_reward; "
            "the comparison needs every evaluation to run with the same judge"
        )
    return rows


def head_to_head(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """Per-prompt judge rewards of every pair of policies on the same prompts: win rates (ties split), LC win
    rates, ties, and each method's mean LC win rate against the others (``<m>_head_to_head``)."""
    methods = list(rows)
    prompts = [r["prompt"] for r in rows[methods[0]]]
    for method in methods[1:]:
        if [r["prompt"] for r in rows[method]] != prompts:
            raise ValueError(
                f"the {methods[0]} and {method} evaluations did not use the same prompts in the same order"
            )
    rewards = {m: [float(r["candidate_reward"]) for r in rows[m]] for m in methods}
    lengths = {m: [len(str(r["candidate"]).split()) for r in rows[m]] for m in methods}
    out: dict[str, float] = {"head_to_head_prompts": float(len(prompts)), "head_to_head_ties": 0.0}
    for a, b in itertools.combinations(methods, 2):
        lc = length_controlled_win_rate(rewards[a], rewards[b], lengths[a], lengths[b])
        out[f"{a}_win_rate_vs_{b}"] = win_rate(rewards[a], rewards[b])
        out[f"{b}_win_rate_vs_{a}"] = win_rate(rewards[b], rewards[a])
        out[f"{a}_lc_win_rate_vs_{b}"] = lc.win_rate
        out[f"{b}_lc_win_rate_vs_{a}"] = 1.0 - lc.win_rate
        out["head_to_head_ties"] += sum(x == y for x, y in zip(rewards[a], rewards[b], strict=True))
    for m in methods:
        others = [out[f"{m}_lc_win_rate_vs_{o}"] for o in methods if o != m]
        out[f"{m}_head_to_head"] = sum(others) / len(others)
    return out


def method_figures(
    method: str,
    training: Mapping[str, Mapping[str, float]],
    evaluation: Mapping[str, float],
    gpus_per_step: int,
) -> dict[str, float]:
    """One method's cost and quality figures (its own stages only; the shared SFT step is reported apart)."""
    missing = [s for s in STAGES[method] if s not in training]
    if missing:
        raise ValueError(f"{method}: no training metrics of its stage(s) {missing}")
    stages = [training[s] for s in STAGES[method]]
    seconds = sum(float(m["stage_seconds"]) for m in stages)
    return {
        f"{method}_wall_seconds": seconds,
        f"{method}_gpu_hours": seconds * gpus_per_step / 3600.0,
        f"{method}_train_tokens": sum(float(m.get("train_tokens", 0.0)) for m in stages),
        f"{method}_peak_memory_mb": max(float(m["peak_memory_mb"]) for m in stages),
        f"{method}_judge_reward": float(evaluation["judge_reward_candidate"]),
        f"{method}_win_rate_vs_sft": float(evaluation["win_rate_vs_reference"]),
        f"{method}_lc_win_rate_vs_sft": float(evaluation["lc_win_rate_vs_reference"]),
        f"{method}_kl_to_sft": float(evaluation["kl_candidate_reference"]),
        f"{method}_distinct_2": float(evaluation["distinct_2_candidate"]),
        f"{method}_diversity_ratio_vs_sft": float(evaluation.get("diversity_ratio_vs_reference", math.nan)),
        f"{method}_mean_length": float(evaluation["mean_length_candidate"]),
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2g}x" if b > 0 else "n/a"


def _compared(m: Mapping[str, float]) -> list[str]:
    return [x for x in METHODS if f"{x}_judge_reward" in m]


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _quality(m: Mapping[str, float], methods: Sequence[str]) -> str:
    """Who gave the best answers: the top method by head-to-head score against the runner-up."""
    ranked = sorted(methods, key=lambda x: m[f"{x}_head_to_head"], reverse=True)
    best, runner = ranked[0], ranked[1]
    lc, raw = m[f"{best}_lc_win_rate_vs_{runner}"], m[f"{best}_win_rate_vs_{runner}"]
    two = len(methods) == 2
    if lc > 0.55:
        lead = (
            f"{long_label(best)} gave the {'better' if two else 'best'} answers: the judge prefers its answer to "
            f"{LABELS[runner]}'s{'' if two else ' (the runner-up)'} on {raw:.0%} of prompts ({lc:.0%} "
            "length-controlled)"
        )
    else:
        lead = (
            f"{'Neither method is clearly better' if two else 'No method is clearly best'}: head to head "
            f"{LABELS[best]} wins {raw:.0%} of prompts against {LABELS[runner]} ({lc:.0%} length-controlled)"
        )
    rewards = ", ".join(f"{LABELS[x]} {m[f'{x}_judge_reward']:.3g}" for x in ranked)
    sentence = f"{lead}; mean judge reward {rewards}."
    if not two:
        scores = ", ".join(f"{LABELS[x]} {m[f'{x}_head_to_head']:.0%}" for x in ranked)
        sentence += f" Mean length-controlled win rate against all the others: {scores}."
    return sentence


def _cost(m: Mapping[str, float], methods: Sequence[str]) -> str:
    each = "; ".join(
        f"{LABELS[x]} {m[f'{x}_wall_seconds']:.0f} s, {m[f'{x}_gpu_hours']:.3g} GPU-hours, "
        f"{m[f'{x}_peak_memory_mb']:.0f} MiB peak"
        for x in methods
    )
    by_time = sorted(methods, key=lambda x: m[f"{x}_wall_seconds"])
    cheap, dear = by_time[0], by_time[-1]
    ratio = _ratio(m[f"{dear}_wall_seconds"], m[f"{cheap}_wall_seconds"])
    return (
        f"Cost after the shared SFT step: {each}. {LABELS[dear]} took {ratio} the wall time of "
        f"{LABELS[cheap]}."
    )


def _drift(m: Mapping[str, float], methods: Sequence[str]) -> str:
    each = "; ".join(
        f"{LABELS[x]} drifted {m[f'{x}_kl_to_sft']:.3g} nats per response (KL), beat it on "
        f"{m[f'{x}_win_rate_vs_sft']:.0%} of prompts, distinct-2 {m[f'{x}_distinct_2']:.3g}, answers of "
        f"{m[f'{x}_mean_length']:.1f} tokens"
        for x in methods
    )
    return f"Against the SFT model: {each}."


def verdict(
    m: Mapping[str, float], *, judge_is_reward_model: bool, methods: Sequence[str] | None = None
) -> list[str]:
    """A short verdict in plain words, each sentence with the numbers behind it. ``methods`` defaults to every
    method with figures in ``m``."""
    methods = chosen_methods(methods if methods is not None else _compared(m))
    sentences = [_quality(m, methods), _cost(m, methods), _drift(m, methods)]
    favoured = [LABELS[x] for x in methods if x in REWARD_MODEL_METHODS]
    if judge_is_reward_model and favoured:
        sentences.append(
            f"Caution: the judge is the reward model that {_and(favoured)} "
            f"{'was' if len(favoured) == 1 else 'were'} optimised against, which favours {_and(favoured)}; "
            "give the pipeline an independent judge_model for a fair verdict."
        )
    return sentences


def _frontier(path: str | None) -> list[dict[str, Any]]:
    return [row.record or {} for row in read_artifact_rows(path)] if path else []


def _frontier_chart(points: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    key = "reward" if all("reward" in p for ps in points.values() for p in ps) else "implicit_reward_accuracy"
    series = {
        LABELS[method]: [
            (p["kl"], p[key]) for p in sorted(ps, key=lambda p: p["step"]) if p.get(key) is not None
        ]
        for method, ps in points.items()
        if ps
    }
    labels = [
        (p["kl"], p[key], f"{LABELS[m]} {p['label']}")
        for m, ps in points.items()
        for p in ps
        if p.get(key) is not None
    ]
    ylabel = "mean judge reward" if key == "reward" else "held-out implicit-reward accuracy"
    return reports.scatter_path(
        series, labels, "Reward vs KL to the SFT model, every method", "KL, nats", ylabel
    )


def compare(
    *,
    training: Mapping[str, Mapping[str, float]],
    evaluations: Mapping[str, Mapping[str, float]],
    generations: Mapping[str, str],
    frontiers: Mapping[str, str | None],
    report_path: str,
    gpus_per_step: int = 0,
    judge_is_reward_model: bool = True,
) -> dict[str, float]:
    """Compare the policies of one run (the methods in ``evaluations``, at least two); write the HTML report and
    return flat metrics.

    Args:
        training: Metrics of the training steps by stage: ``sft`` and each compared method's
            :data:`STAGES`.
        evaluations: Evaluation metrics by method (keys of :data:`LABELS`), all against the SFT model, same
            judge.
        generations: The evaluations' generations (JSONL with per-prompt ``candidate_reward``) by method.
        frontiers: The evaluations' reward-vs-KL points (JSONL) by method, or None.
        report_path: Where the HTML report goes.
        gpus_per_step: GPUs each training step requests (for GPU-hours); 0 when run on CPU.
        judge_is_reward_model: The judge is the pipeline's own reward model (the verdict says whom it favours).

    Returns:
        ``<method>_*`` figures for every method, the head-to-head win rates, ``sft_wall_seconds``.
    """
    methods = chosen_methods(list(evaluations))
    metrics: dict[str, float] = {"sft_wall_seconds": float(training["sft"]["stage_seconds"])}
    for method in methods:
        metrics.update(method_figures(method, training, evaluations[method], gpus_per_step))
    rows = {method: _generations(generations[method], method) for method in methods}
    metrics.update(head_to_head(rows))
    sentences = verdict(metrics, judge_is_reward_model=judge_is_reward_model, methods=methods)
    points = {method: _frontier(frontiers.get(method)) for method in methods}
    reports.write(report_path, _report(metrics, methods, rows, points, sentences, gpus_per_step))
    log.info("comparison: %s", json.dumps(metrics))
    return metrics


_FIGURES = [
    ("wall time after SFT (s)", "wall_seconds"),
    ("GPU-hours requested", "gpu_hours"),
    ("tokens processed in training", "train_tokens"),
    ("peak memory (MiB)", "peak_memory_mb"),
    ("mean judge reward", "judge_reward"),
    ("win rate vs SFT", "win_rate_vs_sft"),
    ("length-controlled win rate vs SFT", "lc_win_rate_vs_sft"),
    ("head to head vs the others (LC)", "head_to_head"),
    ("KL to SFT (nats / response)", "kl_to_sft"),
    ("distinct-2", "distinct_2"),
    ("diversity ratio vs SFT", "diversity_ratio_vs_sft"),
    ("mean response length (tokens)", "mean_length"),
]


def _head_to_head_section(metrics: Mapping[str, float], methods: Sequence[str]) -> str:
    """A bar per method (its mean LC win rate against the others) and the matrix of raw win rates."""
    scores = {LABELS[m]: metrics[f"{m}_head_to_head"] for m in methods}
    matrix = [
        {
            "method": LABELS[a],
            **{f"vs {LABELS[b]}": metrics[f"{a}_win_rate_vs_{b}"] if a != b else "" for b in methods},
        }
        for a in methods
    ]
    return reports.bar_chart(
        scores, "Mean length-controlled win rate against the other methods", "share"
    ) + reports.table(matrix)


def _report(
    metrics: Mapping[str, float],
    methods: Sequence[str],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    points: Mapping[str, Sequence[Mapping[str, Any]]],
    sentences: Sequence[str],
    gpus_per_step: int,
) -> str:
    names = [LABELS[m] for m in methods]
    table = [
        {"figure": name, **{LABELS[m]: metrics[f"{m}_{key}"] for m in methods}} for name, key in _FIGURES
    ]
    side_by_side = [
        {
            "prompt": answers[0]["prompt"],
            **{LABELS[m]: a["candidate"] for m, a in zip(methods, answers, strict=True)},
            **{f"{LABELS[m]} reward": a["candidate_reward"] for m, a in zip(methods, answers, strict=True)},
        }
        for answers in zip(*(rows[m] for m in methods), strict=True)
    ]
    costs = {LABELS[m]: metrics[f"{m}_wall_seconds"] for m in methods}
    sections = [
        ("Verdict", "".join(f"<p>{reports.escape(s)}</p>" for s in sentences)),
        ("Side by side", reports.table(table, ["figure", *names])),
        ("Head to head under the judge", _head_to_head_section(metrics, methods)),
        ("Cost", reports.bar_chart(costs, "Wall time of each method's own steps", "seconds")),
    ]
    if any(points.values()):
        sections.append(("Reward vs KL over training", _frontier_chart(points)))
    sections += [
        ("All figures", reports.key_values(dict(metrics))),
        ("Answers to the same prompts", reports.table(side_by_side)),
    ]
    note = (
        f"Every method starts from the same SFT model ({metrics['sft_wall_seconds']:.0f} s, shared) and is "
        f"evaluated on the same prompts, seed and judge. GPU-hours = wall time x {gpus_per_step} GPU(s) per step."
    )
    return reports.page(f"{_and(names)}: the comparison", sections, intro=note)


# -------------------------------------------------------------------------------------- artifacts of a KFP run


def mark_skipped(artifact: Any, method: str) -> None:
    """Mark a KFP artifact as the stand-in of a method that was not trained (empty file, ``skipped`` = 1)."""
    if method not in LABELS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    with open(artifact.path, "w", encoding="utf-8"):
        pass
    artifact.metadata["skipped"] = 1.0
    artifact.metadata["method"] = method


def _given(artifact: Any) -> bool:
    return artifact is not None and not artifact.metadata.get("skipped")


def compare_artifacts(
    stages: Mapping[str, Any],
    evaluated: Mapping[str, tuple[Any, Any, Any]],
    **options: Any,
) -> dict[str, float]:
    """:func:`compare` on a KFP step's input artifacts: ``stages`` maps a training stage to its metrics
    artifact, ``evaluated`` a method to its (evaluation metrics, generations, frontier) artifacts. A method
    whose evaluation is missing or marked by :func:`mark_skipped` is left out; ``options`` go to
    :func:`compare`."""
    chosen = {m: arts for m, arts in evaluated.items() if _given(arts[0])}
    return compare(
        training={stage: dict(art.metadata) for stage, art in stages.items() if _given(art)},
        evaluations={m: dict(arts[0].metadata) for m, arts in chosen.items()},
        generations={m: arts[1].path for m, arts in chosen.items()},
        frontiers={m: arts[2].path if _given(arts[2]) else None for m, arts in chosen.items()},
        **options,
    )
