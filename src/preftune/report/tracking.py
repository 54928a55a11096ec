"""Live tracking of a step: per-step metrics, its parameters and lineage, sent to MLflow or TensorBoard.

A platform team watches a multi-hour run's curves while it trains, not in the HTML report after the step ends.
The launch layer opens one tracker around a stage (:func:`tracked`, rank 0 only) and the training history
forwards every logged step to it (:func:`log_metrics`), so the trainers know nothing of it. ``report_to`` picks
the backend: ``none``, ``mlflow`` (the server and its credentials come from the usual ``MLFLOW_*`` environment,
on a cluster from the optional ``preftune-mlflow`` Secret) or ``tensorboard`` (event files under the step's model
output, which KFP uploads with it). A tracking server that stops answering mid-run costs a warning, never the
training run: only a tracker that cannot be opened fails the step, before any GPU time is spent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from preftune.config.shared import REPORT_TO_CHOICES

log = logging.getLogger(__name__)

#: Environment variables of a KFP pod (the launcher's own, and those pipelines/cluster.py adds) -> tag names.
KFP_TAGS = {
    "KFP_RUN_ID": "kfp.run_id",
    "KFP_RUN_NAME": "kfp.run_name",
    "KFP_TASK_NAME": "kfp.task_name",
    "KFP_POD_NAME": "kfp.pod_name",
    "KFP_POD_UID": "kfp.pod_uid",
    "KFP_NAMESPACE": "kfp.namespace",
}
#: Tag counting the attempts of a KFP task that tracked to one MLflow run (a retried pod continues its run).
ATTEMPT_TAG = "preftune.attempt"
#: Prefix of tags holding a parameter a retry changed (MLflow never changes a logged parameter).
RETRY_PARAM_TAG = "preftune.retry_param."
_OUTPUTS = "lineage.output."
#: The experiment runs go to when ``MLFLOW_EXPERIMENT_NAME`` is not set.
DEFAULT_EXPERIMENT = "preftune"
_MLFLOW_EXTRA = "pip install 'preftune[mlflow]'"


class Tracker(Protocol):
    """What a backend does: take a run's parameters and tags once, then metrics by step, then close."""

    def start(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None: ...

    def metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self, failed: bool) -> None: ...


