"""Multi-node training: hand a pipeline step's stage to a Kubeflow Trainer TrainJob and wait for it.

The step (a KFP pod) renders a ``trainer.kubeflow.org/v1alpha1`` TrainJob on the ``torch-distributed`` runtime
with the step's own image, the same stage call (see :mod:`preftune.launch.distributed`), the step's GPU count per node,
node selector, tolerations, service account and object-store environment; submits it; follows its status
conditions into the step log until it completes, fails or runs out of time; then copies what the job's rank 0
published to object storage into the step's output artifacts, so the rest of the pipeline sees an ordinary
step. Kubeflow Trainer starts torchrun on every node (it sets the ``PET_*`` variables torchrun reads), so
nothing here coordinates processes.

The Kubernetes API is reached with plain HTTPS through ``requests`` and the pod's service-account token and CA,
not the ``kubernetes`` client: five REST calls do not need a generated client, the token file is re-read on
every call (bound tokens rotate during day-long jobs), and a test can point the same code at a local HTTP
server. Needs Kubeflow Trainer v2.2 or later (``runtimePatches``); the Role in ``infra/k8s`` grants the calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from preftune.io import storage
from preftune.launch import platform
from preftune.launch.devices import STEP_GPUS_ENV
from preftune.launch.stages import (
    TORCHRUN_MODULE,
    WORKER_MODULE,
    Scale,
    StageFailed,
    call_json,
    in_object_storage,
    is_artifact,
    per_worker_config,
    stage_spec,
    worker_env,
)

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
API_VERSION = f"{GROUP}/{VERSION}"
#: The replicated job and container of the torch runtimes that run the trainer (Kubeflow Trainer's names).
NODE = "node"
#: Who owns the runtime patch (Trainer requires a domain-prefixed name).
PATCH_MANAGER = "preftune.dev/launcher"
#: JobSet's label on the pods of a TrainJob (the JobSet has the TrainJob's name).
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
#: The step's own container in a KFP v2 pod (Argo names the user container ``main``).
STEP_CONTAINER = "main"
#: Environment the job inherits from the step when set there as plain values.
INHERITED_ENV_PREFIXES = ("AWS_", "HF_", "PREFTUNE_", "NCCL_", "PYTORCH_", "TORCH_", "TRANSFORMERS_")
#: Set by Kubeflow Trainer or torchrun in every worker; never copied into the job.
RESERVED_ENV = ("PET_", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
#: The job's pods stay out of an Istio mesh (Kubeflow profile namespaces inject sidecars): a sidecar would hold
#: the rendezvous traffic between nodes and keep a finished pod running, so the job would hang.
ISTIO_OPT_OUT = {"sidecar.istio.io/inject": "false"}


class KubeError(RuntimeError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


class TrainJobFailed(StageFailed):
    """The TrainJob ended with its Failed condition; the message carries its reason and the pods' last lines."""


# ----------------------------------------------------------------------------------------------- API client


