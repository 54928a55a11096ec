"""``preftune runs``: the local runs under a pipeline root, with their status and headline figures."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preftune.orchestration import run_dirs

#: Figures a run is known by, in the order shown: (step, metric, label).
_FIGURES = (
    ("dpo", "eval_reward_accuracy", "reward acc"),
    ("reward-model", "eval_accuracy", "RM acc"),
    ("ppo", "reward_last", "reward"),
    ("evaluate", "win_rate_vs_reference", "win vs SFT"),
    ("evaluate", "kl_candidate_reference", "KL"),
    ("evaluate-2", "win_rate_vs_reference", "RLHF win vs SFT"),
    ("compare", "rlhf_win_rate_vs_dpo", "RLHF vs DPO"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "--pipeline-root", default="runs", help="directory the runs were written to (default: ./runs)"
    )


def _verdict(steps: Mapping[str, Any]) -> str:
    """``promoted v2`` / ``not promoted`` from the promote and gate steps."""
    promote = steps.get("promote", {})
    if promote.get("status") == "SUCCEEDED" and "version" in promote.get("metrics", {}):
        return f"promoted v{promote['metrics']['version']:.0f}"
    try:
        decision = json.loads(steps.get("gate", {}).get("outputs", {}).get("decision", ""))
    except ValueError:
        return ""
    if not isinstance(decision, dict) or "promote" not in decision:
        return ""
    return "gate passed (no registry)" if decision["promote"] else "gate said no"


def headline(summary: Mapping[str, Any]) -> str:
    """A run's figures in one line (or where it failed and why)."""
    steps = summary.get("steps", {})
    failed = [(name, step) for name, step in steps.items() if step.get("status") == "FAILED"]
    if failed:
        name, step = failed[0]
        return f"{name} failed: {step.get('error') or 'see its log'}"
    shown = []
    for step, metric, label in _FIGURES:
        value = steps.get(step, {}).get("metrics", {}).get(metric)
        if isinstance(value, int | float):
            shown.append(f"{label} {value:.3g}")
    verdict = _verdict(steps)
    return ", ".join(shown + ([verdict] if verdict else []))


def _row(run: run_dirs.RunInfo) -> list[str]:
    seconds = run.summary.get("duration_seconds")
    took = f"{seconds:.0f} s" if isinstance(seconds, int | float) and run.status != "RUNNING" else ""
    when = run.created.replace("T", " ").split("+")[0]
    return [run.run_id, run.status, when, took, headline(run.summary) if run.status != "RUNNING" else ""]


def format_runs(runs: list[run_dirs.RunInfo]) -> str:
    """The runs as an aligned table (the last column, the headline, left to run on)."""
    rows = [["RUN", "STATUS", "STARTED (UTC)", "TIME", "HEADLINE"], *(_row(run) for run in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ).rstrip()


def run(args: argparse.Namespace) -> int:
    """Print the runs under ``--pipeline-root``; 0, or 2 when it is not a directory."""
    root = Path(args.pipeline_root).expanduser()
    if not root.is_dir():
        print(f"preftune runs: no runs: {root} is not a directory (give --pipeline-root)", file=sys.stderr)
        return 2
    runs = list(run_dirs.runs_under(root))
    if not runs:
        print(f"no runs under {root}")
        return 0
    print(format_runs(runs))
    interrupted = [r for r in runs if r.status in ("INTERRUPTED", "FAILED") and r.record]
    if interrupted:
        last = interrupted[-1]
        name = last.pipeline.removeprefix("preftune-")
        print(f"\nresume {last.run_id} with: preftune run {name} --resume {last.path}")
    return 0
