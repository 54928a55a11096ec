"""Multi-node training: hand a pipeline step's stage to a Kubeflow Trainer TrainJob and wait for it.

The step (a KFP pod) builds a ``trainer.kubeflow.org/v1alpha1`` TrainJob on the ``torch-distributed`` runtime
from Kubeflow Trainer's typed models (:mod:`preftune.launch.trainjob_spec`: the step's own image, the same
stage call as :mod:`preftune.launch.distributed` makes, the step's GPU count per node, node selector,
tolerations, service account and object-store environment); submits it through the official Kubernetes
client (:mod:`preftune.launch.kubeapi`, which re-reads the rotating service-account token); follows its status
conditions into the step log until it completes, fails or runs out of time; then copies what the job's rank 0
published to object storage into the step's output artifacts, so the rest of the pipeline sees an ordinary
step. Kubeflow Trainer starts torchrun on every node (it sets the ``PET_*`` variables torchrun reads), so
nothing here coordinates processes.

Not the Kubeflow SDK's ``TrainerClient`` (kubeflow 0.5): its ``train()`` takes the trainer's env as plain values
(no Secret references), sets neither ``numProcPerNode`` nor separate requests and limits, cannot set the owner
reference (the step's pod, which garbage-collects the job), fixes the runtime patch's manager, submits without
strict field validation, reads the runtime first (a cluster-scoped ClusterTrainingRuntime: a ClusterRole) and
raises API errors as RuntimeErrors without their status, which the retries and the RBAC refusal here need.
Needs Kubeflow Trainer v2.2 or later (``runtimePatches``); the Role in ``infra/k8s`` grants the calls.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.io import storage
from preftune.launch import platform
from preftune.launch.kubeapi import SERVICE_ACCOUNT_DIR, KubeClient, KubeError
from preftune.launch.stages import (
    Scale,
    StageFailed,
    call_json,
    in_object_storage,
    is_artifact,
    per_worker_config,
    stage_spec,
)

# The launcher's public surface: what tests and callers reach as ``trainjob.X`` (explicit re-exports).
from preftune.launch.trainjob_spec import NODE as NODE
from preftune.launch.trainjob_spec import JobSettings as JobSettings
from preftune.launch.trainjob_spec import build_trainjob as build_trainjob
from preftune.launch.trainjob_spec import default_settings as default_settings
from preftune.launch.trainjob_spec import gpu_scheduling as gpu_scheduling
from preftune.launch.trainjob_spec import job_name as job_name
from preftune.launch.trainjob_spec import render_trainjob as render_trainjob
from preftune.launch.trainjob_spec import settings_from_pod as settings_from_pod

if TYPE_CHECKING:
    from kubeflow_trainer_api.models import (
        IoK8sApimachineryPkgApisMetaV1Condition,
        TrainerV1alpha1JobStatus,
        TrainerV1alpha1TrainJob,
    )

log = logging.getLogger(__name__)

#: JobSet's label on the pods of a TrainJob (the JobSet has the TrainJob's name).
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"


class TrainJobFailed(StageFailed):
    """The TrainJob ended with its Failed condition; the message carries its reason and the pods' last lines."""


# -------------------------------------------------------------------------------------------------- waiting


def _condition_line(cond: IoK8sApimachineryPkgApisMetaV1Condition) -> str:
    reason = f" ({cond.reason})" if cond.reason else ""
    message = f": {cond.message}" if cond.message else ""
    return f"{cond.type}={cond.status}{reason}{message}"


def _jobs_line(jobs: list[TrainerV1alpha1JobStatus]) -> str:
    return "; ".join(
        f"{j.name}: active {j.active}, ready {j.ready}, succeeded {j.succeeded}, failed {j.failed}, "
        f"suspended {j.suspended}"
        for j in jobs
    )