def kfp_tags(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The KFP run this process belongs to (run id and name, task, pod), from its pod's environment."""
    env = os.environ if environ is None else environ
    return {tag: env[name] for name, tag in KFP_TAGS.items() if env.get(name)}


def flat_params(values: Mapping[str, Any]) -> dict[str, str]:
    """A config as run parameters: every value as text (MLflow stores parameters as strings)."""
    return {str(k): str(v) for k, v in values.items()}


def metric_name(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / `` and spaces) and TensorBoard shows alike."""
    return re.sub(r"[^\w\-. /]", "_", name)


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (a NaN stop is reported by the step itself)."""
    kept = {}
    for name, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            kept[metric_name(name)] = number
    return kept


class MlflowTracker:
    """One MLflow run per step, through the tracking client (mlflow-skinny): no process-wide active run."""

    def __init__(self, run_name: str, experiment: str | None = None) -> None:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ValueError(
                "report_to='mlflow' needs MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_TOKEN or "
                "MLFLOW_TRACKING_USERNAME/PASSWORD when the server asks): on a cluster, create the "
                "preftune-mlflow Secret (infra/k8s/mlflow-secret.template.yaml)"
            )
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise ImportError(f"report_to='mlflow' needs the MLflow client: {_MLFLOW_EXTRA}") from exc
        self.client = MlflowClient()
        self.run_name = run_name
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.run_id = ""

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except Exception:  # another step created it first
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def start(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        experiment = self._experiment_id()
        earlier = self._unfinished_attempt(experiment, tags)
        logged: dict[str, str] = {}
        if earlier is None:
            run = self.client.create_run(experiment, run_name=self.run_name)  # tags: with the params below
            attempt = 1
        else:
            run, logged = earlier, dict(earlier.data.params)
            attempt = int(run.data.tags.get(ATTEMPT_TAG, "1")) + 1
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        values = {k: v[:6000] for k, v in params.items()}  # the server's limit per value
        # MLflow refuses to change a logged parameter: a retry's changed setting (a lowered learning rate) is a tag
        items = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = {f"{RETRY_PARAM_TAG}{k}": v[:5000] for k, v in values.items() if logged.get(k, v) != v}
        run_tags = [RunTag(k, v) for k, v in {**tags, **changed, ATTEMPT_TAG: str(attempt)}.items()]
        for at in range(0, max(len(items), len(run_tags)), 100):  # the server's limit per batch
            self.client.log_batch(self.run_id, params=items[at : at + 100], tags=run_tags[at : at + 100])
        how = "continuing" if earlier is not None else "tracking to"
        log.info("%s MLflow run %s (experiment %s, attempt %d)", how, self.run_id, self.experiment, attempt)

    def _unfinished_attempt(self, experiment: str, tags: Mapping[str, str]) -> Any:
        """The run of an earlier attempt of this KFP task that did not finish (its pod was preempted or failed, and
        KFP retried it): a resumed step's curves continue in the same run. An attempt is the same KFP run, task
        and output URIs (a retry writes where the first attempt would have; iterations of a loop do not). None
        outside KFP."""
        same = {
            k: v for k, v in tags.items() if k in ("kfp.run_id", "kfp.task_name") or k.startswith(_OUTPUTS)
        }
        if not {"kfp.run_id", "kfp.task_name"} <= set(same) or len(same) == 2:
            return None
        query = " and ".join(f"tags.`{k}` = '{_quoted(v)}'" for k, v in sorted(same.items()))
        found = self.client.search_runs(
            [experiment], filter_string=f"{query} and attributes.status != 'FINISHED'", max_results=1
        )
        return found[0] if found else None

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class TensorBoardTracker:
    """Event files in ``log_dir``, written by torch's SummaryWriter (needs the ``tensorboard`` package).

    The writer starts at the first call, so the folder appears only once there is something to show.
    """

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "report_to='tensorboard' needs the tensorboard package: pip install 'preftune[tensorboard]'"
            ) from exc
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.log_dir), flush_secs=10)
        return self._writer

    def start(self, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        self._params, self._tags = dict(params), dict(tags)

    def _write_text(self) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(self._params.items()))
        self.writer.add_text("parameters", f"| name | value |\n|---|---|\n{rows}", 0)
        lines = "\n".join(f"- {k}: {v}" for k, v in sorted(self._tags.items()))
        self.writer.add_text("lineage", lines or "-", 0)
        self._params = {}

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        if getattr(self, "_params", None):
            self._write_text()
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self, failed: bool) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class _Active:
    """The tracker of this process's current stage, and the last step it saw."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker, self.step, self.broken = tracker, 0, False

    def send(self, step: int, values: Mapping[str, float]) -> None:
        if self.broken or not values:
            return
        self.step = max(self.step, step)
        try:
            self.tracker.metrics(step, values)
        except Exception as exc:  # a tracking outage must not cost the training run
            self.broken = True
            log.warning("live tracking failed (%s: %s); training goes on without it", type(exc).__name__, exc)


_active: _Active | None = None


def _quoted(value: str) -> str:
    """A value inside a single-quoted MLflow search string."""
    return value.replace("\\", "\\\\").replace("'", "\\'")


def make_tracker(report_to: str, *, run_name: str, log_dir: str | Path | None) -> Tracker | None:
    """The backend ``report_to`` names (None for ``none``); a clear error when it cannot work here."""
    if report_to not in REPORT_TO_CHOICES:
        raise ValueError(f"report_to must be one of {', '.join(REPORT_TO_CHOICES)}, got {report_to!r}")
    if report_to == "mlflow":
        return MlflowTracker(run_name)
    if report_to == "tensorboard":
        if log_dir is None:
            raise ValueError("report_to='tensorboard' needs an output folder for its event files")
        return TensorBoardTracker(log_dir)
    return None


@contextlib.contextmanager
def tracked(
    report_to: str,
    *,
    stage: str,
    params: Mapping[str, Any],
    lineage: Mapping[str, str] | None = None,
    log_dir: str | Path | None = None,
) -> Iterator[Tracker | None]:
    """Track what runs inside: :func:`log_metrics` calls go to the ``report_to`` backend, as one run named for the
    KFP task (else the stage), with ``params`` (the stage config), ``lineage`` (input and output URIs) and the
    KFP run as tags. The run is closed FINISHED, or FAILED when the block raises."""
    global _active
    tags = {"preftune.stage": stage, **kfp_tags(), **{f"lineage.{k}": v for k, v in (lineage or {}).items()}}
    tracker = make_tracker(report_to, run_name=tags.get("kfp.task_name", stage), log_dir=log_dir)
    if tracker is None:
        yield None
        return
    tracker.start(flat_params(params), tags)
    previous, _active = _active, _Active(tracker)
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        _active = previous
        try:
            tracker.close(failed)
        except Exception as exc:
            log.warning("closing the tracking run failed: %s", exc)


def active() -> bool:
    """Whether a tracker is open in this process."""
    return _active is not None


def log_metrics(step: int, values: Mapping[str, Any], prefix: str = "") -> None:
    """Send one step's metrics (the finite numbers among ``values``, names prefixed) to the open tracker, if any."""
    if _active is not None:
        _active.send(int(step), {f"{prefix}{k}": v for k, v in finite(values).items()})


def log_final(values: Mapping[str, Any]) -> None:
    """A step's final metrics, at the last step the tracker saw."""
    if _active is not None:
        log_metrics(_active.step, values)
