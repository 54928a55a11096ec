"""A local run's summary: every task of the pipeline with its status, metrics, outputs and, if it failed, why.

The summary is built from two sources: the compiled pipeline spec (which tasks exist, their display names,
output types, which sit inside a condition) and the runner's record of what each task did (status, time,
outputs, whether it came from the cache, the error a failed step recorded). Tasks the run never reached are
``NOT_RUN`` (an upstream task failed or the run was interrupted) or ``SKIPPED`` (inside a condition, such as
the promotion after a gate that said no, whose test was false).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.eval.methods import METHODS

SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
NOT_RUN = "NOT_RUN"
SKIPPED = "SKIPPED"  # inside a condition (dsl.If) whose test was false: not a failure
INTERRUPTED = "INTERRUPTED"  # the run was stopped (Ctrl-C, SIGTERM) while this step ran

#: Metrics printed after a local run, by task name (the full set is in summary.json and the run index).
HEADLINE_METRICS: dict[str, list[str]] = {
    "ingest": ["rows_input", "rows_train", "rows_eval", "rows_rejected"],
    "preference-import": ["rows_input", "rows_used", "rows_rejected", "pairs_train", "pairs_eval"],
    "sft": ["train_loss", "eval_loss", "eval_perplexity"],
    "dpo": ["first_step_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"],
    "reward-model": ["first_eval_accuracy", "eval_accuracy", "eval_mean_margin"],
    "ppo": ["reward_first", "reward_last", "kl_last", "kl_max", "early_stops"],
    "grpo": ["reward_first", "reward_last", "kl_last", "kl_max", "kl_blowups"],
    "kto": ["first_step_loss", "eval_loss", "eval_reward_accuracy", "eval_kl"],
    "online-dpo": ["reward_first", "reward_last", "kl_last", "kl_max", "pairs"],
    "evaluate": [
        "win_rate_vs_reference",
        "lc_win_rate_vs_reference",
        "win_rate_vs_champion",
        "lc_win_rate_vs_champion",
        "judge_reward_candidate",
        "judge_reward_reference",
        "kl_candidate_reference",
        "implicit_reward_accuracy",
        "distinct_2_candidate",
        "distinct_2_reference",
        "mean_length_candidate",
        "frontier_points",
    ],
    "promote": ["version"],
    "compare": [
        "rlhf_win_rate_vs_dpo",
        "dpo_win_rate_vs_rlhf",
        *(f"{method}_head_to_head" for method in METHODS),
        "head_to_head_ties",
        "head_to_head_prompts",
    ],
}
for _k in range(2, 7):  # the compare pipeline's other evaluations, one per method
    HEADLINE_METRICS[f"evaluate-{_k}"] = HEADLINE_METRICS["evaluate"]
HEADLINE_METRICS["grpo-2"] = HEADLINE_METRICS["grpo"]  # the compare pipeline's RLOO step

#: Metrics about DPO's implicit reward: they mean something only for a policy trained by DPO.
DPO_ONLY_METRICS = frozenset({"implicit_reward_accuracy", "implicit_reward_margin"})
#: Steps whose string output is a verdict in sentences, printed under the step.
VERDICT_STEPS = {"compare"}
_INDENT = " " * 14


@dataclass
class TaskSpec:
    """One component task of a compiled pipeline, as the summary needs it."""

    name: str
    display_name: str
    component: str
    conditional: bool = False
    importer: bool = False
    artifact_types: dict[str, str] = field(default_factory=dict)
    inputs_from: dict[str, str] = field(default_factory=dict)  # input artifact -> the task producing it


def spec_tasks(spec: Mapping[str, Any]) -> list[TaskSpec]:
    """Every task that runs something (component or importer), nested DAGs (conditions, loops) included."""
    components = spec.get("components", {})
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    found: list[TaskSpec] = []

    def visit(dag: Mapping[str, Any], conditional: bool) -> None:
        for name, task in dag.get("tasks", {}).items():
            comp_name = task["componentRef"]["name"]
            comp = components.get(comp_name, {})
            if "dag" in comp:
                visit(comp["dag"], conditional or "triggerPolicy" in task)
                continue
            outputs = comp.get("outputDefinitions", {}).get("artifacts", {})
            producers = {
                key: value["taskOutputArtifact"]["producerTask"]
                for key, value in task.get("inputs", {}).get("artifacts", {}).items()
                if "taskOutputArtifact" in value
            }
            found.append(
                TaskSpec(
                    name=name,
                    display_name=task.get("taskInfo", {}).get("name", name),
                    component=comp_name,
                    conditional=conditional,
                    importer="importer" in executors.get(comp.get("executorLabel", ""), {}),
                    artifact_types={k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()},
                    inputs_from=producers,
                )
            )

    visit(spec.get("root", {}).get("dag", {}), False)
    return found


def _step(task: TaskSpec, record: Mapping[str, Any] | None, run_failed: bool) -> dict[str, Any]:
    """One task's entry in the summary, from its record (None: it never started)."""
    record = record or {}
    status = record.get("status") or (SKIPPED if task.conditional and not run_failed else NOT_RUN)
    artifacts = record.get("artifacts", {})
    metrics: dict[str, Any] = {}
    for name, artifact in artifacts.items():
        if task.artifact_types.get(name) == "system.Metrics":
            metrics.update(artifact.get("metadata", {}))
    return {
        "display_name": task.display_name,
        "component": task.component,
        "status": status,
        "metrics": metrics,
        "artifacts": {name: artifact.get("uri", "") for name, artifact in artifacts.items()},
        "artifact_types": {name: task.artifact_types.get(name, "system.Artifact") for name in artifacts},
        "outputs": dict(record.get("parameters", {})),
        "inputs_from": dict(task.inputs_from),
        "seconds": record.get("seconds"),
        "cached": bool(record.get("cached")),
        "attempts": record.get("attempts", 0),
        "error": record.get("error"),
        "log": record.get("log"),
    }