def parse_trainjob(raw: Mapping[str, Any]) -> TrainerV1alpha1TrainJob:
    """A TrainJob as the API returned it, as Kubeflow Trainer's typed model."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    return TrainerV1alpha1TrainJob.from_dict(dict(raw))


def terminal_condition(job: TrainerV1alpha1TrainJob) -> IoK8sApimachineryPkgApisMetaV1Condition | None:
    """The job's Complete or Failed condition when it is True (Failed first), else None."""
    conditions = (job.status.conditions if job.status else None) or []
    for kind in ("Failed", "Complete"):
        for cond in conditions:
            if cond.type == kind and cond.status == "True":
                return cond
    return None


def _echo_status(
    job: TrainerV1alpha1TrainJob, label: str, seen: dict[str, str], echo: Callable[[str], None]
) -> None:
    """Echo every condition and child-job count that changed since the last poll.

    ``seen`` holds the last line echoed per condition type, and under "" (no condition's type) the counts.
    """
    status = job.status
    for cond in (status.conditions if status else None) or []:
        line = _condition_line(cond)
        if seen.get(cond.type) != line:
            seen[cond.type] = line
            echo(f"TrainJob {label}: {line}")
    jobs = _jobs_line((status.jobs_status if status else None) or [])
    if jobs and jobs != seen.get(""):
        seen[""] = jobs
        echo(f"TrainJob {label}: {jobs}")


