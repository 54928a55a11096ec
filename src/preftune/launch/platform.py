"""Where the components run: the cluster settings fixed when the pipelines are compiled.

Each setting is an environment variable with a default. ``preftune compile --image ... --accelerator-type ...``
sets them before the component and pipeline modules are imported (they are read then), and
``pipelines/cluster.py`` writes every one of them into each step's pod as an environment variable, so the code
in the pod (the torchrun timeout, a TrainJob's deadline, GPUs and scheduling) sees the values the pipeline was
compiled with instead of the defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_IMAGE = "ghcr.io/preftune/preftune:0.1.0"
DEFAULT_ACCELERATOR_TYPE = "nvidia.com/gpu"
DEFAULT_ACCELERATOR_COUNT = 1
DEFAULT_TRAINING_TIMEOUT = 24 * 3600
DEFAULT_S3_SECRET = "preftune-s3"
#: Keys of the S3 credentials Secret -> environment variables boto3 reads.
DEFAULT_S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
DEFAULT_HF_TOKEN_SECRET = "hf-token"
#: The key of the Hugging Face token Secret, and the variable huggingface_hub reads.
HF_TOKEN_KEY = "HF_TOKEN"
S3_CONFIG_MAP = "preftune-s3-config"
GPU_NODE_LABEL = ("preftune.dev/pool", "gpu")
GPU_TAINT_KEY = "nvidia.com/gpu"
#: Variables huggingface_hub, transformers and datasets read to stay off the network.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

IMAGE_ENV = "PREFTUNE_IMAGE"
ACCELERATOR_TYPE_ENV = "PREFTUNE_ACCELERATOR_TYPE"
ACCELERATOR_COUNT_ENV = "PREFTUNE_ACCELERATOR_COUNT"
EVALUATE_GPUS_ENV = "PREFTUNE_EVALUATE_GPUS"
TRAINING_TIMEOUT_ENV = "PREFTUNE_TRAINING_TIMEOUT"
GPU_NODE_LABEL_ENV = "PREFTUNE_GPU_NODE_LABEL"
GPU_TAINT_ENV = "PREFTUNE_GPU_TAINT"
SHM_SIZE_ENV = "PREFTUNE_SHM_SIZE"
RESOURCES_ENV = "PREFTUNE_RESOURCES"
TRAINJOB_LAUNCHERS_ENV = "PREFTUNE_TRAINJOB_LAUNCHERS"
S3_SECRET_ENV = "PREFTUNE_S3_SECRET"
S3_SECRET_KEYS_ENV = "PREFTUNE_S3_SECRET_KEYS"
HF_TOKEN_SECRET_ENV = "PREFTUNE_HF_TOKEN_SECRET"
OFFLINE_SWITCH_ENV = "PREFTUNE_OFFLINE"

_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_IMAGE = re.compile(
    r"^(?P<name>[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-]+[a-z0-9]+)*)*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_LABEL = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


class SettingError(ValueError):
    """A compile-time setting (flag or environment variable) has a value no cluster would accept."""


# ------------------------------------------------------------------------------------------ resources per class


@dataclass(frozen=True)
class Resources:
    """CPU and memory a step's container requests and is limited to (Kubernetes quantities)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str

    def text(self) -> str:
        return f"cpu={self.cpu_request}/{self.cpu_limit},memory={self.memory_request}/{self.memory_limit}"

    def kubernetes(self) -> dict[str, dict[str, str]]:
        """As a container's ``resources`` (requests and limits)."""
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


#: What each kind of step needs. data: reading and validating rows, the registry; merge: promote, which merges
#: LoRA adapters into full weights in memory; train: SFT, reward model, DPO, PPO; evaluate: sampling and scoring;
#: launcher: a multi-node step that only submits a TrainJob and waits. The defaults fit the GPU nodes of
#: infra/terraform (4 vCPU, 16 GiB): set your own with ``preftune compile --resources``.
DEFAULT_RESOURCES = {
    "data": Resources("500m", "2", "1Gi", "4Gi"),
    "merge": Resources("1", "4", "8Gi", "16Gi"),
    "train": Resources("3", "4", "12Gi", "12Gi"),
    "evaluate": Resources("3", "4", "12Gi", "12Gi"),
    "launcher": Resources("250m", "1", "512Mi", "1Gi"),
}
STEP_CLASSES = tuple(DEFAULT_RESOURCES)
DEFAULT_SHM_SIZE = "2Gi"


