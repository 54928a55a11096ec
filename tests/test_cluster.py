"""What the compiled pipelines ask of a cluster: resources on every step, GPUs on the GPU pool for the steps that
use them (evaluate its own count), every compile-time setting in the pod's environment, credentials only by
reference.

The committed YAML is checked as compiled with the defaults; one `preftune compile` with every setting changed
(in a fresh process: settings are read before the components are imported) checks that each flag lands where
the pod reads it, and a compile with ``--trainjob-launchers`` that multi-node launchers hold no GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from preftune.launch import platform
from preftune.launch.devices import STEP_GPUS_ENV
from preftune.orchestration import compilation

ROOT = compilation.source_root()
PIPELINE_FILES = sorted((ROOT / "pipelines").glob("*.yaml"))
TRAINING = {
    "exec-sft",
    "exec-dpo",
    "exec-reward-model",
    "exec-ppo",
    "exec-grpo",
    "exec-kto",
    "exec-online-dpo",
}
EVALUATE = {"exec-evaluate"}
MERGE = {"exec-promote"}
CUSTOM = {
    "--image": "registry.example.com/preftune@sha256:" + "0123456789abcdef" * 4,
    "--accelerator-type": "nvidia.com/mig-1g.10gb",
    "--accelerator-count": "2",
    "--evaluate-gpus": "1",
    "--training-timeout": str(72 * 3600),
    "--gpu-node-label": "cloud.example.com/accelerator=a100",
    "--gpu-taint": "dedicated:NoExecute",
    "--shm-size": "8Gi",
    "--resources": "train:cpu=8/16,memory=64Gi/80Gi;evaluate:cpu=4,memory=32Gi;data:cpu=250m/1,memory=512Mi/2Gi",
    "--s3-secret": "team-minio",
    "--hf-token-secret": "team-hf",
}


def _base(executor: str) -> str:
    """``exec-evaluate-2`` -> ``exec-evaluate`` (KFP numbers a second use of a component)."""
    base, _, number = executor.rpartition("-")
    return base if number.isdigit() else executor


def _documents(path: Path) -> tuple[dict, dict]:
    spec, platform_spec = yaml.safe_load_all(path.read_text())
    return spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _env(executor: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in executor["container"].get("env", [])}


def _compile(tmp: Path, argv: list[str], env: dict[str, str] | None = None) -> Path:
    shutil.copytree(ROOT / "components", tmp / "components")
    shutil.copytree(ROOT / "pipelines", tmp / "pipelines")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFTUNE_")}
    command = [str(Path(sys.executable).parent / "preftune"), "compile", "--root", str(tmp), *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**clean, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


@pytest.fixture(scope="module")
def custom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sources compiled with every cluster setting changed."""
    argv = [part for flag, value in CUSTOM.items() for part in (flag, value)] + ["--offline"]
    return _compile(tmp_path_factory.mktemp("custom"), argv)