def wait_for_trainjob(
    client: KubeClient,
    namespace: str,
    name: str,
    *,
    timeout: float,
    poll: float,
    echo: Callable[[str], None] = print,
    max_errors: int = 10,
) -> TrainerV1alpha1TrainJob:
    """Poll the TrainJob until it completes (returns it), fails (:class:`TrainJobFailed`) or ``timeout`` passes.

    Every change of a status condition or of the child jobs' counts is echoed to the step log. A run of
    transient API errors (connection, 429, 5xx) shorter than ``max_errors`` is waited out.
    """
    label = f"{namespace}/{name}"
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    errors = 0
    while True:
        try:
            job = parse_trainjob(client.get_trainjob(namespace, name))
            errors = 0
        except KubeError as exc:
            if exc.status == 404:
                raise TrainJobFailed(f"TrainJob {label} disappeared (deleted outside this step)") from None
            if not exc.transient:
                raise
            errors += 1
            if errors >= max_errors:
                raise StageFailed(f"TrainJob {label}: {errors} API errors in a row; last: {exc}") from exc
            echo(f"TrainJob {label}: status unavailable ({exc}); retrying")
            job = None
        if job is not None:
            _echo_status(job, label, seen, echo)
            final = terminal_condition(job)
            if final is not None and final.type == "Complete":
                return job
            if final is not None:
                detail = final.message or final.reason or "no message"
                raise TrainJobFailed(f"TrainJob {label} failed: {detail}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StageFailed(f"TrainJob {label} did not finish within {timeout:g} s")
        time.sleep(min(poll, remaining))


def failed_pod_logs(client: KubeClient, namespace: str, name: str, tail_lines: int = 30) -> str:
    """The last lines of every failed trainer pod of the job (best effort: '' when they cannot be read)."""
    try:
        pods = client.list_pods(namespace, f"{JOBSET_LABEL}={name}")
    except KubeError as exc:
        log.warning("cannot list the pods of TrainJob %s: %s", name, exc)
        return ""
    parts = []
    for pod in pods:
        if pod.get("status", {}).get("phase") != "Failed":
            continue
        pod_name = pod.get("metadata", {}).get("name", "?")
        try:
            text = client.pod_log(namespace, pod_name, NODE, tail_lines)
        except KubeError as exc:
            text = f"(log unavailable: {exc})"
        parts.append(f"--- {pod_name} (last {tail_lines} lines)\n{text.rstrip()}")
    return "\n".join(parts)


@contextmanager
def _deleted_unless_finished(client: KubeClient, namespace: str, name: str) -> Iterator[None]:
    """Delete the job when this step stops waiting early (timeout, cancel / SIGTERM, an error of ours).

    A job that completed or failed on its own is left for inspection; its owner reference to the step's pod
    lets Kubernetes remove it with the pod.
    """
    import threading

    def cancel(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, cancel) if main else None
    try:
        yield
    except TrainJobFailed:
        raise
    except BaseException:
        try:
            client.delete_trainjob(namespace, name)
            log.warning("deleted TrainJob %s/%s", namespace, name)
        except KubeError as exc:
            log.error("could not delete TrainJob %s/%s: %s", namespace, name, exc)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


# -------------------------------------------------------------------------------------------- the whole step


def _namespace(account_dir: Path = SERVICE_ACCOUNT_DIR) -> str:
    path = account_dir / "namespace"
    return (
        path.read_text(encoding="utf-8").strip()
        if path.is_file()
        else os.environ.get("NAMESPACE", "kubeflow")
    )


def step_settings(client: KubeClient, namespace: str) -> JobSettings:
    """The settings of this step's pod (``KFP_POD_NAME`` or the hostname); platform defaults if unreadable."""
    pod_name = os.environ.get("KFP_POD_NAME") or os.environ.get("HOSTNAME", "")
    if pod_name:
        try:
            return settings_from_pod(client.get_pod(namespace, pod_name))
        except KubeError as exc:
            log.warning(
                "cannot read this step's pod %s (%s); using preftune's platform defaults", pod_name, exc
            )
    return default_settings(namespace)


def staging_uri(kwargs: Mapping[str, Any], stage: str) -> str:
    """Where the job publishes its outputs: a ``trainjob/`` prefix beside the step's first output artifact."""
    for name in stage_spec(stage).outputs:
        value = kwargs.get(name)
        uri = value.uri if is_artifact(value) else None
        if uri:
            if not in_object_storage(uri):
                break
            return posixpath.join(posixpath.dirname(uri.rstrip("/")), "trainjob")
    raise ValueError(
        f"{stage}: multi-node training publishes its outputs through object storage, but the step's outputs are "
        "not in object storage; run on a cluster whose pipeline root is s3:// or minio://"
    )


def job_kwargs(stage: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's arguments as the job's pods can reach them: artifacts by URI, outputs left to the worker."""
    spec = stage_spec(stage)
    outputs = spec.output_kinds(kwargs)
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in outputs:
            out[name] = None  # the worker writes it locally, then publishes it under the staging prefix
        elif name in spec.optional_outputs:
            continue  # an optional output the step did not ask for
        elif is_artifact(value):
            if not in_object_storage(str(value.uri)):
                raise ValueError(
                    f"{stage}: input {name} is at {value.uri}, which the TrainJob's pods cannot read; multi-node "
                    "training needs artifacts in object storage (an s3:// or minio:// pipeline root)"
                )
            out[name] = value.uri
        else:
            out[name] = value
    return out


def collect_outputs(stage: str, kwargs: Mapping[str, Any], output_uri: str) -> dict[str, float]:
    """Copy what the job's rank 0 published under ``output_uri`` into the step's outputs; return the metrics."""
    base = output_uri.rstrip("/")
    try:
        metrics = json.loads(storage.read_bytes(f"{base}/metrics.json"))
    except FileNotFoundError:
        raise StageFailed(
            f"{stage}: the TrainJob completed but published no {base}/metrics.json (rank 0 did not finish)"
        ) from None
    spec = stage_spec(stage)
    for name, kind in spec.output_kinds(kwargs).items():
        value = kwargs[name]
        target = Path(value.path if is_artifact(value) else value)
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            try:
                storage.download(f"{base}/{name}/", target)
            except FileNotFoundError:
                if name in spec.outputs:
                    raise StageFailed(f"{stage}: the TrainJob published no {name} under {base}") from None
                log.info("%s: the TrainJob published no %s", stage, name)
        else:
            try:
                data = storage.read_bytes(f"{base}/{name}")
            except FileNotFoundError:
                log.warning("%s: the TrainJob published no %s", stage, name)
                continue
            storage.write_bytes(str(target), data)
    return {k: float(v) for k, v in metrics.items()}


def job_gpus(settings: JobSettings, scale: Scale) -> int:
    """GPUs per node of the job; adjusts ``settings`` so that its nodes are scheduled and sized for them.

    As asked (``num_gpus``), else as many as the step's pod has. A step compiled as a launcher
    (``--trainjob-launchers``) has none and its pod's resources are a launcher's: its job gets the compiled
    GPUs per training step and the training steps' CPU and memory. A CPU-only job runs one worker per node.
    """
    launcher = platform.trainjob_launchers()
    gpus = scale.num_gpus or settings.gpus_per_node or (platform.accelerator_count() if launcher else 0)
    if launcher:
        settings.resources = platform.step_resources("train").kubernetes()
    if gpus > 0 and (launcher or (not settings.node_selector and not settings.tolerations)):
        # a launcher (or a CPU step) asking for GPU nodes: schedule them like the pipelines' GPU steps
        settings.node_selector, settings.tolerations = gpu_scheduling()
    return gpus


def run_stage_as_trainjob(
    stage: str,
    config: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    scale: Scale,
    *,
    client: KubeClient | None = None,
    namespace: str | None = None,
    settings: JobSettings | None = None,
    echo: Callable[[str], None] = print,
    grace_seconds: float = 600.0,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Run one stage call as a TrainJob of ``scale.num_nodes`` nodes and return its metrics.

    ``client``, ``namespace`` and ``settings`` default to this pod's: in-cluster API access, its namespace and
    its own pod's image, GPUs and scheduling. The job gets ``scale.timeout()`` as its active deadline; the step
    waits ``grace_seconds`` longer (scheduling, image pulls), so that a job past its deadline is reported with
    Kubeflow Trainer's own DeadlineExceeded message.
    """
    client = client or KubeClient.in_cluster()
    namespace = namespace or _namespace()
    settings = settings or step_settings(client, namespace)
    if not settings.namespace:
        settings.namespace = namespace
    gpus = job_gpus(settings, scale)
    settings.gpus_per_node = gpus
    procs = max(1, gpus)
    world = procs * scale.num_nodes
    output_uri = staging_uri(kwargs, stage)
    call = call_json(stage, per_worker_config(stage, config, world), job_kwargs(stage, kwargs))
    name = job_name(stage, output_uri + (settings.owner.uid if settings.owner else ""))
    job = build_trainjob(
        name=name,
        stage=stage,
        call=call,
        output_uri=output_uri,
        settings=settings,
        num_nodes=scale.num_nodes,
        procs_per_node=procs,
        strategy=scale.strategy,
        runtime=scale.trainjob_runtime,
        deadline_seconds=scale.timeout(),
        extra_env=extra_env,
    )
    echo(
        f"submitting TrainJob {namespace}/{name}: {scale.num_nodes} nodes x {procs} workers ({scale.strategy}), "
        f"image {settings.image}, runtime {scale.trainjob_runtime}, outputs under {output_uri}"
    )
    client.create_trainjob(namespace, job.to_dict())
    with _deleted_unless_finished(client, namespace, name):
        try:
            wait_for_trainjob(
                client,
                namespace,
                name,
                timeout=scale.timeout() + grace_seconds,
                poll=scale.poll_seconds,
                echo=echo,
            )
        except TrainJobFailed as exc:
            logs = failed_pod_logs(client, namespace, name)
            raise TrainJobFailed(f"{exc}\n{logs}" if logs else str(exc)) from None
    echo(f"TrainJob {namespace}/{name} complete; collecting outputs from {output_uri}")
    return collect_outputs(stage, kwargs, output_uri)