def _quantity(value: str, what: str) -> str:
    if not _QUANTITY.match(value):
        raise SettingError(f"{what}: {value!r} is not a Kubernetes quantity (e.g. 500m, 4, 512Mi, 16Gi)")
    return value


def _pair(text: str, what: str) -> tuple[str, str]:
    request, _, limit = text.partition("/")
    return _quantity(request, what), _quantity(limit or request, what)


def parse_resources(raw: str) -> dict[str, Resources]:
    """``CLASS:cpu=REQ[/LIMIT],memory=REQ[/LIMIT];...`` over the defaults (a missing LIMIT equals REQ)."""
    table = dict(DEFAULT_RESOURCES)
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        name, sep, body = entry.partition(":")
        if not sep or name.strip() not in table:
            raise SettingError(
                f"{RESOURCES_ENV}: {entry!r}: expected CLASS:cpu=REQ[/LIMIT],memory=REQ[/LIMIT] with CLASS one "
                f"of {', '.join(STEP_CLASSES)}"
            )
        name = name.strip()
        current = table[name]
        cpu, memory = (current.cpu_request, current.cpu_limit), (current.memory_request, current.memory_limit)
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, sep, value = item.partition("=")
            if key == "cpu" and sep:
                cpu = _pair(value, f"{name} cpu")
            elif key == "memory" and sep:
                memory = _pair(value, f"{name} memory")
            else:
                raise SettingError(f"{RESOURCES_ENV}: {item!r} in {entry!r}: expected cpu=... or memory=...")
        table[name] = Resources(cpu[0], cpu[1], memory[0], memory[1])
    return table


# ------------------------------------------------------------------------------------------ the settings


def _get(env: str, default: str) -> str:
    return os.environ.get(env, default).strip()


