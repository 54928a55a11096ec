"""What the compiled pipelines ask of a cluster: GPUs on the GPU pool, credentials only by reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from preftune.launch import platform
from preftune.orchestration import compilation

ROOT = compilation.source_root()
PIPELINE_FILES = sorted((ROOT / "pipelines").glob("*.yaml"))
TRAINING = {"exec-sft", "exec-dpo", "exec-evaluate", "exec-reward-model", "exec-ppo"}


def _is_training(executor: str) -> bool:
    """A training executor, also when KFP numbers a second use of a component (``exec-evaluate-2``)."""
    base, _, number = executor.rpartition("-")
    return executor in TRAINING or (number.isdigit() and base in TRAINING)


def _documents(path: Path) -> tuple[dict, dict]:
    spec, platform_spec = yaml.safe_load_all(path.read_text())
    return spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_every_training_task_requests_a_gpu_on_the_gpu_pool(path: Path) -> None:
    spec, k8s = _documents(path)
    executors = spec["deploymentSpec"]["executors"]
    training = sorted(name for name in executors if _is_training(name))
    assert training, "the pipeline has training steps"
    label, value = platform.GPU_NODE_LABEL
    for name in training:
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == platform.DEFAULT_ACCELERATOR_TYPE
        assert int(accelerator["resourceCount"]) >= 1
        assert k8s[name]["nodeSelector"]["labels"] == {label: value}
        assert {"key": platform.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"} in k8s[name][
            "tolerations"
        ]
        assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"} in k8s[name][
            "emptyDirMounts"
        ]
        assert int(k8s[name]["activeDeadlineSeconds"]) == platform.DEFAULT_TRAINING_TIMEOUT
    for name in set(executors) - set(training):
        assert "resources" not in executors[name]["container"], f"{name} is a CPU step"


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_training_tasks_are_retried_with_backoff(path: Path) -> None:
    spec, _ = _documents(path)
    tasks = spec["root"]["dag"]["tasks"]
    for task in tasks.values():
        executor = "exec-" + task["componentRef"]["name"].removeprefix("comp-")
        if _is_training(executor):
            retry = task["retryPolicy"]
            assert retry["maxRetryCount"] == 3
            assert retry["backoffDuration"] == "60s" and retry["backoffFactor"] == 2.0


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=lambda p: p.name)
def test_credentials_come_from_the_secret_and_never_appear(path: Path) -> None:
    text = path.read_text()
    spec, k8s = _documents(path)
    for name in spec["deploymentSpec"]["executors"]:
        refs = k8s[name]["secretAsEnv"]
        assert refs[0]["secretName"] == platform.DEFAULT_S3_SECRET
        envs = {item["envVar"] for item in refs[0]["keyToEnv"]}
        assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # no access key ids, secret-looking values or inline env assignments of credentials
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{30,}", text)
    for executor in spec["deploymentSpec"]["executors"].values():
        env_names = {e.get("name") for e in executor["container"].get("env", [])}
        assert not env_names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


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


def test_compile_stamps_image_and_cluster_settings(tmp_path: Path) -> None:
    """`preftune compile --image ...` in a fresh process: settings are read before components are imported."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "components", tmp_path / "components")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    argv = [
        str(Path(sys.executable).parent / "preftune"),
        "compile",
        "--root",
        str(tmp_path),
        "--image",
        "registry.example.com/preftune:9.9",
        "--accelerator-type",
        "nvidia.com/mig-1g.10gb",
        "--accelerator-count",
        "2",
        "--s3-secret",
        "team-minio",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    spec, k8s = _documents(tmp_path / "pipelines" / "dpo.yaml")
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "registry.example.com/preftune:9.9"
        assert k8s[name]["secretAsEnv"][0]["secretName"] == "team-minio"
    accelerator = spec["deploymentSpec"]["executors"]["exec-dpo"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/mig-1g.10gb" and int(accelerator["resourceCount"]) == 2
    component = yaml.safe_load((tmp_path / "components" / "sft" / "component.yaml").read_text())
    assert component["deploymentSpec"]["executors"]["exec-sft"]["container"]["image"] == (
        "registry.example.com/preftune:9.9"
    )
