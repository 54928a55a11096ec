"""The TrainJob a pipeline step submits, built from Kubeflow Trainer's typed API models (kubeflow-trainer-api).

What the job takes over from the step (:class:`JobSettings`: image, GPUs, resources, node selector,
tolerations, service account, object-store environment, the step's pod as owner) is read from the step's own
pod or from preftune's platform defaults; :func:`build_trainjob` turns it and one stage call into a
``trainer.kubeflow.org/v1alpha1`` TrainJob on the torch runtime, with one runtime patch for what the runtime's
pods need beyond the trainer fields (scheduling, identity, a real /dev/shm, no Istio sidecar). The models
validate every part (an env var without a name, a toleration with an unknown operator, a string where a
count goes fail here, not at the API server); they are imported on first use, so the launcher stays light.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from preftune.launch import platform
from preftune.launch.devices import STEP_GPUS_ENV
from preftune.launch.kubeapi import GROUP, VERSION
from preftune.launch.stages import TORCHRUN_MODULE, WORKER_MODULE, worker_env

if TYPE_CHECKING:
    from kubeflow_trainer_api.models import (
        IoK8sApiCoreV1EnvVar,
        IoK8sApiCoreV1ResourceRequirements,
        IoK8sApiCoreV1Toleration,
        IoK8sApimachineryPkgApisMetaV1OwnerReference,
        TrainerV1alpha1PodTemplatePatch,
        TrainerV1alpha1TrainJob,
    )

API_VERSION = f"{GROUP}/{VERSION}"
#: The replicated job and container of the torch runtimes that run the trainer (Kubeflow Trainer's names).
NODE = "node"
#: Who owns the runtime patch (Trainer requires a domain-prefixed name).
PATCH_MANAGER = "preftune.dev/launcher"
#: The step's own container in a KFP v2 pod (Argo names the user container ``main``).
STEP_CONTAINER = "main"
#: Environment the job inherits from the step when set there as plain values.
INHERITED_ENV_PREFIXES = ("AWS_", "HF_", "PREFTUNE_", "NCCL_", "PYTORCH_", "TORCH_", "TRANSFORMERS_")
#: Set by Kubeflow Trainer or torchrun in every worker; never copied into the job.
RESERVED_ENV = ("PET_", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
#: The job's pods stay out of an Istio mesh (Kubeflow profile namespaces inject sidecars): a sidecar would hold
#: the rendezvous traffic between nodes and keep a finished pod running, so the job would hang.
ISTIO_OPT_OUT = {"sidecar.istio.io/inject": "false"}


def _models() -> Any:
    from kubeflow_trainer_api import models

    return models


@dataclass
class JobSettings:
    """What a TrainJob takes over from the step that submits it.

    ``resources`` are the step container's requests and limits (quantity strings by resource name); ``env`` and
    ``tolerations`` are Kubernetes objects as the Trainer models type them.
    """

    namespace: str
    image: str
    gpus_per_node: int
    accelerator_type: str = platform.DEFAULT_ACCELERATOR_TYPE
    resources: dict[str, dict[str, str]] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[IoK8sApiCoreV1Toleration] = field(default_factory=list)
    env: list[IoK8sApiCoreV1EnvVar] = field(default_factory=list)
    service_account: str | None = None
    owner: IoK8sApimachineryPkgApisMetaV1OwnerReference | None = None


# ------------------------------------------------------------------------------------ settings of the step


def _reserved(name: str) -> bool:
    return any(name == r or (r.endswith("_") and name.startswith(r)) for r in RESERVED_ENV)


def _inherited_env(env: list[Mapping[str, Any]]) -> list[IoK8sApiCoreV1EnvVar]:
    """Secret and ConfigMap references (object-store credentials and settings) and preftune/AWS/HF values."""
    env_var = _models().IoK8sApiCoreV1EnvVar
    out = []
    for var in env:
        name = var.get("name", "")
        if _reserved(name):
            continue
        source = var.get("valueFrom") or {}
        if "secretKeyRef" in source or "configMapKeyRef" in source:
            out.append(env_var.from_dict(dict(var)))
        elif "value" in var and name.startswith(INHERITED_ENV_PREFIXES):
            out.append(env_var(name=name, value=var["value"]))
    return out


def object_storage_env() -> list[IoK8sApiCoreV1EnvVar]:
    """The step's object-store environment as the pipelines set it (pipelines/cluster.py), all optional."""
    m = _models()
    env = [
        m.IoK8sApiCoreV1EnvVar(
            name=var,
            value_from=m.IoK8sApiCoreV1EnvVarSource(
                secret_key_ref=m.IoK8sApiCoreV1SecretKeySelector(
                    name=platform.s3_secret(), key=key, optional=True
                )
            ),
        )
        for key, var in sorted(platform.s3_secret_keys().items())
    ]
    env += [
        m.IoK8sApiCoreV1EnvVar(
            name=key,
            value_from=m.IoK8sApiCoreV1EnvVarSource(
                config_map_key_ref=m.IoK8sApiCoreV1ConfigMapKeySelector(
                    name=platform.S3_CONFIG_MAP, key=key, optional=True
                )
            ),
        )
        for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
    ]
    return env