# ---------------------------------------------------------------------------------------- the committed YAML


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_gpu_steps_request_their_own_gpus_on_the_gpu_pool(path: Path) -> None:
    spec, k8s = _documents(path)
    executors = spec["deploymentSpec"]["executors"]
    gpu_steps = {name for name in executors if _base(name) in TRAINING | EVALUATE}
    assert gpu_steps & {"exec-evaluate"} and gpu_steps - {"exec-evaluate"}, "training and evaluate steps"
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        if name not in gpu_steps:
            assert "accelerator" not in resources, f"{name} is a CPU step"
            assert "nodeSelector" not in k8s[name] and "tolerations" not in k8s[name]
            assert _env(executor)[STEP_GPUS_ENV] == "0"
            continue
        expected = 1 if _base(name) in EVALUATE else platform.DEFAULT_ACCELERATOR_COUNT
        accelerator = resources["accelerator"]
        assert accelerator["resourceType"] == platform.DEFAULT_ACCELERATOR_TYPE
        assert int(accelerator["resourceCount"]) == expected
        assert _env(executor)[STEP_GPUS_ENV] == str(expected)
        assert k8s[name]["nodeSelector"]["labels"] == dict([platform.GPU_NODE_LABEL])
        assert k8s[name]["tolerations"] == [
            {"key": platform.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert k8s[name]["emptyDirMounts"] == [
            {
                "medium": "Memory",
                "mountPath": "/dev/shm",
                "volumeName": "dshm",
                "sizeLimit": platform.DEFAULT_SHM_SIZE,
            }
        ]
        assert int(k8s[name]["activeDeadlineSeconds"]) == platform.DEFAULT_TRAINING_TIMEOUT


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_every_step_has_cpu_and_memory_requests_and_limits_by_its_class(path: Path) -> None:
    spec, _ = _documents(path)
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        kind = (
            "train"
            if _base(name) in TRAINING
            else "evaluate"
            if _base(name) in EVALUATE
            else "merge"
            if _base(name) in MERGE
            else "data"
        )
        expected = platform.DEFAULT_RESOURCES[kind]
        assert resources["resourceCpuRequest"] == expected.cpu_request, name
        assert resources["resourceCpuLimit"] == expected.cpu_limit, name
        assert resources["resourceMemoryRequest"] == expected.memory_request, name
        assert resources["resourceMemoryLimit"] == expected.memory_limit, name


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_every_compile_time_setting_is_in_every_pods_environment(path: Path) -> None:
    spec, _ = _documents(path)
    compiled = {s.env: s.text() for s in platform.SETTINGS}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = _env(executor)
        assert {k: env.get(k) for k in compiled} == compiled, name


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_training_tasks_are_retried_with_backoff(path: Path) -> None:
    spec, _ = _documents(path)
    tasks = spec["root"]["dag"]["tasks"]
    for task in tasks.values():
        executor = "exec-" + task["componentRef"]["name"].removeprefix("comp-")
        if _base(executor) in TRAINING | EVALUATE:
            retry = task["retryPolicy"]
            assert retry["maxRetryCount"] == 3
            assert retry["backoffDuration"] == "60s" and retry["backoffFactor"] == 2.0


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_credentials_come_from_secrets_and_never_appear(path: Path) -> None:
    text = path.read_text()
    spec, k8s = _documents(path)
    for name in spec["deploymentSpec"]["executors"]:
        refs = {ref["secretName"]: ref for ref in k8s[name]["secretAsEnv"]}
        assert {item["envVar"] for item in refs[platform.DEFAULT_S3_SECRET]["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        hf = refs[platform.DEFAULT_HF_TOKEN_SECRET]
        assert hf["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "HF_TOKEN"}] and hf["optional"] is True
    # no access key ids, secret-looking values or inline env assignments of credentials
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text)
    for executor in spec["deploymentSpec"]["executors"].values():
        names = set(_env(executor))
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
        assert not names & set(platform.OFFLINE_ENV), "offline only when compiled so"


# ------------------------------------------------------------------------------------------- compile settings


def test_each_setting_reaches_the_yaml_and_the_pods_environment(custom: Path) -> None:
    spec, k8s = _documents(custom / "pipelines" / "dpo.yaml")
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        env = _env(executor)
        assert executor["container"]["image"] == CUSTOM["--image"], "pinned by digest, unchanged"
        assert env[platform.IMAGE_ENV] == CUSTOM["--image"]
        assert env[platform.TRAINING_TIMEOUT_ENV] == str(72 * 3600)
        assert env[platform.ACCELERATOR_TYPE_ENV] == "nvidia.com/mig-1g.10gb"
        assert env[platform.ACCELERATOR_COUNT_ENV] == "2" and env[platform.EVALUATE_GPUS_ENV] == "1"
        assert env[platform.GPU_NODE_LABEL_ENV] == "cloud.example.com/accelerator=a100"
        assert env[platform.GPU_TAINT_ENV] == "dedicated:NoExecute"
        assert env[platform.SHM_SIZE_ENV] == "8Gi"
        assert "train:cpu=8/16,memory=64Gi/80Gi" in env[platform.RESOURCES_ENV]
        assert env[platform.S3_SECRET_ENV] == "team-minio" and env[platform.HF_TOKEN_SECRET_ENV] == "team-hf"
        assert env[platform.OFFLINE_SWITCH_ENV] == "1"
        assert all(env[name] == "1" for name in platform.OFFLINE_ENV)
        # the optional MLflow Secret (report_to=mlflow, registry_uri=mlflow://) keeps its name
        assert {r["secretName"] for r in k8s[name]["secretAsEnv"]} == {
            "team-minio",
            "team-hf",
            "preftune-mlflow",
        }
    dpo, evaluate = executors["exec-dpo"], executors["exec-evaluate"]
    assert dpo["container"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/mig-1g.10gb"
    assert int(dpo["container"]["resources"]["accelerator"]["resourceCount"]) == 2
    assert int(evaluate["container"]["resources"]["accelerator"]["resourceCount"]) == 1, (
        "evaluate's own count"
    )
    assert _env(evaluate)[STEP_GPUS_ENV] == "1" and _env(dpo)[STEP_GPUS_ENV] == "2"
    assert dpo["container"]["resources"]["resourceMemoryLimit"] == "80Gi"
    assert evaluate["container"]["resources"]["resourceCpuLimit"] == "4"
    assert executors["exec-ingest"]["container"]["resources"]["resourceCpuRequest"] == "250m"
    assert k8s["exec-dpo"]["nodeSelector"]["labels"] == {"cloud.example.com/accelerator": "a100"}
    assert k8s["exec-dpo"]["tolerations"] == [
        {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}
    ]
    assert k8s["exec-dpo"]["emptyDirMounts"][0]["sizeLimit"] == "8Gi"
    assert int(k8s["exec-dpo"]["activeDeadlineSeconds"]) == 72 * 3600
    component = yaml.safe_load((custom / "components" / "sft" / "component.yaml").read_text())
    assert component["deploymentSpec"]["executors"]["exec-sft"]["container"]["image"] == CUSTOM["--image"]


def test_multi_node_launchers_hold_no_gpu(tmp_path: Path) -> None:
    root = _compile(tmp_path, ["--trainjob-launchers", "--accelerator-count", "8"])
    spec, k8s = _documents(root / "pipelines" / "dpo.yaml")
    executors = spec["deploymentSpec"]["executors"]
    launcher = platform.DEFAULT_RESOURCES["launcher"]
    for name in ("exec-sft", "exec-dpo"):
        resources = executors[name]["container"]["resources"]
        assert "accelerator" not in resources and "nodeSelector" not in k8s[name]
        assert resources["resourceMemoryLimit"] == launcher.memory_limit
        env = _env(executors[name])
        assert env[platform.TRAINJOB_LAUNCHERS_ENV] == "1" and env[STEP_GPUS_ENV] == "0"
        assert env[platform.ACCELERATOR_COUNT_ENV] == "8", "the GPUs its TrainJob's nodes get"
    assert int(executors["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"]) == 1


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--image", "registry.example.com/preftune@sha256:abc", "REPOSITORY@sha256"),
        ("--image", "no-tag-or-digest", "REPOSITORY:TAG"),
        ("--resources", "gpu:cpu=1", "CLASS one of"),
        ("--resources", "train:cpu=lots", "not a Kubernetes quantity"),
        ("--gpu-taint", "nvidia.com/gpu:Sometimes", "EFFECT one of"),
        ("--accelerator-count", "-1", ">= 0"),
    ],
)
def test_bad_settings_are_refused_before_compiling(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    command = [str(Path(sys.executable).parent / "preftune"), "compile", "--root", str(tmp_path), flag, value]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "pipelines").exists()


def test_settings_round_trip_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod gets as environment reads back as the same settings there."""
    for flag, value in CUSTOM.items():
        (setting,) = [s for s in platform.SETTINGS if s.flag == flag]
        monkeypatch.setenv(setting.env, value)
    compiled = platform.compiled_environment()
    for name, value in compiled.items():
        monkeypatch.setenv(name, value)
    assert platform.compiled_environment() == compiled
    assert platform.step_resources("evaluate") == platform.Resources("4", "4", "32Gi", "32Gi")
    assert platform.gpu_toleration() == {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}


def test_secret_name_and_keys_are_compile_time_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(platform.S3_SECRET_ENV, "team-minio")
    monkeypatch.setenv(
        platform.S3_SECRET_KEYS_ENV, "accesskey=AWS_ACCESS_KEY_ID,secretkey=AWS_SECRET_ACCESS_KEY"
    )
    assert platform.s3_secret() == "team-minio"
    assert platform.s3_secret_keys() == {
        "accesskey": "AWS_ACCESS_KEY_ID",
        "secretkey": "AWS_SECRET_ACCESS_KEY",
    }
    monkeypatch.setenv(platform.S3_SECRET_KEYS_ENV, "broken")
    with pytest.raises(ValueError, match="KEY=ENV"):
        platform.s3_secret_keys()