def _int(env: str, default: int, low: int) -> int:
    raw = _get(env, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{env}={raw!r} is not an integer") from None
    if value < low:
        raise SettingError(f"{env} must be >= {low}, got {value}")
    return value


def _flag(env: str) -> bool:
    raw = _get(env, "0").lower()
    if raw not in ("0", "1", "true", "false", ""):
        raise SettingError(f"{env}={raw!r}: expected 1 or 0")
    return raw in ("1", "true")


def check_image(image: str) -> str:
    """``image`` when it is a valid reference (``REPO[:TAG]``, ``REPO@sha256:<64 hex>`` or both)."""
    match = _IMAGE.match(image)
    if not match or not (match.group("tag") or match.group("digest")):
        raise SettingError(
            f"image {image!r}: expected REPOSITORY:TAG or REPOSITORY@sha256:<64 hex digits> (pin by digest for "
            "reproducible runs)"
        )
    return image


def runtime_image() -> str:
    """The container image every component runs in."""
    return check_image(_get(IMAGE_ENV, DEFAULT_IMAGE))


def accelerator_type() -> str:
    """The accelerator resource training steps request (a Kubernetes extended resource name)."""
    value = _get(ACCELERATOR_TYPE_ENV, DEFAULT_ACCELERATOR_TYPE)
    if not value:
        raise SettingError(
            f"{ACCELERATOR_TYPE_ENV} is empty: name an extended resource such as nvidia.com/gpu"
        )
    return value


def accelerator_count() -> int:
    """How many accelerators each training step requests; 0 compiles CPU-only training steps."""
    return _int(ACCELERATOR_COUNT_ENV, DEFAULT_ACCELERATOR_COUNT, 0)


def evaluate_gpus() -> int:
    """Accelerators the evaluate step requests: its own count (it samples on one GPU), not the training steps'."""
    return _int(EVALUATE_GPUS_ENV, min(1, accelerator_count()), 0)


def training_timeout() -> int:
    """Seconds a training step may run before Kubernetes stops it (also torchrun's and a TrainJob's limit)."""
    return _int(TRAINING_TIMEOUT_ENV, DEFAULT_TRAINING_TIMEOUT, 1)


def gpu_node_label() -> tuple[str, str] | None:
    """The node label GPU steps select (``KEY=VALUE``); None when compiled with an empty label."""
    raw = _get(GPU_NODE_LABEL_ENV, "=".join(GPU_NODE_LABEL))
    if not raw:
        return None
    key, sep, value = raw.partition("=")
    if not sep or not _LABEL.match(key) or (value and not _LABEL.match(value)):
        raise SettingError(f"{GPU_NODE_LABEL_ENV}={raw!r}: expected KEY=VALUE (a Kubernetes label), or empty")
    return key, value


def gpu_toleration() -> dict[str, str] | None:
    """The toleration GPU steps carry for the GPU nodes' taint (``KEY[:EFFECT]``); None when empty."""
    raw = _get(GPU_TAINT_ENV, f"{GPU_TAINT_KEY}:NoSchedule")
    if not raw:
        return None
    key, _, effect = raw.partition(":")
    effect = effect or "NoSchedule"
    if not _LABEL.match(key) or effect not in EFFECTS:
        raise SettingError(
            f"{GPU_TAINT_ENV}={raw!r}: expected KEY[:EFFECT], EFFECT one of {', '.join(EFFECTS)}"
        )
    return {"key": key, "operator": "Exists", "effect": effect}


def shm_size() -> str:
    """The size limit of the memory-backed /dev/shm of GPU steps (it counts against their memory limit)."""
    return _quantity(_get(SHM_SIZE_ENV, DEFAULT_SHM_SIZE), SHM_SIZE_ENV)


def step_resources(step_class: str) -> Resources:
    """CPU and memory requests and limits of one class of step (see :data:`DEFAULT_RESOURCES`)."""
    table = parse_resources(_get(RESOURCES_ENV, ""))
    if step_class not in table:
        raise SettingError(f"unknown step class {step_class!r}; one of {', '.join(STEP_CLASSES)}")
    return table[step_class]


def trainjob_launchers() -> bool:
    """Whether training steps are compiled as TrainJob launchers: no GPUs, small pods that submit and wait."""
    return _flag(TRAINJOB_LAUNCHERS_ENV)


def s3_secret() -> str:
    """Name of the Kubernetes Secret holding the S3 credentials."""
    return _get(S3_SECRET_ENV, DEFAULT_S3_SECRET)


def s3_secret_keys() -> dict[str, str]:
    """Secret key -> environment variable, from ``KEY=ENV,KEY=ENV`` (default: the AWS variable names)."""
    raw = _get(S3_SECRET_KEYS_ENV, "")
    if not raw:
        return dict(DEFAULT_S3_SECRET_KEYS)
    mapping = {}
    for item in raw.split(","):
        key, sep, env = item.partition("=")
        if not sep or not key.strip() or not env.strip():
            raise SettingError(f"{S3_SECRET_KEYS_ENV}: expected KEY=ENV[,KEY=ENV], got {raw!r}")
        mapping[key.strip()] = env.strip()
    return mapping


def hf_token_secret() -> str:
    """The Secret whose ``HF_TOKEN`` key every step gets (optional: gated models only); '' for none."""
    return _get(HF_TOKEN_SECRET_ENV, DEFAULT_HF_TOKEN_SECRET)


def offline() -> bool:
    """Whether steps must not reach the Hugging Face hub (air-gapped clusters: models by s3:// or in the image)."""
    return _flag(OFFLINE_SWITCH_ENV)


@dataclass(frozen=True)
class Setting:
    """One compile-time setting: its variable, the ``preftune compile`` flag and its value as the pod sees it."""

    env: str
    flag: str
    help: str
    value: Callable[[], Any]
    switch: bool = False  # a flag without a value (sets 1)

    @property
    def dest(self) -> str:
        """The flag's attribute name in argparse's namespace."""
        return self.flag.lstrip("-").replace("-", "_")

    def text(self) -> str:
        """The effective value as the environment variable's text (defaults filled in)."""
        value = self.value()
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, tuple):
            return "=".join(value)
        if isinstance(value, dict) and "operator" in value:
            return f"{value['key']}:{value['effect']}"
        if isinstance(value, dict):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return "" if value is None else str(value)