def gpu_scheduling() -> tuple[dict[str, str], list[IoK8sApiCoreV1Toleration]]:
    """The node selector and tolerations of GPU pods, as the pipeline was compiled (its label and taint)."""
    label, toleration = platform.gpu_node_label(), platform.gpu_toleration()
    tolerations = [_models().IoK8sApiCoreV1Toleration.from_dict(toleration)] if toleration else []
    return ({label[0]: label[1]} if label else {}), tolerations


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
    """The job settings of the step's own pod (as the API returns it): image, GPUs, resources, scheduling,
    identity and environment."""
    m = _models()
    spec, meta = pod.get("spec", {}), pod.get("metadata", {})
    containers = spec.get("containers", [])
    main = next(
        (c for c in containers if c.get("name") == STEP_CONTAINER), containers[0] if containers else {}
    )
    accelerator = accelerator_type or platform.accelerator_type()
    resources = {
        kind: {k: str(v) for k, v in values.items()}
        for kind, values in (main.get("resources") or {}).items()
        if kind in ("requests", "limits")
    }
    gpus = int(
        resources.get("limits", {}).get(accelerator, resources.get("requests", {}).get(accelerator, 0))
    )
    owner = None
    if meta.get("name") and meta.get("uid"):
        owner = m.IoK8sApimachineryPkgApisMetaV1OwnerReference(
            api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"]
        )
    return JobSettings(
        namespace=meta.get("namespace", ""),
        image=main.get("image") or platform.runtime_image(),
        gpus_per_node=gpus,
        accelerator_type=accelerator,
        resources=resources,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=[
            m.IoK8sApiCoreV1Toleration.from_dict(t)
            for t in spec.get("tolerations") or []
            if not _kubernetes_default_toleration(t)
        ],
        env=_inherited_env(main.get("env") or []) or object_storage_env(),
        service_account=spec.get("serviceAccountName"),
        owner=owner,
    )


def _kubernetes_default_toleration(toleration: Mapping[str, Any]) -> bool:
    """The not-ready / unreachable tolerations the API server adds to every pod; the job's pods get their own."""
    return str(toleration.get("key", "")).startswith("node.kubernetes.io/")


# ---------------------------------------------------------------------------------------------- the TrainJob


def job_name(stage: str, seed: str) -> str:
    """A TrainJob name: an RFC 1035 label under 63 characters, unique per step execution."""
    return f"preftune-{stage}-{hashlib.sha256(seed.encode('utf-8')).hexdigest()[:10]}"


def _resources_per_node(settings: JobSettings, gpus: int) -> IoK8sApiCoreV1ResourceRequirements | None:
    """The step's requests and limits with the job's GPUs per node (a Quantity is a string or a float in the
    models: counts go as strings, as the API server writes them)."""
    out: dict[str, dict[str, str]] = {}
    for kind in ("requests", "limits"):
        given = settings.resources.get(kind, {})
        values = {k: v for k, v in given.items() if k != settings.accelerator_type}
        if gpus > 0 and (kind == "limits" or settings.accelerator_type in given):
            values[settings.accelerator_type] = str(gpus)
        if values:
            out[kind] = values
    return _models().IoK8sApiCoreV1ResourceRequirements.from_dict(out) if out else None


def _merge_env(*groups: list[IoK8sApiCoreV1EnvVar]) -> list[IoK8sApiCoreV1EnvVar]:
    """One entry per name (the env list is a map keyed by name); later groups win."""
    merged: dict[str, IoK8sApiCoreV1EnvVar] = {}
    for group in groups:
        for var in group:
            merged[var.name] = var
    return list(merged.values())


