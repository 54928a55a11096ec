"""Multi-node launcher (preftune.launch.trainjob): the TrainJob it renders, and its submit / wait / collect logic.

The rendered TrainJob is compared with ``tests/golden/trainjob-sft.yaml`` (``PREFTUNE_UPDATE_GOLDEN=1`` rewrites
it), validated against the TrainJob CRD's openAPIV3 schema of Kubeflow Trainer v2.3.0 vendored in
``tests/golden/trainjob-crd-v2.3.0.schema.json`` (made strict: an unknown field is an error, as the launcher's
``fieldValidation=Strict`` POST makes it on a cluster), and its pod parts with kubernetes-validate. To refresh the
schema: take ``spec.versions[0].schema.openAPIV3Schema`` of ``manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml``
at the Trainer release tag and drop every ``description``.

The launcher runs against a stand-in for the Kubernetes API on 127.0.0.1 that records every request and answers
from a script, over TLS with a CA made here: the official client reaches it exactly as in a pod, configured from
``KUBERNETES_SERVICE_HOST``/``PORT`` and a service-account directory (token, ca.crt, namespace). Object storage is
the moto server of ``conftest.py``. No cluster, no timing assertions.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

from preftune.io import storage
from preftune.launch import failures, kubeapi, stages, trainjob
from preftune.launch.distributed import Scale, StageFailed, run_stage
from preftune.train.sft import SFTConfig

GOLDEN = Path(__file__).parent / "golden"
SCHEMA = GOLDEN / "trainjob-crd-v2.3.0.schema.json"
K8S_VERSIONS = ["1.31.0", "1.33.0", "1.35.0"]
NS = "kubeflow"
TOKEN = "test-token-not-a-secret"
POD_NAME = "dpo-pipeline-abc12-system-container-impl-123"
JOBS = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
ROOT = "s3://bucket/root/dpo-pipeline/run-1/sft/exec-7"


def step_pod(gpus: int = 8) -> dict[str, Any]:
    """A KFP v2 training step's pod as the API returns it (the parts the launcher reads)."""
    limits = {"cpu": "16", "memory": "120Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": POD_NAME, "namespace": NS, "uid": "0d9c6a52-8d1e-4c55-9b1e-6f1f2b3c4d5e"},
        "spec": {
            "serviceAccountName": "preftune-pipeline-runner",
            "nodeSelector": {"preftune.dev/pool": "gpu"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
            ],
            "containers": [
                {"name": "wait", "image": "argoproj/argoexec:v3.5"},
                {
                    "name": "main",
                    "image": "registry.example.com/preftune:0.1.0",
                    "command": ["sh", "-c", "python -m kfp.dsl.executor_main ..."],
                    "resources": {"limits": limits, "requests": {"cpu": "8", "memory": "100Gi"}},
                    "env": [
                        {"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {
                            "name": "AWS_ACCESS_KEY_ID",
                            "valueFrom": {
                                "secretKeyRef": {
                                    "name": "preftune-s3",
                                    "key": "AWS_ACCESS_KEY_ID",
                                    "optional": True,
                                }
                            },
                        },
                        {
                            "name": "AWS_SECRET_ACCESS_KEY",
                            "valueFrom": {
                                "secretKeyRef": {
                                    "name": "preftune-s3",
                                    "key": "AWS_SECRET_ACCESS_KEY",
                                    "optional": True,
                                }
                            },
                        },
                        {
                            "name": "AWS_ENDPOINT_URL",
                            "valueFrom": {
                                "configMapKeyRef": {
                                    "name": "preftune-s3-config",
                                    "key": "AWS_ENDPOINT_URL",
                                    "optional": True,
                                }
                            },
                        },
                        {"name": "HF_HUB_OFFLINE", "value": "1"},
                        {"name": "PET_NNODES", "value": "9"},
                        {"name": "ARGO_CONTAINER_NAME", "value": "main"},
                    ],
                },
            ],
        },
    }


@dataclass
class Artifact:
    """What a KFP artifact offers the launcher: a local path and a URI."""

    path: str
    uri: str


def sft_config() -> SFTConfig:
    return SFTConfig(batch_size=32, eval_batch_size=64, epochs=1, max_steps=10, seed=3)


def sft_kwargs(tmp: Path) -> dict[str, Any]:
    return {
        "base_model": "s3://bucket/models/base",
        "train_data": Artifact(
            str(tmp / "in" / "train"), "s3://bucket/root/dpo-pipeline/run-1/ingest/exec-2/train"
        ),
        "eval_data": Artifact(
            str(tmp / "in" / "eval"), "s3://bucket/root/dpo-pipeline/run-1/ingest/exec-2/eval"
        ),
        "model_dir": Artifact(str(tmp / "out" / "model"), f"{ROOT}/model"),
        "report_path": Artifact(str(tmp / "out" / "report.html"), f"{ROOT}/report"),
        "base_model_uri": "s3://bucket/models/base",
        "model_uri": f"{ROOT}/model",
    }