class KubeClient:
    """The few Kubernetes API calls the launcher makes, over HTTPS with a bearer token."""

    def __init__(
        self,
        host: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.host = host.rstrip("/")
        self._token = token
        self._token_file = Path(token_file) if token_file else None
        self.verify: str | bool = str(ca_file) if ca_file else True
        self.timeout = timeout
        self.session = session or requests.Session()

    @classmethod
    def in_cluster(cls, account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeClient:
        """The API server of the cluster this pod runs in, as the pod's service account."""
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host or not (account_dir / "token").is_file():
            raise KubeError(
                "not running in a Kubernetes pod (no KUBERNETES_SERVICE_HOST or service-account token): "
                "multi-node training (num_nodes > 1) needs a cluster with Kubeflow Trainer"
            )
        if ":" in host:  # IPv6
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token_file=account_dir / "token", ca_file=account_dir / "ca.crt")

    def _headers(self) -> dict[str, str]:
        token = self._token_file.read_text(encoding="utf-8").strip() if self._token_file else self._token
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        text: bool = False,
    ) -> Any:
        try:
            response = self.session.request(
                method,
                self.host + path,
                json=body,
                params=params,
                headers=self._headers(),
                verify=self.verify,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise KubeError(f"{method} {path}: {exc}") from exc
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            raise KubeError(
                f"{method} {path}: HTTP {response.status_code}: {message.strip()}", response.status_code
            )
        return response.text if text else response.json()

    def _trainjobs(self, namespace: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"

    def create_trainjob(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        # Strict: a field this cluster's Trainer does not know (an older CRD) is an error, not silently dropped
        return self.request(
            "POST", self._trainjobs(namespace), body=body, params={"fieldValidation": "Strict"}
        )

    def get_trainjob(self, namespace: str, name: str) -> dict[str, Any]:
        return self.request("GET", f"{self._trainjobs(namespace)}/{name}")

    def delete_trainjob(self, namespace: str, name: str) -> None:
        # Background: the API returns at once and the garbage collector removes the JobSet and its pods.
        self.request(
            "DELETE",
            f"{self._trainjobs(namespace)}/{name}",
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
        )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = self.request(
            "GET", f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": label_selector}
        )
        return list(found.get("items", []))

    def pod_log(self, namespace: str, name: str, container: str, tail_lines: int) -> str:
        return self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods/{name}/log",
            params={"container": container, "tailLines": tail_lines},
            text=True,
        )


# -------------------------------------------------------------------------------------------- job settings


@dataclass
class JobSettings:
    """What a TrainJob takes over from the step that submits it."""

    namespace: str
    image: str
    gpus_per_node: int
    accelerator_type: str = platform.DEFAULT_ACCELERATOR_TYPE
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: list[dict[str, Any]] = field(default_factory=list)
    service_account: str | None = None
    owner: dict[str, Any] | None = None


def _reserved(name: str) -> bool:
    return any(name == r or (r.endswith("_") and name.startswith(r)) for r in RESERVED_ENV)


def _inherited_env(env: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Secret and ConfigMap references (object-store credentials and settings) and preftune/AWS/HF values."""
    out = []
    for var in env:
        name = var.get("name", "")
        if _reserved(name):
            continue
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            out.append(var)
        elif "value" in var and name.startswith(INHERITED_ENV_PREFIXES):
            out.append({"name": name, "value": var["value"]})
    return out


def object_storage_env() -> list[dict[str, Any]]:
    """The step's object-store environment as the pipelines set it (pipelines/cluster.py), all optional."""
    env = [
        {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": platform.s3_secret(), "key": key, "optional": True}},
        }
        for key, var in sorted(platform.s3_secret_keys().items())
    ]
    env += [
        {
            "name": key,
            "valueFrom": {"configMapKeyRef": {"name": platform.S3_CONFIG_MAP, "key": key, "optional": True}},
        }
        for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    ]
    return env


def gpu_scheduling() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The node selector and tolerations of GPU pods, as the pipeline was compiled (its label and taint)."""
    label, toleration = platform.gpu_node_label(), platform.gpu_toleration()
    return ({label[0]: label[1]} if label else {}), ([toleration] if toleration else [])


def default_settings(namespace: str, gpus_per_node: int | None = None) -> JobSettings:
    """Settings from preftune's platform defaults, for when the step cannot read its own pod."""
    gpus = platform.accelerator_count() if gpus_per_node is None else gpus_per_node
    selector, tolerations = gpu_scheduling() if gpus > 0 else ({}, [])
    return JobSettings(
        namespace=namespace,
        image=platform.runtime_image(),
        gpus_per_node=gpus,
        accelerator_type=platform.accelerator_type(),
        node_selector=selector,
        tolerations=tolerations,
        env=object_storage_env(),
    )


def settings_from_pod(pod: Mapping[str, Any], *, accelerator_type: str | None = None) -> JobSettings:
    """The job settings of the step's own pod: image, GPUs, resources, scheduling, identity and environment."""
    spec, meta = pod.get("spec", {}), pod.get("metadata", {})
    containers = spec.get("containers", [])
    main = next(
        (c for c in containers if c.get("name") == STEP_CONTAINER), containers[0] if containers else {}
    )
    accelerator = accelerator_type or platform.accelerator_type()
    resources = {k: dict(v) for k, v in (main.get("resources") or {}).items() if k in ("requests", "limits")}
    gpus = int(
        resources.get("limits", {}).get(accelerator, resources.get("requests", {}).get(accelerator, 0))
    )
    owner = None
    if meta.get("name") and meta.get("uid"):
        owner = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
    return JobSettings(
        namespace=meta.get("namespace", ""),
        image=main.get("image") or platform.runtime_image(),
        gpus_per_node=gpus,
        accelerator_type=accelerator,
        resources=resources,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=[dict(t) for t in spec.get("tolerations") or [] if not _kubernetes_default_toleration(t)],
        env=_inherited_env(main.get("env") or []) or object_storage_env(),
        service_account=spec.get("serviceAccountName"),
        owner=owner,
    )


def _kubernetes_default_toleration(toleration: Mapping[str, Any]) -> bool:
    """The not-ready / unreachable tolerations the API server adds to every pod; the job's pods get their own."""
    return str(toleration.get("key", "")).startswith("node.kubernetes.io/")


# ---------------------------------------------------------------------------------------------- rendering


def job_name(stage: str, seed: str) -> str:
    """A TrainJob name: an RFC 1035 label under 63 characters, unique per step execution."""
    return f"preftune-{stage}-{hashlib.sha256(seed.encode('utf-8')).hexdigest()[:10]}"


def _resources_per_node(settings: JobSettings, gpus: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind in ("requests", "limits"):
        values = {k: v for k, v in settings.resources.get(kind, {}).items() if k != settings.accelerator_type}
        if gpus > 0 and (kind == "limits" or settings.accelerator_type in settings.resources.get(kind, {})):
            values[settings.accelerator_type] = gpus
        if values:
            out[kind] = values
    return out


def _merge_env(*groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per name (the env list is a map keyed by name); later groups win."""
    merged: dict[str, dict[str, Any]] = {}
    for group in groups:
        for var in group:
            merged[var["name"]] = var
    return list(merged.values())


def _pod_spec(settings: JobSettings) -> dict[str, Any]:
    """What the job's pods take over from the step's pod: scheduling, identity, and a real /dev/shm."""
    pod_spec: dict[str, Any] = {
        # data loaders and NCCL share tensors through /dev/shm, 64 MiB in a default pod
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": platform.shm_size()}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.service_account:
        pod_spec["serviceAccountName"] = settings.service_account
    return pod_spec


def _metadata(name: str, stage: str, settings: JobSettings) -> dict[str, Any]:
    """The TrainJob's name, labels and owner (the step's pod, so the job goes when the pod goes)."""
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "labels": {
            "app.kubernetes.io/part-of": "preftune",
            "app.kubernetes.io/component": "trainjob",
            "preftune.dev/stage": stage,
        },
    }
    if settings.owner:
        metadata["ownerReferences"] = [dict(settings.owner)]
    return metadata


def render_trainjob(
    *,
    name: str,
    stage: str,
    call: str,
    output_uri: str,
    settings: JobSettings,
    num_nodes: int,
    procs_per_node: int,
    strategy: str,
    runtime: str,
    deadline_seconds: int,
) -> dict[str, Any]:
    """The TrainJob for one stage call: ``num_nodes`` nodes of ``procs_per_node`` torchrun workers each.

    ``call`` is the stage call's JSON (batch sizes already per worker) and ``output_uri`` where rank 0
    publishes the model, the report and ``metrics.json``.
    """
    gpus = settings.gpus_per_node
    own = {**worker_env(strategy, cpu=gpus == 0), STEP_GPUS_ENV: str(gpus)}
    env = _merge_env(settings.env, [{"name": k, "value": v} for k, v in own.items()])
    pod_spec = _pod_spec(settings)
    metadata = _metadata(name, stage, settings)
    trainer: dict[str, Any] = {
        "image": settings.image,
        "command": ["python", *TORCHRUN_MODULE, "--module", WORKER_MODULE],
        "args": ["worker", "--output-uri", output_uri, "--spec-json", call],
        "env": env,
        "numNodes": num_nodes,
        "numProcPerNode": procs_per_node,
    }
    resources = _resources_per_node(settings, gpus)
    if resources:
        trainer["resourcesPerNode"] = resources
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": deadline_seconds,
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {
                                        "name": NODE,
                                        "template": {
                                            "spec": {
                                                "template": {
                                                    "metadata": {
                                                        "labels": dict(ISTIO_OPT_OUT),
                                                        "annotations": dict(ISTIO_OPT_OUT),
                                                    },
                                                    "spec": pod_spec,
                                                }
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


# -------------------------------------------------------------------------------------------------- waiting


def _condition_line(cond: Mapping[str, Any]) -> str:
    reason = f" ({cond['reason']})" if cond.get("reason") else ""
    message = f": {cond['message']}" if cond.get("message") else ""
    return f"{cond.get('type')}={cond.get('status')}{reason}{message}"


def _jobs_line(jobs: list[Mapping[str, Any]]) -> str:
    keys = ("active", "ready", "succeeded", "failed", "suspended")
    return "; ".join(f"{j.get('name')}: " + ", ".join(f"{k} {j.get(k, 0)}" for k in keys) for j in jobs)


def terminal_condition(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The job's Complete or Failed condition when it is True (Failed first), else None."""
    conditions = job.get("status", {}).get("conditions", []) or []
    for kind in ("Failed", "Complete"):
        for cond in conditions:
            if cond.get("type") == kind and cond.get("status") == "True":
                return dict(cond)
    return None


def wait_for_trainjob(
    client: KubeClient,
    namespace: str,
    name: str,
    *,
    timeout: float,
    poll: float,
    echo: Callable[[str], None] = print,
    max_errors: int = 10,
) -> dict[str, Any]:
    """Poll the TrainJob until it completes (returns it), fails (:class:`TrainJobFailed`) or ``timeout`` passes.

    Every change of a status condition or of the child jobs' counts is echoed to the step log. A run of
    transient API errors (connection, 429, 5xx) shorter than ``max_errors`` is waited out.
    """
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    last_jobs = ""
    errors = 0
    while True:
        try:
            job = client.get_trainjob(namespace, name)
            errors = 0
        except KubeError as exc:
            if exc.status == 404:
                raise TrainJobFailed(
                    f"TrainJob {namespace}/{name} disappeared (deleted outside this step)"
                ) from None
            if not exc.transient:
                raise
            errors += 1
            if errors >= max_errors:
                raise StageFailed(
                    f"TrainJob {namespace}/{name}: {errors} API errors in a row; last: {exc}"
                ) from exc
            echo(f"TrainJob {namespace}/{name}: status unavailable ({exc}); retrying")
            job = None
        if job is not None:
            status = job.get("status", {}) or {}
            for cond in status.get("conditions", []) or []:
                line = _condition_line(cond)
                if seen.get(cond.get("type", "")) != line:
                    seen[cond.get("type", "")] = line
                    echo(f"TrainJob {namespace}/{name}: {line}")
            jobs = _jobs_line(status.get("jobsStatus", []) or [])
            if jobs and jobs != last_jobs:
                last_jobs = jobs
                echo(f"TrainJob {namespace}/{name}: {jobs}")
            final = terminal_condition(job)
            if final is not None and final["type"] == "Complete":
                return job
            if final is not None:
                detail = final.get("message") or final.get("reason") or "no message"
                raise TrainJobFailed(f"TrainJob {namespace}/{name} failed: {detail}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StageFailed(f"TrainJob {namespace}/{name} did not finish within {timeout:g} s")
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
    name = job_name(stage, output_uri + (settings.owner or {}).get("uid", ""))
    body = render_trainjob(
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
    )
    echo(
        f"submitting TrainJob {namespace}/{name}: {scale.num_nodes} nodes x {procs} workers ({scale.strategy}), "
        f"image {settings.image}, runtime {scale.trainjob_runtime}, outputs under {output_uri}"
    )
    client.create_trainjob(namespace, body)
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