def _pod_template(settings: JobSettings) -> TrainerV1alpha1PodTemplatePatch:
    """What the job's pods take over from the step's pod: scheduling, identity, a real /dev/shm, no sidecar."""
    m = _models()
    # data loaders and NCCL share tensors through /dev/shm, 64 MiB in a default pod
    shm = m.IoK8sApiCoreV1EmptyDirVolumeSource(
        medium="Memory", size_limit=m.IoK8sApimachineryPkgApiResourceQuantity(platform.shm_size())
    )
    spec = m.TrainerV1alpha1PodSpecPatch(
        volumes=[m.IoK8sApiCoreV1Volume(name="dshm", empty_dir=shm)],
        containers=[
            m.TrainerV1alpha1ContainerPatch(
                name=NODE, volume_mounts=[m.IoK8sApiCoreV1VolumeMount(name="dshm", mount_path="/dev/shm")]
            )
        ],
        node_selector=dict(settings.node_selector) or None,
        tolerations=list(settings.tolerations) or None,
        service_account_name=settings.service_account,
    )
    metadata = m.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
        labels=dict(ISTIO_OPT_OUT), annotations=dict(ISTIO_OPT_OUT)
    )
    return m.TrainerV1alpha1PodTemplatePatch(metadata=metadata, spec=spec)


def _runtime_patch(settings: JobSettings) -> Any:
    """The one runtime patch: the ``node`` replicated job's pod template."""
    m = _models()
    node = m.TrainerV1alpha1ReplicatedJobPatch(
        name=NODE,
        template=m.TrainerV1alpha1JobTemplatePatch(
            spec=m.TrainerV1alpha1JobSpecPatch(template=_pod_template(settings))
        ),
    )
    runtime_spec = m.TrainerV1alpha1TrainingRuntimeSpecPatch(
        template=m.TrainerV1alpha1JobSetTemplatePatch(
            spec=m.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[node])
        )
    )
    return m.TrainerV1alpha1RuntimePatch(manager=PATCH_MANAGER, training_runtime_spec=runtime_spec)


def _metadata(name: str, stage: str, settings: JobSettings) -> Any:
    """The TrainJob's name, labels and owner (the step's pod, so the job goes when the pod goes)."""
    return _models().IoK8sApimachineryPkgApisMetaV1ObjectMeta(
        name=name,
        namespace=settings.namespace,
        labels={
            "app.kubernetes.io/part-of": "preftune",
            "app.kubernetes.io/component": "trainjob",
            "preftune.dev/stage": stage,
        },
        owner_references=[settings.owner] if settings.owner else None,
    )


def build_trainjob(
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
    extra_env: Mapping[str, str] | None = None,
) -> TrainerV1alpha1TrainJob:
    """The TrainJob for one stage call: ``num_nodes`` nodes of ``procs_per_node`` torchrun workers each.

    ``extra_env`` are values resolved in the step's pod that the job's pods cannot resolve themselves (the
    tracking context, the KFP run's ids, which the step reads from its own pod's labels).

    ``call`` is the stage call's JSON (batch sizes already per worker) and ``output_uri`` where rank 0
    publishes the model, the report and ``metrics.json``.
    """
    m = _models()
    gpus = settings.gpus_per_node
    own = {**worker_env(strategy, cpu=gpus == 0), STEP_GPUS_ENV: str(gpus), **(extra_env or {})}
    env = _merge_env(settings.env, [m.IoK8sApiCoreV1EnvVar(name=k, value=v) for k, v in own.items()])
    trainer = m.TrainerV1alpha1Trainer(
        image=settings.image,
        command=["python", *TORCHRUN_MODULE, "--module", WORKER_MODULE],
        args=["worker", "--output-uri", output_uri, "--spec-json", call],
        env=env,
        num_nodes=num_nodes,
        num_proc_per_node=procs_per_node,
        resources_per_node=_resources_per_node(settings, gpus),
    )
    spec = m.TrainerV1alpha1TrainJobSpec(
        runtime_ref=m.TrainerV1alpha1RuntimeRef(name=runtime, api_group=GROUP, kind="ClusterTrainingRuntime"),
        active_deadline_seconds=deadline_seconds,
        trainer=trainer,
        runtime_patches=[_runtime_patch(settings)],
    )
    return m.TrainerV1alpha1TrainJob(
        api_version=API_VERSION, kind="TrainJob", metadata=_metadata(name, stage, settings), spec=spec
    )


def render_trainjob(**kwargs: Any) -> dict[str, Any]:
    """:func:`build_trainjob` as the manifest the API server receives (JSON-ready, camelCase)."""
    return build_trainjob(**kwargs).to_dict()
