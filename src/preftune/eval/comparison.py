"""RLHF or DPO? The two methods side by side on the same data, with a verdict that shows its numbers.

The compare pipeline trains both from one SFT model and evaluates both on the same held-out prompts with the same
seed and the same judge. This module reads what those steps produced -- training metrics, evaluation metrics,
the generations with their per-prompt judge rewards, the reward-vs-KL points -- and puts them in one table: cost
(wall time, GPU-hours requested, tokens processed, peak memory), quality under the judge (reward, win rate
against the SFT model, head to head), drift (KL to the SFT model), diversity and response length.

Head to head, both policies answered each prompt and the judge scored both answers: the share of prompts where
one method's answer scores higher (ties split) -- so the two head-to-head win rates sum to 1 exactly.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from preftune.data.records import read_artifact_rows
from preftune.eval.winrate import length_controlled_win_rate, win_rate
from preftune.report import html as reports

log = logging.getLogger(__name__)

METHODS = ("dpo", "rlhf")
#: Training stages of each method after the shared SFT step.
STAGES = {"dpo": ("dpo",), "rlhf": ("reward", "ppo")}


def _generations(path: str, method: str) -> list[dict[str, Any]]:
    rows = [row.record or {} for row in read_artifact_rows(path)]
    if not rows:
        raise ValueError(f"{method} generations {path!r} are empty")
    missing = [i for i, r in enumerate(rows) if "candidate_reward" not in r]
    if missing:
        raise ValueError(
            f"{method} generations {path!r}: row {missing[0] + 1} has no candidate_reward; "
            "the comparison needs both evaluations to run with the same judge"
        )
    return rows


def head_to_head(
    dpo_rows: Sequence[Mapping[str, Any]], rlhf_rows: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Per-prompt judge rewards of both policies on the same prompts: win rates (ties split), LC win rates."""
    if [r["prompt"] for r in dpo_rows] != [r["prompt"] for r in rlhf_rows]:
        raise ValueError("the two evaluations did not use the same prompts in the same order")
    dpo = [float(r["candidate_reward"]) for r in dpo_rows]
    rlhf = [float(r["candidate_reward"]) for r in rlhf_rows]
    lengths = [[len(str(r["candidate"]).split()) for r in rows] for rows in (dpo_rows, rlhf_rows)]
    lc = length_controlled_win_rate(dpo, rlhf, lengths[0], lengths[1])
    return {
        "dpo_win_rate_vs_rlhf": win_rate(dpo, rlhf),
        "rlhf_win_rate_vs_dpo": win_rate(rlhf, dpo),
        "dpo_lc_win_rate_vs_rlhf": lc.win_rate,
        "rlhf_lc_win_rate_vs_dpo": 1.0 - lc.win_rate,
        "head_to_head_ties": float(sum(a == b for a, b in zip(dpo, rlhf, strict=True))),
        "head_to_head_prompts": float(len(dpo)),
    }


