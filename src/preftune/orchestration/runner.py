"""Run a pipeline on this machine through KFP's local runner and summarise what it produced.

``kfp.local`` executes each task as a subprocess of this Python, under ``<pipeline root>/<pipeline>-<time>/``.
It keeps no run record of its own, so the summary is rebuilt from the task directories: a task that wrote its
executor output succeeded, one with a directory but no executor output failed, and one without a directory never
ran (an upstream task failed).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
NOT_RUN = "NOT_RUN"
SKIPPED = "SKIPPED"  # inside a condition (dsl.If) whose test was false: not a failure


def project_root() -> Path | None:
    """The source checkout preftune runs from, when there is one (it holds the bundled examples)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "examples").is_dir() else None


def _absolute_local(value: str, is_default: bool) -> str:
    """Make relative local paths absolute, so subprocess tasks and lineage see the same file."""
    if not value or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return value
    if path.exists():
        return str(path.resolve())
    root = project_root()
    if is_default and root is not None and (root / path).exists():
        return str(root / path)
    return value


def resolve_arguments(pipeline: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter's value for a local run: defaults, then overrides, local paths made absolute."""
    arguments: dict[str, Any] = {}
    for name, spec in (pipeline.component_spec.inputs or {}).items():
        value = overrides.get(name, spec.default)
        if isinstance(value, str):
            value = _absolute_local(value, is_default=name not in overrides)
        arguments[name] = value
    return arguments


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _task_summaries(spec: dict[str, Any], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Status, metrics and artifact URIs of every task in the pipeline's DAG (nested DAGs included)."""
    components = spec.get("components", {})
    executors = spec.get("deploymentSpec", {}).get("executors", {})
    steps: dict[str, dict[str, Any]] = {}
    importers: dict[str, dict[str, Any]] = {}
    ended: dict[str, float] = {}  # when each task's directory last changed: the order the run went in

    def visit(dag: dict[str, Any], conditional: bool = False) -> None:
        for task_name, task in dag.get("tasks", {}).items():
            comp_name = task["componentRef"]["name"]
            comp = components.get(comp_name, {})
            if "dag" in comp:  # a sub-DAG (condition, loop): its tasks are reported themselves
                visit(comp["dag"], conditional or "triggerPolicy" in task)
                continue
            importer = executors.get(comp.get("executorLabel", ""), {}).get("importer")
            if importer is not None:  # runs inside the orchestrator: no task directory of its own
                importers[task_name] = {"task": task, "importer": importer}
                continue
            task_dir = run_dir / comp_name.removeprefix("comp-")
            output_file = task_dir / "executor_output.json"
            if output_file.is_file():
                status = SUCCEEDED
            elif task_dir.is_dir():
                status = FAILED
            else:
                status = SKIPPED if conditional else NOT_RUN
            if status != SUCCEEDED:
                ended[task_name] = task_dir.stat().st_mtime if task_dir.is_dir() else float("inf")
            else:
                ended[task_name] = output_file.stat().st_mtime
            kinds = {
                name: out["artifactType"]["schemaTitle"]
                for name, out in comp.get("outputDefinitions", {}).get("artifacts", {}).items()
            }
            executor_output = _read_json(output_file) if status == SUCCEEDED else {}
            artifacts: dict[str, str] = {}
            metrics: dict[str, float] = {}
            for name, entry in executor_output.get("artifacts", {}).items():
                for artifact in entry.get("artifacts", []):
                    artifacts[name] = artifact.get("uri", "")
                    if kinds.get(name) == "system.Metrics":
                        metrics.update(artifact.get("metadata", {}))
            outputs = dict(executor_output.get("parameterValues", {}))
            for name in comp.get("outputDefinitions", {}).get("parameters", {}):
                written = task_dir / name  # an OutputPath parameter the component wrote as a file
                if status == SUCCEEDED and name not in outputs and written.is_file():
                    outputs[name] = written.read_text(encoding="utf-8")
            steps[task_name] = {
                "display_name": task.get("taskInfo", {}).get("name", task_name),
                "status": status,
                "metrics": metrics,
                "artifacts": artifacts,
                "outputs": outputs,
            }

    visit(spec.get("root", {}).get("dag", {}))
    _add_importers(importers, steps, spec)
    # importers run before the tasks that read them; tasks that never ran come last, by name
    order = sorted(steps, key=lambda name: (ended.get(name, float("-inf")), name))
    return {name: steps[name] for name in order}


def _add_importers(
    importers: dict[str, dict[str, Any]], steps: dict[str, dict[str, Any]], spec: dict
) -> None:
    """An importer succeeded when a task consuming its artifact ran; its artifact is the imported URI."""
    consumers: dict[str, set[str]] = {name: set() for name in importers}

    def collect(dag: dict[str, Any]) -> None:
        for task_name, task in dag.get("tasks", {}).items():
            comp = spec.get("components", {}).get(task["componentRef"]["name"], {})
            if "dag" in comp:
                collect(comp["dag"])
            for artifact in task.get("inputs", {}).get("artifacts", {}).values():
                producer = artifact.get("taskOutputArtifact", {}).get("producerTask")
                if producer in consumers:
                    consumers[producer].add(task_name)

    collect(spec.get("root", {}).get("dag", {}))
    for name, entry in importers.items():
        ran = any(steps.get(c, {}).get("status") in (SUCCEEDED, FAILED) for c in consumers[name])
        uri = entry["importer"].get("artifactUri", {}).get("runtimeParameter") or entry["importer"].get(
            "artifactUri", {}
        ).get("constant", "")
        steps[name] = {
            "display_name": entry["task"].get("taskInfo", {}).get("name", name),
            "status": SUCCEEDED if ran else NOT_RUN,
            "metrics": {},
            "artifacts": {"artifact": uri} if isinstance(uri, str) and uri else {},
        }


def summarize(pipeline: Any, run_dir: Path, arguments: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """The run summary written to ``<run dir>/summary.json``."""
    from google.protobuf import json_format

    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    steps = _task_summaries(spec, run_dir)
    ok = bool(steps) and all(step["status"] in (SUCCEEDED, SKIPPED) for step in steps.values())
    return {
        "pipeline": pipeline.name,
        "status": SUCCEEDED if ok else FAILED,
        "run_dir": str(run_dir),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_seconds": round(seconds, 1),
        "parameters": dict(arguments),
        "steps": steps,
    }


def run_pipeline(pipeline: Any, overrides: Mapping[str, Any], pipeline_root: str | Path) -> dict[str, Any]:
    """Run a pipeline with ``kfp.local`` (SubprocessRunner, this Python) and write its summary.json."""
    from kfp import local

    root = Path(pipeline_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    arguments = resolve_arguments(pipeline, overrides)
    before = {p.name for p in root.iterdir()}
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=False)
    start = time.monotonic()
    with warnings.catch_warnings():
        # the runtime image name is for the cluster; locally every task runs in this Python
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        pipeline(**arguments)
    seconds = time.monotonic() - start
    new_dirs = sorted(
        (
            p
            for p in root.iterdir()
            if p.is_dir() and p.name not in before and p.name.startswith(pipeline.name)
        ),
        key=lambda p: p.stat().st_mtime,
    )
    if not new_dirs:
        raise RuntimeError(f"the local runner left no run directory under {root}")
    run_dir = new_dirs[-1]
    summary = summarize(pipeline, run_dir, arguments, seconds)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    return summary


def _decision_lines(decision: Any) -> list[str]:
    """A gate's verdict and reasons, from its JSON ``decision`` output."""
    try:
        verdict = json.loads(decision) if isinstance(decision, str) else None
    except ValueError:
        return []
    if not isinstance(verdict, dict) or "promote" not in verdict:
        return []
    lines = [f"              {'PROMOTE' if verdict['promote'] else 'DO NOT PROMOTE'}"]
    return lines + [f"              - {reason}" for reason in verdict.get("reasons", [])]


#: Steps whose string output is a verdict in sentences, printed under the step.
VERDICT_STEPS = {"compare"}


def format_summary(summary: Mapping[str, Any], headline: Mapping[str, list[str]] | None = None) -> str:
    """A short human-readable account of a run: each step's status and its headline metrics."""
    lines = [f"{summary['pipeline']}: {summary['status']} in {summary['duration_seconds']:.0f}s"]
    for name, step in summary["steps"].items():
        lines.append(f"  {step['status']:<9} {name} ({step['display_name']})")
        wanted = (headline or {}).get(name)
        metrics = step["metrics"]
        for key in wanted if wanted is not None else []:
            if key in metrics:
                lines.append(f"              {key} = {metrics[key]:.4g}")
        lines += _decision_lines(step.get("outputs", {}).get("decision"))
        if name in VERDICT_STEPS and isinstance(step.get("outputs", {}).get("Output"), str):
            lines += [f"              {sentence}" for sentence in step["outputs"]["Output"].splitlines()]
    lines.append(f"run directory: {summary['run_dir']}")
    lines.append(f"summary:       {Path(summary['run_dir']) / 'summary.json'}")
    return "\n".join(lines)