def render_sft(tmp: Path, *, num_nodes: int = 2, strategy: str = "ddp") -> dict[str, Any]:
    """The TrainJob the launcher renders for a 2-node SFT step running in :func:`step_pod`."""
    kwargs = sft_kwargs(tmp)
    settings = trainjob.settings_from_pod(step_pod(), accelerator_type="nvidia.com/gpu")
    out = trainjob.staging_uri(kwargs, "sft")
    from preftune.launch.stages import call_json, config_dict, per_worker_config

    call = call_json(
        "sft",
        per_worker_config("sft", config_dict(sft_config()), 8 * num_nodes),
        trainjob.job_kwargs("sft", kwargs),
    )
    return trainjob.render_trainjob(
        name=trainjob.job_name("sft", out + settings.owner.uid),
        stage="sft",
        call=call,
        output_uri=out,
        settings=settings,
        num_nodes=num_nodes,
        procs_per_node=8,
        strategy=strategy,
        runtime="torch-distributed",
        deadline_seconds=86400,
    )


def test_the_job_tracks_as_the_step_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to on a multi-node step: rank 0 of the job gets the step's tracking context and the KFP run's ids
    (resolved from the step pod's labels, which the job's pods lack) as values, and the MLflow Secret by
    reference like the object-store credentials."""
    from preftune.launch.distributed import TRACKING_ENV, job_env

    monkeypatch.setenv("KFP_RUN_ID", "run-123")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "nightly")
    context = {"params": {"report_to": "mlflow"}, "lineage": {"input.train_data": "s3://bucket/train"}}
    pod = step_pod()
    pod["spec"]["containers"][1]["env"].append(
        {
            "name": "MLFLOW_TRACKING_URI",
            "valueFrom": {
                "secretKeyRef": {"name": "preftune-mlflow", "key": "MLFLOW_TRACKING_URI", "optional": True}
            },
        }
    )
    settings = trainjob.settings_from_pod(pod, accelerator_type="nvidia.com/gpu")
    job = trainjob.render_trainjob(
        name="sft-job",
        stage="sft",
        call="{}",
        output_uri="s3://bucket/out",
        settings=settings,
        num_nodes=2,
        procs_per_node=8,
        strategy="ddp",
        runtime="torch-distributed",
        deadline_seconds=60,
        extra_env=job_env(context),
    )
    env = {e["name"]: e for e in job["spec"]["trainer"]["env"]}
    assert json.loads(env[TRACKING_ENV]["value"]) == context
    assert env["KFP_RUN_ID"]["value"] == "run-123" and env["MLFLOW_EXPERIMENT_NAME"]["value"] == "nightly"
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "preftune-mlflow"
    assert "value" not in env["MLFLOW_TRACKING_URI"]


# --------------------------------------------------------------------------------------- rendering and schema


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden wherever the API server would prune them."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Validator:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    schema.pop("$comment")
    strict = _strict(schema)
    jsonschema.Draft7Validator.check_schema(strict)
    return jsonschema.Draft7Validator(strict)


def test_rendered_trainjob_matches_golden(tmp_path: Path) -> None:
    job = render_sft(tmp_path)
    golden = GOLDEN / "trainjob-sft.yaml"
    text = yaml.safe_dump(job, sort_keys=True, width=100)
    if os.environ.get("PREFTUNE_UPDATE_GOLDEN"):
        golden.write_text(text, encoding="utf-8")
    assert yaml.safe_load(golden.read_text(encoding="utf-8")) == job, (
        "rendered TrainJob differs from tests/golden/trainjob-sft.yaml (PREFTUNE_UPDATE_GOLDEN=1 rewrites it)"
    )


def test_rendered_trainjob_carries_the_step(tmp_path: Path) -> None:
    job = render_sft(tmp_path)
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"] == {
        "name": "torch-distributed",
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
    }
    assert trainer["image"] == "registry.example.com/preftune:0.1.0"
    assert trainer["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--module",
        "preftune.launch.distributed",
    ]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    # a Quantity is a string or a float in the Trainer models: the GPU count goes as the string "8", not 8.0
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "120Gi", "nvidia.com/gpu": "8"}
    # the stage call: inputs by URI, outputs left to the worker, the global batch of 32 split over 16 workers
    args = trainer["args"]
    assert args[:3] == ["worker", "--output-uri", f"{ROOT.rsplit('/', 1)[0]}/exec-7/trainjob"]
    call = json.loads(args[args.index("--spec-json") + 1])
    assert call["stage"] == "sft"
    assert call["kwargs"]["train_data"] == "s3://bucket/root/dpo-pipeline/run-1/ingest/exec-2/train"
    assert call["kwargs"]["model_dir"] is None and call["kwargs"]["model_uri"] == f"{ROOT}/model"
    assert call["config"]["batch_size"] == 2 and call["config"]["eval_batch_size"] == 4
    assert call["config"]["max_steps"] == 10 and call["config"]["seed"] == 3
    # credentials by reference only; Trainer's reserved PET_* variables never copied; KFP's own not inherited
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "preftune-s3"
    assert "value" not in env["AWS_ACCESS_KEY_ID"]
    assert env["HF_HUB_OFFLINE"] == {"name": "HF_HUB_OFFLINE", "value": "1"}
    assert not {"PET_NNODES", "KFP_POD_NAME", "ARGO_CONTAINER_NAME", "ACCELERATE_USE_CPU"} & set(env)
    # scheduling handed over; the API server's default tolerations left to the API server
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "preftune.dev/launcher"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"preftune.dev/pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "preftune-pipeline-runner"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]
    # out of the Istio mesh of a profile namespace, where a sidecar would hang the job
    metadata = node["template"]["spec"]["template"]["metadata"]
    assert (
        metadata["labels"]["sidecar.istio.io/inject"]
        == metadata["annotations"]["sidecar.istio.io/inject"]
        == "false"
    )
    # each node checks that its torch sees the GPUs it was given
    assert env["PREFTUNE_STEP_GPUS"] == {"name": "PREFTUNE_STEP_GPUS", "value": "8"}
    # garbage-collected with the step's pod
    (owner,) = job["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": POD_NAME,
        "uid": step_pod()["metadata"]["uid"],
    }


def test_fsdp_is_set_through_accelerates_environment(tmp_path: Path) -> None:
    env = {e["name"]: e.get("value") for e in render_sft(tmp_path, strategy="fsdp")["spec"]["trainer"]["env"]}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert "ACCELERATE_USE_FSDP" not in {e["name"] for e in render_sft(tmp_path)["spec"]["trainer"]["env"]}


def test_rendered_trainjob_is_valid_for_the_crd(tmp_path: Path, crd_validator: jsonschema.Validator) -> None:
    job = render_sft(tmp_path)
    errors = sorted(crd_validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the CEL rules jsonschema does not evaluate
    name = job["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    (patch,) = job["spec"]["runtimePatches"]
    assert re.fullmatch(r"[a-z0-9.-]+\.[a-z]+/[a-z0-9.-]+", patch["manager"]), (
        "manager must be domain-prefixed"
    )


def test_strict_schema_rejects_a_misspelt_field(tmp_path: Path, crd_validator: jsonschema.Validator) -> None:
    job = render_sft(tmp_path)
    job["spec"]["trainer"]["numProcsPerNode"] = 8
    assert any("numProcsPerNode" in e.message for e in crd_validator.iter_errors(job))
    job = render_sft(tmp_path)
    job["spec"]["trainer"]["numNodes"] = "2"
    assert list(crd_validator.iter_errors(job))


def test_the_typed_models_refuse_a_malformed_part_before_submission(tmp_path: Path) -> None:
    """The Trainer models check each part as it is built: a toleration the API server would reject, or a count
    given as text, fails in the step with the field named instead of coming back from the cluster."""
    pod = step_pod()
    pod["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Sometimes"}]
    with pytest.raises(ValueError, match="operator"):
        trainjob.settings_from_pod(pod)
    settings = trainjob.settings_from_pod(step_pod())
    with pytest.raises(ValueError, match="num_nodes|numNodes"):
        trainjob.build_trainjob(
            name="preftune-sft-x",
            stage="sft",
            call="{}",
            output_uri="s3://b/p",
            settings=settings,
            num_nodes="2",
            procs_per_node=8,
            strategy="ddp",
            runtime="torch-distributed",
            deadline_seconds=60,
        )


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_pod_parts_are_valid_kubernetes(tmp_path: Path, version: str) -> None:
    """Env, resources, tolerations, volumes: the core/v1 parts, as the node pod will get them, strictly valid."""
    job = render_sft(tmp_path)
    trainer = job["spec"]["trainer"]
    (patch,) = job["spec"]["runtimePatches"]
    pod_patch = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]
    container = {
        "name": "node",
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        **{k: v for c in pod_patch["containers"] for k, v in c.items() if k != "name"},
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "node-0", "namespace": NS},
        "spec": {**{k: v for k, v in pod_patch.items() if k != "containers"}, "containers": [container]},
    }
    kv.validate(pod, version, strict=True)


def test_settings_from_a_cpu_pod_and_defaults() -> None:
    settings = trainjob.settings_from_pod(step_pod(gpus=0), accelerator_type="nvidia.com/gpu")
    assert settings.gpus_per_node == 0 and settings.namespace == NS
    pod = step_pod()
    pod["spec"]["containers"][1]["env"] = []
    assert {e.name for e in trainjob.settings_from_pod(pod).env} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    }, "without env on the pod, the object-store references the pipelines use"
    defaults = trainjob.default_settings("team-a", gpus_per_node=4)
    assert defaults.node_selector == {"preftune.dev/pool": "gpu"} and defaults.gpus_per_node == 4
    assert trainjob.default_settings("team-a", gpus_per_node=0).tolerations == []


def test_a_launcher_step_gives_its_job_the_compiled_gpus_and_training_resources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiled with --trainjob-launchers, the step's pod is small and has no GPU; its job's nodes get the
    compiled GPUs per training step, the training class's CPU and memory and the GPU pool's scheduling."""
    from preftune.launch import platform

    monkeypatch.setenv(platform.TRAINJOB_LAUNCHERS_ENV, "1")
    monkeypatch.setenv(platform.ACCELERATOR_COUNT_ENV, "4")
    monkeypatch.setenv(platform.RESOURCES_ENV, "train:cpu=12/16,memory=100Gi")
    pod = step_pod(gpus=0)
    pod["spec"]["nodeSelector"] = {}
    pod["spec"]["tolerations"] = []
    settings = trainjob.settings_from_pod(pod)
    assert trainjob.job_gpus(settings, Scale(num_nodes=2)) == 4
    assert settings.resources == {
        "requests": {"cpu": "12", "memory": "100Gi"},
        "limits": {"cpu": "16", "memory": "100Gi"},
    }
    assert settings.node_selector == {"preftune.dev/pool": "gpu"}
    assert [t.to_dict() for t in settings.tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # not a launcher: a CPU step's job stays on CPUs, a GPU step's job takes the step's GPUs
    monkeypatch.setenv(platform.TRAINJOB_LAUNCHERS_ENV, "0")
    assert trainjob.job_gpus(trainjob.settings_from_pod(step_pod(gpus=0)), Scale(num_nodes=2)) == 0
    assert trainjob.job_gpus(trainjob.settings_from_pod(step_pod(gpus=8)), Scale(num_nodes=2)) == 8


def test_inputs_and_outputs_must_be_in_object_storage(tmp_path: Path) -> None:
    kwargs = sft_kwargs(tmp_path)
    kwargs["train_data"] = Artifact(str(tmp_path / "t"), str(tmp_path / "t"))
    with pytest.raises(ValueError, match="train_data .* cannot read"):
        trainjob.job_kwargs("sft", kwargs)
    kwargs = sft_kwargs(tmp_path)
    kwargs["model_dir"] = Artifact(str(tmp_path / "m"), str(tmp_path / "m"))
    with pytest.raises(ValueError, match="object storage"):
        trainjob.staging_uri(kwargs, "sft")
    # a minio:// pipeline root (multi-user Kubeflow's default) is object storage too
    minio = {
        k: Artifact(v.path, v.uri.replace("s3://bucket/root", "minio://mlpipeline/v2/artifacts"))
        if hasattr(v, "uri")
        else v
        for k, v in sft_kwargs(tmp_path).items()
    }
    assert (
        trainjob.staging_uri(minio, "sft")
        == "minio://mlpipeline/v2/artifacts/dpo-pipeline/run-1/sft/exec-7/trainjob"
    )
    assert trainjob.job_kwargs("sft", minio)["train_data"].startswith("minio://mlpipeline/")


def test_outside_a_cluster_multi_node_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv(failures.LOCAL_RUN_ENV, str(tmp_path / "failure.json"))  # no failure record in s3://
    with pytest.raises(trainjob.KubeError, match=r"num_nodes > 1\) needs a cluster"):
        run_stage("sft", sft_config(), scale=Scale(num_nodes=2), **sft_kwargs(tmp_path))


# ------------------------------------------------------------------------------ a stand-in Kubernetes API


class FakeKube:
    """Records requests; answers GETs of the TrainJob from ``statuses`` (one per GET, the last repeated)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[Any] = [{}]
        self.pods: list[dict[str, Any]] = []
        self.logs: dict[str, str] = {}
        self.job: dict[str, Any] | None = None
        self.gets = 0
        self.create_error: int | None = None  # answer the POST with this HTTP status
        self.account_dir = Path()
        self.lock = threading.Lock()

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: Any
    ) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "query": query,
                    "auth": headers.get("Authorization"),
                    "body": body,
                }
            )
            if method == "GET" and path == f"/api/v1/namespaces/{NS}/pods/{POD_NAME}":
                return 200, step_pod()
            if method == "GET" and path == f"/api/v1/namespaces/{NS}/pods":
                return 200, {"kind": "PodList", "items": self.pods}
            if method == "GET" and path.endswith("/log"):
                return 200, self.logs.get(path.split("/")[-2], "")
            if method == "POST" and path == JOBS and self.create_error:
                return self.create_error, {"kind": "Status", "message": _refusal(self.create_error)}
            if method == "POST" and path == JOBS:
                self.job = body
                return 201, body
            if self.job is not None and path == f"{JOBS}/{self.job['metadata']['name']}":
                if method == "DELETE":
                    return 200, {"kind": "Status", "status": "Success"}
                status = self.statuses[min(self.gets, len(self.statuses) - 1)]
                self.gets += 1
                if isinstance(status, int):  # an API error
                    return status, {"kind": "Status", "message": f"injected HTTP {status}"}
                return 200, {**self.job, "status": status}
            return 404, {"kind": "Status", "message": f"{method} {path} not found"}

    def calls(self, method: str, path_part: str = "") -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and path_part in r["path"]]


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA (the pod's ca.crt) and the API server's certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-cluster-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def cert(subject: x509.Name, public_key: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        if ca:
            usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
            )
        return builder.sign(ca_key, hashes.SHA256())

    server = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(cert(ca_name, ca_key.public_key(), True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert(server, key.public_key(), False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return _certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def kube(
    tls: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[FakeKube, kubeapi.KubeClient]]:
    """The stand-in API server over TLS, and the launcher's client for it as a pod gets it: in-cluster config
    from the service environment and a service-account directory (``fake.account_dir``)."""
    fake = FakeKube()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            code, payload = fake.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    ca, cert, key = tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)  # as the kubelet writes it: no trailing newline
    (account / "ca.crt").write_bytes(ca.read_bytes())
    (account / "namespace").write_text(NS)
    fake.account_dir = account
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    try:
        yield fake, kubeapi.KubeClient.in_cluster(account, timeout=10)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _refusal(status: int) -> str:
    """What a real API server says when the service account lacks the Role, or Trainer is not installed."""
    if status == 403:
        return (
            f'trainjobs.trainer.kubeflow.org is forbidden: User "system:serviceaccount:{NS}:preftune-pipeline-runner" '
            f'cannot create resource "trainjobs" in API group "trainer.kubeflow.org" in the namespace "{NS}"'
        )
    return "the server could not find the requested resource"


def _condition(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


def _publish_job_outputs(bucket: Any, prefix: str, metrics: dict[str, float]) -> None:
    """What the job's rank 0 leaves under the staging prefix (see distributed.publish_outputs)."""
    bucket.put(f"{prefix}/model_dir/adapter_config.json", "{}")
    bucket.put(f"{prefix}/model_dir/lineage.json", json.dumps({"stage": "sft"}))
    bucket.put(f"{prefix}/report_path", "<html>report</html>")
    bucket.put(f"{prefix}/metrics.json", json.dumps(metrics))


def _s3_kwargs(s3: Any, tmp: Path) -> dict[str, Any]:
    root = s3.uri("root/run-1/sft/exec-7")
    kwargs = sft_kwargs(tmp)
    kwargs["train_data"] = Artifact(str(tmp / "in" / "train"), s3.uri("root/run-1/ingest/train"))
    kwargs["eval_data"] = Artifact(str(tmp / "in" / "eval"), s3.uri("root/run-1/ingest/eval"))
    kwargs["model_dir"] = Artifact(str(tmp / "out" / "model"), f"{root}/model")
    kwargs["report_path"] = Artifact(str(tmp / "out" / "report.html"), f"{root}/report")
    kwargs["model_uri"] = f"{root}/model"
    return kwargs


def _launch(
    client: trainjob.KubeClient, kwargs: dict[str, Any], lines: list[str], **scale: Any
) -> dict[str, float]:
    values = {"num_nodes": 2, "poll_seconds": 0.02, "timeout_seconds": 30, **scale}
    return trainjob.run_stage_as_trainjob(
        "sft",
        json.loads(json.dumps(sft_config().__dict__)),
        kwargs,
        Scale(**values),
        client=client,
        namespace=NS,
        echo=lines.append,
        grace_seconds=0,
    )


def test_launcher_submits_follows_and_collects(
    kube, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    kwargs = _s3_kwargs(s3, tmp_path)
    _publish_job_outputs(s3, "root/run-1/sft/exec-7/trainjob", {"eval_loss": 1.25, "steps": 10})
    running = {
        "jobsStatus": [{"name": "node", "active": 2, "ready": 2, "succeeded": 0, "failed": 0, "suspended": 0}]
    }
    fake.statuses = [
        {},
        {"conditions": [_condition("Suspended", "Resumed", "")], **running},
        {"conditions": [_condition("Suspended", "Resumed", "")], **running},
        {"conditions": [_condition("Complete", "JobSetCompleted", "jobset completed successfully")]},
    ]
    lines: list[str] = []
    metrics = _launch(client, kwargs, lines)

    assert metrics == {"eval_loss": 1.25, "steps": 10.0}
    # the step's own pod was read, then one POST, then GETs until Complete; no DELETE for a finished job
    assert fake.calls("GET", "/pods/")[0]["path"].endswith(POD_NAME)
    (post,) = fake.calls("POST")
    assert post["auth"] == f"bearer {TOKEN}"  # the service-account token, as the official client sends it
    assert post["query"] == {"fieldValidation": ["Strict"]}
    body = post["body"]
    assert body["kind"] == "TrainJob" and body["metadata"]["namespace"] == NS
    assert body["spec"]["trainer"]["image"] == "registry.example.com/preftune:0.1.0"
    assert body["spec"]["trainer"]["numNodes"] == 2 and body["spec"]["trainer"]["numProcPerNode"] == 8
    call = json.loads(body["spec"]["trainer"]["args"][-1])
    assert call["kwargs"]["train_data"] == s3.uri("root/run-1/ingest/train")
    assert call["config"]["batch_size"] == 2  # 32 over 2 nodes x 8 GPUs
    assert len(fake.calls("GET", "/trainjobs/")) == 4
    assert all(r["auth"] == f"bearer {TOKEN}" for r in fake.requests)
    assert not fake.calls("DELETE")
    # status went to the step log, once per change
    assert sum("Suspended=True (Resumed)" in line for line in lines) == 1
    assert any("node: active 2, ready 2" in line for line in lines)
    assert any("Complete=True (JobSetCompleted): jobset completed successfully" in line for line in lines)
    # outputs landed in the step's artifacts
    out = Path(kwargs["model_dir"].path)
    assert json.loads((out / "lineage.json").read_text()) == {"stage": "sft"}
    assert Path(kwargs["report_path"].path).read_text() == "<html>report</html>"


def test_a_failed_job_fails_the_step_with_its_message_and_logs(kube, s3, tmp_path: Path, monkeypatch) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    fake.statuses = [
        {"conditions": [_condition("Suspended", "Resumed")]},
        {"conditions": [_condition("Failed", "JobSetFailed", "jobset failed: node-1 exited with code 1")]},
    ]
    fake.pods = [
        {"metadata": {"name": "job-node-0-0"}, "status": {"phase": "Running"}},
        {"metadata": {"name": "job-node-1-0"}, "status": {"phase": "Failed"}},
        {"metadata": {"name": "job-node-2-0"}, "status": {"phase": "Failed"}},
    ]
    fake.logs = {
        "job-node-1-0": "Traceback ...\nDataError: train.jsonl: row 7: field 'prompt': missing\n",
        "job-node-2-0": '{"rank": 2, "event": "oom"}\n',  # one JSON line: kept as it was written
    }
    lines: list[str] = []
    with pytest.raises(trainjob.TrainJobFailed) as info:
        _launch(client, _s3_kwargs(s3, tmp_path), lines)
    message = str(info.value)
    assert "failed: jobset failed: node-1 exited with code 1" in message
    assert "job-node-1-0" in message and "row 7: field 'prompt': missing" in message
    assert "job-node-0-0" not in message
    assert '--- job-node-2-0 (last 30 lines)\n{"rank": 2, "event": "oom"}' in message
    (listing,) = [r for r in fake.requests if r["path"] == f"/api/v1/namespaces/{NS}/pods"]
    assert listing["query"]["labelSelector"] == [
        f"jobset.sigs.k8s.io/jobset-name={fake.job['metadata']['name']}"
    ]
    assert fake.calls("GET", "job-node-1-0/log")[0]["query"]["container"] == ["node"]
    assert not fake.calls("DELETE"), "a failed job stays for inspection (its owner reference cleans it up)"
    assert not Path(tmp_path / "out" / "model").exists()


def test_a_job_past_the_timeout_is_deleted(kube, s3, tmp_path: Path, monkeypatch) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    fake.statuses = [{"conditions": [_condition("Suspended", "Resumed")]}]
    with pytest.raises(StageFailed, match="did not finish within 1 s"):
        _launch(client, _s3_kwargs(s3, tmp_path), [], timeout_seconds=1, poll_seconds=0.05)
    assert len(fake.calls("GET", "/trainjobs/")) >= 2
    (delete,) = fake.calls("DELETE")
    assert delete["path"] == f"{JOBS}/{fake.job['metadata']['name']}"
    assert delete["query"]["propagationPolicy"] == ["Background"]


def test_transient_api_errors_are_waited_out_and_a_vanished_job_is_an_error(
    kube, s3, tmp_path, monkeypatch
) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    kwargs = _s3_kwargs(s3, tmp_path)
    _publish_job_outputs(s3, "root/run-1/sft/exec-7/trainjob", {"eval_loss": 2.0})
    fake.statuses = [503, 500, {"conditions": [_condition("Complete", "JobSetCompleted")]}]
    lines: list[str] = []
    assert _launch(client, kwargs, lines) == {"eval_loss": 2.0}
    assert sum("retrying" in line for line in lines) == 2

    fake.requests.clear()
    fake.gets = 0
    fake.statuses = [404]
    with pytest.raises(trainjob.TrainJobFailed, match="disappeared"):
        _launch(client, _s3_kwargs(s3, tmp_path / "again"), [])


def test_without_its_pod_the_step_uses_platform_defaults(kube, s3, tmp_path: Path, monkeypatch) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", "not-this-pod")
    monkeypatch.setenv("PREFTUNE_IMAGE", "registry.example.com/preftune:fallback")
    _publish_job_outputs(s3, "root/run-1/sft/exec-7/trainjob", {"eval_loss": 3.0})
    fake.statuses = [{"conditions": [_condition("Complete")]}]
    _launch(client, _s3_kwargs(s3, tmp_path), [], num_gpus=4)
    trainer = fake.job["spec"]["trainer"]
    assert trainer["image"] == "registry.example.com/preftune:fallback"
    assert trainer["numProcPerNode"] == 4 and trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    pod = fake.job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][
        0
    ]
    assert pod["template"]["spec"]["template"]["spec"]["nodeSelector"] == {"preftune.dev/pool": "gpu"}
    assert "ownerReferences" not in fake.job["metadata"]


def test_a_job_that_published_nothing_is_an_error(kube, s3, tmp_path: Path, monkeypatch) -> None:
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    fake.statuses = [{"conditions": [_condition("Complete")]}]
    with pytest.raises(StageFailed, match="published no .*metrics.json"):
        _launch(client, _s3_kwargs(s3, tmp_path), [])


def test_the_client_rereads_the_rotating_service_account_token(kube, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet rotates a projected token long before a day-long job ends: the client reads the file again
    once the token it holds is a minute old (the kubernetes client's in-cluster refresh), not once at start."""
    from kubernetes.config import incluster_config

    fake, client = kube
    with pytest.raises(trainjob.KubeError, match="HTTP 404"):
        client.get_trainjob(NS, "nothing")
    (fake.account_dir / "token").write_text("rotated")
    with pytest.raises(trainjob.KubeError) as info:
        client.get_trainjob(NS, "nothing")
    assert info.value.status == 404 and not info.value.transient

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Later:
            return super().now(tz) + datetime.timedelta(seconds=61)

    monkeypatch.setattr(
        incluster_config, "datetime", type("clock", (), {"datetime": Later, "timedelta": datetime.timedelta})
    )
    with pytest.raises(trainjob.KubeError):
        client.get_trainjob(NS, "nothing")
    assert [r["auth"] for r in fake.requests] == [f"bearer {TOKEN}", f"bearer {TOKEN}", "bearer rotated"]


@pytest.mark.parametrize("status", [403, 404])
def test_missing_rbac_or_trainer_is_refused_clearly_and_not_retried(
    kube, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A service account without the launcher's Role, or a cluster without Kubeflow Trainer: the step fails at
    the submission with the server's reason and what to apply or install, marked deterministic (a KFP retry
    would meet the same refusal); nothing was created, so nothing is deleted."""
    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    fake.create_error = status
    with pytest.raises(trainjob.KubeError) as info:
        _launch(client, _s3_kwargs(s3, tmp_path), [])
    message = str(info.value)
    assert (
        f"create TrainJob {NS}/preftune-sft-" in message and f"HTTP {status}: {_refusal(status)}" in message
    )
    if status == 403:
        assert "infra/k8s/trainjob-launcher-rbac.yaml" in message and "preftune-trainjob-launcher" in message
    else:
        assert "needs Kubeflow Trainer v2.2 or later" in message
    assert info.value.deterministic and failures.is_deterministic(info.value)
    assert not fake.calls("DELETE") and not fake.calls("GET", "/trainjobs/")


def test_the_launcher_modules_load_no_kubernetes_client_on_import() -> None:
    """The launcher is imported by every training step (distributed.run_stage); the Kubernetes client and the
    Trainer models (hundreds of modules) load only when a step really submits a TrainJob."""
    heavy = ("kubernetes", "kubeflow_trainer_api", "pydantic")
    code = (
        "import sys\n"
        "from preftune.launch import trainjob, trainjob_spec, kubeapi, distributed\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- the job side, without a cluster


def test_worker_publishes_what_the_launcher_collects(s3, tmp_path: Path) -> None:
    """A 1-process worker with --output-uri (what each TrainJob node runs) and collect_outputs, end to end."""
    from tiny_models import make_model_dir, make_tokenizer

    from preftune.launch import distributed

    answers = ["the sky is blue.", "two plus two is four."]
    rows = [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"question {i % 2}"}],
            "completion": answers[i % 2],
        }
        for i in range(8)
    ]
    base = make_model_dir(tmp_path / "base", make_tokenizer([*answers, "<|user|> <|assistant|> question"]))
    storage.upload_dir(tmp_path / "base", s3.uri("models/base"))
    train = s3.put("data/train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    eval_ = s3.put("data/eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:4]))
    config = SFTConfig(epochs=1, batch_size=4, eval_batch_size=4, max_length=32, logging_steps=1)
    staging = s3.uri("root/run-1/sft/exec-7/trainjob")
    spec = json.loads(
        stages.call_json(
            "sft",
            stages.config_dict(config),
            {
                "base_model": s3.uri("models/base"),
                "train_data": train,
                "eval_data": eval_,
                "model_dir": None,
                "report_path": None,
                "base_model_uri": s3.uri("models/base"),
                "model_uri": s3.uri("root/run-1/sft/exec-7/model"),
            },
        )
    )
    distributed.worker(copy.deepcopy(spec), output_uri=staging)
    keys = s3.list_keys("root/run-1/sft/exec-7/trainjob/")
    assert "root/run-1/sft/exec-7/trainjob/metrics.json" in keys
    assert "root/run-1/sft/exec-7/trainjob/report_path" in keys
    assert any(k.endswith("model_dir/adapter_model.safetensors") for k in keys)

    outputs = {"model_dir": str(tmp_path / "model"), "report_path": str(tmp_path / "report.html")}
    metrics = trainjob.collect_outputs("sft", outputs, staging)
    assert metrics["steps"] == 2.0 and metrics["train_examples"] == 8.0
    lineage = json.loads((tmp_path / "model" / "lineage.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"] == s3.uri("models/base")
    assert "<html" in (tmp_path / "report.html").read_text().lower()
    assert base  # the local copy the bucket was filled from


def test_optional_outputs_travel_only_when_asked(tmp_path: Path) -> None:
    """DPO's and PPO's snapshot directory: passed by the step -> written by the job -> collected; else absent."""
    kwargs = {
        "sft_model": "s3://bucket/models/sft",
        "train_pairs": Artifact(str(tmp_path / "t"), "s3://bucket/run/pairs/train"),
        "eval_pairs": Artifact(str(tmp_path / "e"), "s3://bucket/run/pairs/eval"),
        "model_dir": Artifact(str(tmp_path / "out" / "model"), "s3://bucket/run/dpo/model"),
        "report_path": Artifact(str(tmp_path / "out" / "report.html"), "s3://bucket/run/dpo/report"),
        "snapshot_dir": Artifact(str(tmp_path / "out" / "checkpoints"), "s3://bucket/run/dpo/checkpoints"),
    }
    assert (
        trainjob.job_kwargs("dpo", kwargs)["snapshot_dir"] is None
    )  # the worker writes it, then publishes it
    assert "snapshot_dir" not in trainjob.job_kwargs("dpo", {**kwargs, "snapshot_dir": None})

    staging = tmp_path / "staging"
    (staging / "model_dir").mkdir(parents=True)
    (staging / "model_dir" / "lineage.json").write_text("{}")
    (staging / "metrics.json").write_text('{"steps": 3}')
    assert trainjob.collect_outputs("dpo", kwargs, str(staging)) == {"steps": 3.0}  # none published: fine
    (staging / "snapshot_dir" / "step-3").mkdir(parents=True)
    (staging / "snapshot_dir" / "step-3" / "lineage.json").write_text("{}")
    trainjob.collect_outputs("dpo", kwargs, str(staging))
    assert (tmp_path / "out" / "checkpoints" / "step-3" / "lineage.json").is_file()
    (staging / "model_dir" / "lineage.json").unlink()
    (staging / "model_dir").rmdir()
    with pytest.raises(StageFailed, match="published no model_dir"):
        trainjob.collect_outputs("dpo", kwargs, str(staging))


def test_a_cancelled_step_deletes_its_job(kube, s3, tmp_path: Path, monkeypatch) -> None:
    """SIGTERM to the step (a cancelled run, an evicted pod) while it waits: the job is deleted, the step exits."""
    import signal

    fake, client = kube
    monkeypatch.setenv("KFP_POD_NAME", POD_NAME)
    fake.statuses = [{"conditions": [_condition("Suspended", "Resumed")]}]

    class NotHandled(Exception):
        pass

    def fallback(signum: int, frame: Any) -> None:  # only reached if the launcher installed no handler
        raise NotHandled

    previous = signal.signal(signal.SIGTERM, fallback)
    handle = fake.handle

    def handle_and_cancel(method: str, path: str, *args: Any) -> tuple[int, Any]:
        answer = handle(method, path, *args)
        if method == "GET" and fake.gets == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return answer

    fake.handle = handle_and_cancel
    try:
        with pytest.raises(SystemExit) as info:
            _launch(client, _s3_kwargs(s3, tmp_path), [], timeout_seconds=60, poll_seconds=0.05)
        assert info.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is fallback, "the step's own SIGTERM handler is restored"
    finally:
        signal.signal(signal.SIGTERM, previous)
    (delete,) = fake.calls("DELETE")
    assert delete["path"] == f"{JOBS}/{fake.job['metadata']['name']}"