def method_figures(
    method: str,
    training: Mapping[str, Mapping[str, float]],
    evaluation: Mapping[str, float],
    gpus_per_step: int,
) -> dict[str, float]:
    """One method's cost and quality figures (its own stages only; the shared SFT step is reported apart)."""
    stages = [training[s] for s in STAGES[method]]
    seconds = sum(float(m["stage_seconds"]) for m in stages)
    return {
        f"{method}_wall_seconds": seconds,
        f"{method}_gpu_hours": seconds * gpus_per_step / 3600.0,
        f"{method}_train_tokens": sum(float(m["train_tokens"]) for m in stages),
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
    return f"{a / b:.1f}x" if b > 0 else "n/a"


def verdict(m: Mapping[str, float], *, judge_is_rlhf_reward_model: bool) -> list[str]:
    """A short verdict in plain words, each sentence with the numbers behind it."""
    lc = m["rlhf_lc_win_rate_vs_dpo"]
    raw = m["rlhf_win_rate_vs_dpo"]
    if lc > 0.55:
        quality = (
            f"RLHF (reward model + PPO) gave the better answers: the judge prefers its answer to DPO's on "
            f"{raw:.0%} of prompts ({lc:.0%} length-controlled), mean judge reward "
            f"{m['rlhf_judge_reward']:.3g} vs {m['dpo_judge_reward']:.3g}."
        )
    elif lc < 0.45:
        quality = (
            f"DPO gave the better answers: the judge prefers its answer to RLHF's on "
            f"{m['dpo_win_rate_vs_rlhf']:.0%} of prompts ({1 - lc:.0%} length-controlled), mean judge reward "
            f"{m['dpo_judge_reward']:.3g} vs {m['rlhf_judge_reward']:.3g}."
        )
    else:
        quality = (
            f"Neither method is clearly better: head to head RLHF wins {raw:.0%} of prompts ({lc:.0%} "
            f"length-controlled, within 45-55%), mean judge reward {m['rlhf_judge_reward']:.3g} (RLHF) vs "
            f"{m['dpo_judge_reward']:.3g} (DPO)."
        )
    cost = (
        f"RLHF cost {_ratio(m['rlhf_wall_seconds'], m['dpo_wall_seconds'])} DPO's wall time "
        f"({m['rlhf_wall_seconds']:.0f} s vs {m['dpo_wall_seconds']:.0f} s after the shared SFT step), "
        f"{m['rlhf_gpu_hours']:.3g} vs {m['dpo_gpu_hours']:.3g} GPU-hours requested and "
        f"{_ratio(m['rlhf_peak_memory_mb'], m['dpo_peak_memory_mb'])} its peak memory."
    )
    drift = (
        f"Against the SFT model, RLHF drifted {m['rlhf_kl_to_sft']:.3g} nats per response (KL) and DPO "
        f"{m['dpo_kl_to_sft']:.3g}; they beat it on {m['rlhf_win_rate_vs_sft']:.0%} and "
        f"{m['dpo_win_rate_vs_sft']:.0%} of prompts; distinct-2 {m['rlhf_distinct_2']:.3g} vs "
        f"{m['dpo_distinct_2']:.3g}, answers of {m['rlhf_mean_length']:.1f} vs {m['dpo_mean_length']:.1f} tokens."
    )
    sentences = [quality, cost, drift]
    if judge_is_rlhf_reward_model:
        sentences.append(
            "Caution: the judge is the reward model PPO was optimised against, which favours RLHF; give the "
            "pipeline an independent judge_model for a fair verdict."
        )
    return sentences


def _frontier(path: str | None) -> list[dict[str, Any]]:
    return [row.record or {} for row in read_artifact_rows(path)] if path else []


def _frontier_chart(points: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    key = "reward" if all("reward" in p for ps in points.values() for p in ps) else "implicit_reward_accuracy"
    series = {
        method.upper(): [
            (p["kl"], p[key]) for p in sorted(ps, key=lambda p: p["step"]) if p.get(key) is not None
        ]
        for method, ps in points.items()
    }
    labels = [
        (p["kl"], p[key], f"{m} {p['label']}")
        for m, ps in points.items()
        for p in ps
        if p.get(key) is not None
    ]
    ylabel = "mean judge reward" if key == "reward" else "held-out implicit-reward accuracy"
    return reports.scatter_path(
        series, labels, "Reward vs KL to the SFT model, both methods", "KL, nats", ylabel
    )


def compare(
    *,
    training: Mapping[str, Mapping[str, float]],
    evaluations: Mapping[str, Mapping[str, float]],
    generations: Mapping[str, str],
    frontiers: Mapping[str, str | None],
    report_path: str,
    gpus_per_step: int = 0,
    judge_is_rlhf_reward_model: bool = True,
) -> dict[str, float]:
    """Compare the DPO and RLHF policies of one run; write the HTML report and return flat metrics.

    Args:
        training: Metrics of the training steps by stage: ``sft``, ``dpo``, ``reward``, ``ppo``.
        evaluations: Evaluation metrics by method (``dpo``, ``rlhf``), both against the SFT model, same judge.
        generations: The evaluations' generations (JSONL with per-prompt ``candidate_reward``) by method.
        frontiers: The evaluations' reward-vs-KL points (JSONL) by method, or None.
        report_path: Where the HTML report goes.
        gpus_per_step: GPUs each training step requests (for GPU-hours); 0 when run on CPU.
        judge_is_rlhf_reward_model: The judge is the RLHF branch's own reward model (the verdict says so).

    Returns:
        ``<method>_*`` figures for both methods, the head-to-head win rates, ``sft_wall_seconds``.
    """
    metrics: dict[str, float] = {"sft_wall_seconds": float(training["sft"]["stage_seconds"])}
    for method in METHODS:
        metrics.update(method_figures(method, training, evaluations[method], gpus_per_step))
    rows = {method: _generations(generations[method], method) for method in METHODS}
    metrics.update(head_to_head(rows["dpo"], rows["rlhf"]))
    sentences = verdict(metrics, judge_is_rlhf_reward_model=judge_is_rlhf_reward_model)
    points = {method: _frontier(frontiers.get(method)) for method in METHODS}
    reports.write(report_path, _report(metrics, rows, points, sentences, gpus_per_step))
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
    ("KL to SFT (nats / response)", "kl_to_sft"),
    ("distinct-2", "distinct_2"),
    ("diversity ratio vs SFT", "diversity_ratio_vs_sft"),
    ("mean response length (tokens)", "mean_length"),
]


def _report(
    metrics: Mapping[str, float],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    points: Mapping[str, Sequence[Mapping[str, Any]]],
    sentences: Sequence[str],
    gpus_per_step: int,
) -> str:
    table = [
        {"figure": name, "DPO": metrics[f"dpo_{key}"], "RLHF": metrics[f"rlhf_{key}"]}
        for name, key in _FIGURES
    ]
    h2h = {
        "DPO wins": metrics["dpo_win_rate_vs_rlhf"],
        "RLHF wins": metrics["rlhf_win_rate_vs_dpo"],
    }
    side_by_side = [
        {
            "prompt": d["prompt"],
            "DPO": d["candidate"],
            "RLHF": r["candidate"],
            "DPO reward": d["candidate_reward"],
            "RLHF reward": r["candidate_reward"],
        }
        for d, r in zip(rows["dpo"], rows["rlhf"], strict=True)
    ]
    costs = {"DPO": metrics["dpo_wall_seconds"], "RLHF": metrics["rlhf_wall_seconds"]}
    sections = [
        ("Verdict", "".join(f"<p>{reports.escape(s)}</p>" for s in sentences)),
        ("Side by side", reports.table(table, ["figure", "DPO", "RLHF"])),
        (
            "Head to head under the judge",
            reports.bar_chart(h2h, "Share of prompts where the judge prefers each (ties split)", "share")
            + reports.key_values(
                {k: v for k, v in metrics.items() if "vs_dpo" in k or "vs_rlhf" in k or "head" in k}
            ),
        ),
        ("Cost", reports.bar_chart(costs, "Wall time of each method's own steps", "seconds")),
    ]
    if any(points.values()):
        sections.append(("Reward vs KL over training", _frontier_chart(points)))
    sections += [
        ("All figures", reports.key_values(dict(metrics))),
        ("Answers to the same prompts", reports.table(side_by_side)),
    ]
    note = (
        f"Both methods start from the same SFT model ({metrics['sft_wall_seconds']:.0f} s, shared) and are "
        f"evaluated on the same prompts, seed and judge. GPU-hours = wall time x {gpus_per_step} GPU(s) per step."
    )
    return reports.page("RLHF or DPO: the comparison", sections, intro=note)
