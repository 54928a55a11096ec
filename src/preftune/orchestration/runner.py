"""Run a pipeline on this machine through KFP's local runner: quietly, each run in its own directory, resumable.

``kfp.local`` runs each task as a subprocess of this Python. Around it, a run here:

- gets its own directory, made before anything runs (:mod:`.run_dirs`), named by KFP's local runner as the
  pipeline's resource name; ``run.json`` records its arguments and attempts and ``.lock`` is held meanwhile;
- prints one line per step and writes each step's output to ``<run dir>/logs/<task>.log`` (``verbose`` shows
  everything as KFP does); KFP's own log goes to ``logs/kfp.log``;
- uses KFP's local cache (under ``<pipeline root>/.cache``, or the run's own with ``cache=False``), so a second
  pipeline with the same ingest and SFT inputs reuses those steps, and ``resume`` reruns the run in its own
  directory: finished steps come from the cache and the interrupted one restarts from its checkpoints, which
  sit next to its outputs;
- starts each step through :mod:`.step_main`, which stops the step's process group when this process dies
  and records why a step failed; a configuration or data error is not retried, other failures are, at once
  (the backoff of ``set_retry`` is for a cluster's preempted pods);
- writes ``summary.json`` (:mod:`.run_summary`) and ``index.html`` (:mod:`preftune.report.run_index`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from preftune.orchestration import oneof_outputs, run_dirs, step_main
from preftune.orchestration.console import STEP_ENV, Console, duration, parse_progress
from preftune.orchestration.run_dirs import RunDirError, now, read_json, write_json
from preftune.orchestration.run_summary import (
    FAILED,
    HEADLINE_METRICS,
    INTERRUPTED,
    NOT_RUN,
    SKIPPED,
    SUCCEEDED,
    format_summary,
    overall_status,
    spec_tasks,
    task_steps,
)

__all__ = [
    "FAILED",
    "INTERRUPTED",
    "NOT_RUN",
    "SKIPPED",
    "SUCCEEDED",
    "RunDirError",
    "format_summary",
    "project_root",
    "resolve_arguments",
    "run_pipeline",
]

CACHE = ".cache"
#: Warnings of KFP's local runner about settings that matter on a cluster only.
LOCAL_NOOP_WARNINGS = (r".*have no effect in the current local runner.*", r".*non-Python base image.*")
_STEP_MODULE = "preftune.orchestration.step_main"


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


# ------------------------------------------------------------------------------------ one step's subprocess


def _lines(stream: Any) -> Iterator[str]:
    """Lines of a step's output as they come, split at ``\\n`` and at tqdm's ``\\r``."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := os.read(stream.fileno(), 65536):
        pending += decoder.decode(chunk).replace("\r\n", "\n").replace("\r", "\n")
        *complete, pending = pending.split("\n")
        yield from complete
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def _stop(process: subprocess.Popen) -> None:
    """Stop a step and everything it started (its own process group): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(OSError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _StepLog:
    """A step's log file: its output, with progress lines kept only at each tenth of the way."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.last: dict[str, int] = {}

    def write(self, line: str) -> None:
        self.file.write(line + "\n")

    def progress(self, desc: str, done: float, total: float | None) -> None:
        tenth = int(10 * done / total) if total else int(done).bit_length()
        if self.last.get(desc) != tenth:
            self.last[desc] = tenth
            self.write(
                f"progress: {desc} {done:.0f}/{total:.0f}" if total else f"progress: {desc} {done:.0f}"
            )


# ---------------------------------------------------------------------------------- the seams into kfp.local