def task_steps(tasks: list[TaskSpec], records: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every task's summary entry: those that ran in the order they started, then the others by name."""
    run_failed = any(r.get("status") in (FAILED, INTERRUPTED) for r in records.values())
    by_name = {task.name: task for task in tasks}
    steps = {
        name: _step(by_name[name], record, run_failed) for name, record in records.items() if name in by_name
    }
    for task in sorted(tasks, key=lambda t: t.name):
        steps.setdefault(task.name, _step(task, None, run_failed))
    return steps


def overall_status(steps: Mapping[str, Mapping[str, Any]], interrupted: bool) -> str:
    """SUCCEEDED when every task succeeded or was skipped by its condition."""
    if interrupted:
        return INTERRUPTED
    ok = bool(steps) and all(step["status"] in (SUCCEEDED, SKIPPED) for step in steps.values())
    return SUCCEEDED if ok else FAILED


# ------------------------------------------------------------------------------------------------- printing


def _decision_lines(decision: Any) -> list[str]:
    """A gate's verdict and reasons, from its JSON ``decision`` output."""
    try:
        verdict = json.loads(decision) if isinstance(decision, str) else None
    except ValueError:
        return []
    if not isinstance(verdict, dict) or "promote" not in verdict:
        return []
    lines = [f"{_INDENT}{'PROMOTE' if verdict['promote'] else 'DO NOT PROMOTE'}"]
    return lines + [f"{_INDENT}- {reason}" for reason in verdict.get("reasons", [])]


def _shown_metrics(
    name: str, step: Mapping[str, Any], steps: Mapping[str, Any], headline: Mapping
) -> list[str]:
    """``key = value`` for the step's headline metrics; DPO-only metrics only for a policy DPO trained."""
    producer = steps.get(step.get("inputs_from", {}).get("candidate", ""), {})
    trained_by_dpo = str(producer.get("component", "")).startswith("comp-dpo")
    shown = []
    keys = headline.get(name) or headline.get(re.sub(r"-\d+$", "", name), [])  # evaluate-2: another branch's
    for key in keys:
        value = step["metrics"].get(key)
        if value is None or (key in DPO_ONLY_METRICS and not trained_by_dpo):
            continue
        shown.append(f"{key} = {value:.4g}" if isinstance(value, int | float) else f"{key} = {value}")
    return shown


def _packed(items: list[str], width: int = 110) -> list[str]:
    """Items joined by commas into indented lines no wider than ``width``, never splitting an item."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += f", {item}"
        else:
            lines.append(_INDENT + item)
    return lines


def _step_lines(name: str, step: Mapping[str, Any], steps: Mapping[str, Any], headline: Mapping) -> list[str]:
    how = " (cached)" if step.get("cached") else ""
    lines = [f"  {step['status']:<11} {name}{how}"]
    lines += _packed(_shown_metrics(name, step, steps, headline))
    if step.get("error"):
        lines += textwrap.wrap(f"error: {step['error']}", width=110, initial_indent=_INDENT,
                               subsequent_indent=_INDENT + "  ", max_lines=6)  # fmt: skip
    if step["status"] in (FAILED, INTERRUPTED) and step.get("log"):
        lines.append(f"{_INDENT}log: {step['log']}")
    outputs = step.get("outputs", {})
    lines += _decision_lines(outputs.get("decision"))
    if name in VERDICT_STEPS and isinstance(outputs.get("Output"), str):
        lines += [f"{_INDENT}{sentence}" for sentence in outputs["Output"].splitlines()]
    return lines


def format_summary(summary: Mapping[str, Any], headline: Mapping[str, list[str]] | None = None) -> str:
    """A short account of a run: each step's status and headline metrics, why a step failed, where it all is."""
    headline = HEADLINE_METRICS if headline is None else headline
    seconds = summary.get("duration_seconds") or 0
    lines = [f"{summary['pipeline']}: {summary['status']} in {seconds:.0f} s"]
    steps = summary["steps"]
    skipped = [name for name, step in steps.items() if step["status"] == SKIPPED]
    for name, step in steps.items():
        if step["status"] != SKIPPED:
            lines += _step_lines(name, step, steps, headline)
    if skipped:  # dsl.If branches not taken (other methods, a gate that said no): one line, not one per step
        lines += textwrap.wrap(", ".join(skipped) + " (their condition was false)", width=110,
                               initial_indent=f"  {SKIPPED:<11} ", subsequent_indent=_INDENT)  # fmt: skip
    run_dir = Path(summary["run_dir"])
    if summary["status"] in (FAILED, INTERRUPTED) and summary.get("resume"):
        lines.append(f"resume with:   {summary['resume']}")
    lines.append(f"run directory: {run_dir}")
    if summary.get("index"):
        lines.append(f"reports:       {summary['index']}  (open it in a browser)")
    lines.append(f"summary:       {run_dir / 'summary.json'}")
    return "\n".join(lines)