def _resources_text() -> str:
    table = parse_resources(_get(RESOURCES_ENV, ""))
    return ";".join(f"{name}:{resources.text()}" for name, resources in table.items())


SETTINGS = (
    Setting(
        IMAGE_ENV,
        "--image",
        f"runtime image, REPO:TAG or REPO@sha256:DIGEST (default {DEFAULT_IMAGE})",
        runtime_image,
    ),
    Setting(
        ACCELERATOR_TYPE_ENV,
        "--accelerator-type",
        f"accelerator resource GPU steps request (default {DEFAULT_ACCELERATOR_TYPE})",
        accelerator_type,
    ),
    Setting(
        ACCELERATOR_COUNT_ENV,
        "--accelerator-count",
        f"accelerators per training step, 0 for CPU only (default {DEFAULT_ACCELERATOR_COUNT})",
        accelerator_count,
    ),
    Setting(
        EVALUATE_GPUS_ENV,
        "--evaluate-gpus",
        "accelerators of the evaluate step (default 1; 0 when --accelerator-count is 0)",
        evaluate_gpus,
    ),
    Setting(
        TRAINING_TIMEOUT_ENV,
        "--training-timeout",
        f"seconds a training step, its torchrun or its TrainJob may run (default {DEFAULT_TRAINING_TIMEOUT})",
        training_timeout,
    ),
    Setting(
        GPU_NODE_LABEL_ENV,
        "--gpu-node-label",
        "KEY=VALUE node label GPU steps select; '' for none (default preftune.dev/pool=gpu)",
        gpu_node_label,
    ),
    Setting(
        GPU_TAINT_ENV,
        "--gpu-taint",
        "KEY[:EFFECT] taint of the GPU nodes, tolerated by GPU steps; '' for none (default nvidia.com/gpu:NoSchedule)",
        gpu_toleration,
    ),
    Setting(
        SHM_SIZE_ENV,
        "--shm-size",
        f"size limit of the memory-backed /dev/shm of GPU steps (default {DEFAULT_SHM_SIZE})",
        shm_size,
    ),
    Setting(
        RESOURCES_ENV,
        "--resources",
        "CPU and memory per step class: CLASS:cpu=REQ[/LIMIT],memory=REQ[/LIMIT][;...], CLASS one of "
        + ", ".join(STEP_CLASSES),
        _resources_text,
    ),
    Setting(
        TRAINJOB_LAUNCHERS_ENV,
        "--trainjob-launchers",
        "compile training steps as TrainJob launchers (no GPUs), for multi-node runs (num_nodes > 1)",
        trainjob_launchers,
        switch=True,
    ),
    Setting(
        S3_SECRET_ENV,
        "--s3-secret",
        f"Secret with the S3 credentials (default {DEFAULT_S3_SECRET})",
        s3_secret,
    ),
    Setting(
        S3_SECRET_KEYS_ENV,
        "--s3-secret-keys",
        "which Secret keys become which variables: KEY=ENV[,KEY=ENV] (default the AWS names)",
        s3_secret_keys,
    ),
    Setting(
        HF_TOKEN_SECRET_ENV,
        "--hf-token-secret",
        f"Secret whose HF_TOKEN key every step gets, for gated models; '' for none (default {DEFAULT_HF_TOKEN_SECRET})",
        hf_token_secret,
    ),
    Setting(
        OFFLINE_SWITCH_ENV,
        "--offline",
        "steps never reach the Hugging Face hub (air-gapped clusters)",
        offline,
        switch=True,
    ),
)


def compiled_environment() -> dict[str, str]:
    """Every compile-time setting as the environment variable a step's pod gets, with its effective value."""
    return {setting.env: setting.text() for setting in SETTINGS}