class LocalExecution:
    """kfp.local with what a preftune run adds, for the duration of one run.

    Four functions of kfp.local are replaced while it runs (and put back after): the pipeline's resource name
    (this run's directory name), the execution of one task (step lines, retries, the record of each task), the
    subprocess of one step (its log file, progress, process group and failure record) and the outputs of a
    condition group (:mod:`.oneof_outputs`: artifacts through ``dsl.OneOf``).
    """

    def __init__(
        self, run_dir: Path, console: Console, *, verbose: bool, on_start: Callable[[str, int], None]
    ) -> None:
        self.run_dir = run_dir
        self.console = console
        self.verbose = verbose
        self.on_start = on_start
        self.records: dict[str, dict[str, Any]] = {}
        self._current = threading.local()
        self._restore: list[tuple[Any, str, Any]] = []
        self._pipe: tuple[int, int] | None = None

    def __enter__(self) -> LocalExecution:
        from kfp.local import executor_input_utils, subprocess_task_handler
        from kfp.local.orchestrator import orchestrator_utils, task_executor

        self._execute_task = task_executor.execute_single_task
        self._pipe = os.pipe()  # the read end goes to every step; the write end stays here until the run ends
        self._swap(executor_input_utils, "get_local_pipeline_resource_name", lambda _name: self.run_dir.name)
        self._swap(task_executor, "execute_single_task", self._execute)
        self._swap(subprocess_task_handler, "run_local_subprocess", self._run_step)
        self._swap(
            orchestrator_utils.OrchestratorUtils,
            "get_dag_output_artifacts",
            classmethod(oneof_outputs.dag_output_artifacts),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in reversed(self._restore):
            setattr(owner, name, value)
        self._restore.clear()
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def _swap(self, owner: Any, name: str, value: Any) -> None:
        # the attribute as stored (a classmethod object on a class), so putting it back restores it exactly
        self._restore.append((owner, name, inspect.getattr_static(owner, name)))
        setattr(owner, name, value)

    def _log_path(self, task: str) -> Path:
        return self.run_dir / run_dirs.LOGS / f"{task}.log"

    def _failure_path(self, task: str) -> Path:
        return self.run_dir / run_dirs.LOGS / f"{task}.failure.json"

    # ------------------------------------------------------------------------------------------- one task

    def _execute(self, *, task_name: str, task_spec: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        from kfp.local import status

        component = kwargs["components"][task_spec.component_ref.name]
        executor = kwargs["executors"][component.executor_label]
        importer = executor.WhichOneof("spec") == "importer"
        label = self.console.start(task_name)
        record: dict[str, Any] = {"status": None, "attempts": 0, "log": None}
        self.records[task_name] = record
        start = time.monotonic()
        try:
            outputs, result = self._attempts(task_name, task_spec, record, kwargs)
        except BaseException:
            record.update(status=INTERRUPTED, seconds=run_dirs.elapsed_since(start))
            self.console.finish(label, "interrupted")
            raise
        ok = result == status.Status.SUCCESS
        record.update(_plain_outputs(outputs))
        if ok:
            _write_metrics_files(record["artifacts"])
        record.update(status=SUCCEEDED if ok else FAILED, seconds=run_dirs.elapsed_since(start))
        record["cached"] = ok and not importer and record["attempts"] == 0
        if record["log"] is None and self._log_path(task_name).exists():  # it ran before this run was resumed
            record["log"] = str(self._log_path(task_name))
        self.console.finish(label, self._outcome(record, importer))
        return outputs, result

    def _attempts(
        self, task_name: str, task_spec: Any, record: dict[str, Any], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], Any]:
        """Run the task; retry a failure that may pass on another try (never a deterministic one)."""
        from kfp.local import status

        allowed = 1 + max(0, task_spec.retry_policy.max_retry_count)
        once = type(task_spec)()
        once.CopyFrom(task_spec)
        once.ClearField("retry_policy")  # retries are decided here, without the cluster's backoff
        previous = None
        for attempt in range(1, allowed + 1):
            self._current.task, self._current.record = task_name, record
            self._failure_path(task_name).unlink(missing_ok=True)
            outputs, result = self._execute_task(task_name=task_name, task_spec=once, **kwargs)
            if result == status.Status.SUCCESS or record["attempts"] < attempt:  # done, cached or imported
                if result == status.Status.SUCCESS:
                    record.pop("error", None)  # an earlier attempt's failure is history, kept in the log
                return outputs, result
            failure = self._failure(task_name, record)
            record["error"], record["error_deterministic"] = failure["text"], failure["deterministic"]
            if attempt == allowed or failure["deterministic"] or failure["text"] == previous:
                return outputs, result
            previous = failure["text"]
            self.console.line(
                f"      {task_name}: attempt {attempt} of {allowed} failed ({failure['text']}); trying again"
            )
        return outputs, result

    def _failure(self, task_name: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Why the step's last attempt failed: its own record, else how it ended."""
        found = read_json(self._failure_path(task_name))
        if found.get("type"):
            short = str(found["type"]).rsplit(".", 1)[-1]
            return {
                "text": f"{short}: {found.get('message', '')}",
                "deterministic": bool(found["deterministic"]),
            }
        code = record.get("returncode")
        if isinstance(code, int) and code < 0:
            return {"text": f"killed by {signal.Signals(-code).name}", "deterministic": False}
        return {"text": f"exited with code {code}; see {self._log_path(task_name)}", "deterministic": False}

    def _outcome(self, record: Mapping[str, Any], importer: bool) -> str:
        """What the step line says after ``...``."""
        if importer and record["status"] == SUCCEEDED:
            return "imported"
        if record.get("cached"):
            uris = [a["uri"] for a in record.get("artifacts", {}).values() if "://" not in a["uri"]]
            other = {
                Path(uri).relative_to(self.run_dir.parent).parts[0]
                for uri in uris
                if _under(uri, self.run_dir.parent)
            }
            if self.run_dir.name in other or not other:
                return "cached"
            return f"cached (from {sorted(other)[0]})"
        took = duration(record.get("seconds") or 0)
        if record["status"] == SUCCEEDED:
            return took
        return f"FAILED after {took}: {record.get('error', '')}"

    # ------------------------------------------------------------------------------------------- one step

    def _run_step(self, full_command: list[str], env_vars: Mapping[str, str] | None = None) -> int:
        """Start one step process (kfp.local's ``run_local_subprocess``) and follow it to its end."""
        task, record = self._current.task, self._current.record
        record["attempts"] += 1
        record["log"] = str(self._log_path(task))
        executor = f"-m {step_main.EXECUTOR_MODULE}"
        command = [part.replace(executor, f"-m {_STEP_MODULE}") for part in full_command]
        read_end = self._pipe[0] if self._pipe else -1
        env = {
            **os.environ,
            **(env_vars or {}),
            **STEP_ENV,
            "PYTHONUNBUFFERED": "1",
            step_main.PARENT_FD_ENV: str(read_end),
            step_main.FAILURE_FILE_ENV: str(self._failure_path(task)),
        }
        with open(self._log_path(task), "a", encoding="utf-8") as file:
            log = _StepLog(file)
            log.write(f"==== {task}: attempt {record['attempts']}, {now()}")
            file.flush()
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, pass_fds=(read_end,),
                start_new_session=True,
            )  # fmt: skip
            self.on_start(task, process.pid)
            try:
                self._relay(process, log)
                code = process.wait()
            except BaseException:
                _stop(process)
                raise
            log.write(f"==== {task}: exit code {code}")
        record["returncode"] = code
        return code

    def _relay(self, process: subprocess.Popen, log: _StepLog) -> None:
        """Step output to its log (and, verbose, to the screen); its progress to the console."""
        after_progress = False
        for line in _lines(process.stdout):
            progress = parse_progress(line)
            if progress is not None:
                self.console.progress(*progress)
                log.progress(*progress)
                after_progress = True
                continue
            if after_progress and not line.strip():
                continue  # the newline tqdm writes when a bar closes
            after_progress = False
            log.write(line)
            if self.verbose:
                print(line)  # noqa: T201 - KFP indents what a step prints; so do we


def _under(uri: str, root: Path) -> bool:
    try:
        Path(uri).relative_to(root)
    except ValueError:
        return False
    return True


def _write_metrics_files(artifacts: Mapping[str, Mapping[str, Any]]) -> None:
    """Write each Metrics artifact's values to its path as JSON.

    KFP's local runner keeps metrics in the executor output only, and its cache takes an output whose file is
    missing for a deleted one: without the file no step with metrics would ever come from the cache.
    """
    for artifact in artifacts.values():
        path = Path(artifact["uri"])
        if artifact["type"] == "system.Metrics" and "://" not in artifact["uri"] and not path.exists():
            write_json(path, artifact["metadata"])


def _plain_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """A task's outputs as JSON: artifacts (URI, type, metadata) apart from parameter values."""
    from kfp import dsl

    artifacts: dict[str, dict[str, Any]] = {}
    parameters: dict[str, Any] = {}
    for name, value in (outputs or {}).items():
        if isinstance(value, list) and value and all(isinstance(v, dsl.Artifact) for v in value):
            value = value[0]
        if isinstance(value, dsl.Artifact):
            artifacts[name] = {"uri": value.uri, "type": value.schema_title, "metadata": dict(value.metadata)}
        else:
            parameters[name] = value
    return {"artifacts": artifacts, "parameters": parameters}


# --------------------------------------------------------------------------------------------------- a run


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C: the running step is stopped and the summary still written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_run(
    pipeline: Any, overrides: Mapping[str, Any], root: Path, resume: str | None, cache: bool
) -> tuple[Path, dict[str, Any]]:
    """This run's directory and record: a new one, or the one ``resume`` names (with its arguments)."""
    if resume is None:
        run_dir = run_dirs.new_run_dir(root, pipeline.name)
        record = {
            "run_id": run_dir.name,
            "pipeline": pipeline.name,
            "created": now(),
            "created_ns": time.time_ns(),  # orders runs started within the same second
            "parameters": resolve_arguments(pipeline, overrides),
            "cache_root": str(root / CACHE if cache else run_dir / CACHE),
        }
        return run_dir, record
    if overrides:
        raise RunDirError("a resumed run keeps its own parameters: give --resume without --param")
    run = run_dirs.find_run(root, resume)
    if run.record.get("pipeline") != pipeline.name:
        found = run.record.get("pipeline") or "an older preftune (no run.json)"
        raise RunDirError(
            f"run {run.run_id} is a run of {found}, not of {pipeline.name}: it cannot be resumed so"
        )
    return run.path, dict(run.record)


def run_pipeline(
    pipeline: Any,
    overrides: Mapping[str, Any],
    pipeline_root: str | Path,
    *,
    resume: str | None = None,
    cache: bool = True,
    verbose: bool = False,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Run a pipeline with ``kfp.local`` (this Python) in a directory of its own and return its summary.

    ``resume`` names an earlier run (its directory, or its id under ``pipeline_root``) to finish instead of
    starting a new one. ``out`` receives the step lines (default: standard output). RunDirError when the root or
    the run to resume cannot be used; nothing has run then.
    """
    given = Path(resume).expanduser() if resume else None
    # a run given by its directory is resumed where it is, whatever --pipeline-root says
    root = run_dirs.check_root(given.resolve().parent if given and given.is_dir() else pipeline_root)
    run_dir, record = _open_run(pipeline, overrides, root, resume, cache)
    lock = run_dirs.RunLock(run_dir)
    lock.acquire()
    try:
        return _run_locked(pipeline, run_dir, record, verbose=verbose, out=out or sys.stdout, resumed=resume)
    finally:
        lock.release()


def _run_locked(
    pipeline: Any, run_dir: Path, record: dict[str, Any], *, verbose: bool, out: TextIO, resumed: str | None
) -> dict[str, Any]:
    from google.protobuf import json_format
    from kfp import local

    record = run_dirs.start_attempt(run_dir, record)
    (run_dir / run_dirs.LOGS).mkdir(exist_ok=True)
    tasks = spec_tasks(json_format.MessageToDict(pipeline.pipeline_spec))
    console = Console(len(tasks), out, verbose=verbose)
    doing = "resuming" if resumed else "run"
    console.line(f"{pipeline.name}: {doing} {run_dir.name} (step logs in {run_dir / run_dirs.LOGS})")

    def on_start(task: str, pid: int) -> None:
        record["attempts"][-1]["step"] = {"task": task, "pid": pid}
        write_json(run_dir / run_dirs.RECORD, record)

    interrupted = False
    start = time.monotonic()
    execution = LocalExecution(run_dir, console, verbose=verbose, on_start=on_start)
    kfp_log = open(run_dir / run_dirs.LOGS / "kfp.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(kfp_log)
    try:
        with execution, quiet, _interruptible(), warnings.catch_warnings():
            for message in LOCAL_NOOP_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            local.init(
                runner=local.SubprocessRunner(use_venv=False),
                pipeline_root=str(run_dir.parent),
                raise_on_error=False,
                enable_caching=True,
                cache_root=record["cache_root"],
            )
            pipeline(**record["parameters"])
    except KeyboardInterrupt:
        interrupted = True
    finally:
        kfp_log.close()
    return _finish(pipeline, run_dir, record, execution.records, tasks, time.monotonic() - start, interrupted)


def _finish(
    pipeline: Any,
    run_dir: Path,
    record: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    tasks: list,
    seconds: float,
    interrupted: bool,
) -> dict[str, Any]:
    """Write summary.json and index.html; returns the summary."""
    from preftune.report.run_index import write_run_index

    steps = task_steps(tasks, records)
    status = overall_status(steps, interrupted)
    summary = {
        "pipeline": pipeline.name,
        "run_id": run_dir.name,
        "status": status,
        "run_dir": str(run_dir),
        "index": str(run_dir / "index.html"),
        "attempt": len(record.get("attempts", [])),
        "created": record.get("created"),
        "finished": now(),
        "duration_seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count()},
        "parameters": dict(record["parameters"]),
        "steps": steps,
    }
    if status in (FAILED, INTERRUPTED):
        name = pipeline.name.removeprefix("preftune-")
        summary["resume"] = f"preftune run {name} --resume {run_dir}"
    write_json(run_dir / run_dirs.SUMMARY, summary)
    write_run_index(summary, run_dir, HEADLINE_METRICS)
    return summary
