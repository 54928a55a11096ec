"""Where the components run: the runtime image and the accelerators that training steps request.

These are compile-time settings. They are read from the environment when the component modules are imported,
so ``preftune compile --image ... --accelerator-type ...`` sets them before importing the components.
"""

from __future__ import annotations

import os

DEFAULT_IMAGE = "ghcr.io/preftune/preftune:0.1.0"
DEFAULT_ACCELERATOR_TYPE = "nvidia.com/gpu"
DEFAULT_ACCELERATOR_COUNT = 1

IMAGE_ENV = "PREFTUNE_IMAGE"
ACCELERATOR_TYPE_ENV = "PREFTUNE_ACCELERATOR_TYPE"
ACCELERATOR_COUNT_ENV = "PREFTUNE_ACCELERATOR_COUNT"


def runtime_image() -> str:
    """The container image every component runs in."""
    return os.environ.get(IMAGE_ENV, DEFAULT_IMAGE)


def accelerator_type() -> str:
    """The accelerator resource training steps request (a Kubernetes extended resource name)."""
    return os.environ.get(ACCELERATOR_TYPE_ENV, DEFAULT_ACCELERATOR_TYPE)


def accelerator_count() -> int:
    """How many accelerators each training step requests; 0 compiles CPU-only training steps."""
    raw = os.environ.get(ACCELERATOR_COUNT_ENV, str(DEFAULT_ACCELERATOR_COUNT))
    try:
        count = int(raw)
    except ValueError:
        raise ValueError(f"{ACCELERATOR_COUNT_ENV}={raw!r} is not an integer") from None
    if count < 0:
        raise ValueError(f"{ACCELERATOR_COUNT_ENV} must be >= 0, got {count}")
    return count


S3_SECRET_ENV = "PREFTUNE_S3_SECRET"
S3_SECRET_KEYS_ENV = "PREFTUNE_S3_SECRET_KEYS"
DEFAULT_S3_SECRET = "preftune-s3"
#: Keys of the S3 credentials Secret -> environment variables boto3 reads.
DEFAULT_S3_SECRET_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
S3_CONFIG_MAP = "preftune-s3-config"
GPU_NODE_LABEL = ("preftune.dev/pool", "gpu")
GPU_TAINT_KEY = "nvidia.com/gpu"
TRAINING_TIMEOUT_ENV = "PREFTUNE_TRAINING_TIMEOUT"
DEFAULT_TRAINING_TIMEOUT = 24 * 3600


def s3_secret() -> str:
    """Name of the Kubernetes Secret holding the S3 credentials."""
    return os.environ.get(S3_SECRET_ENV, DEFAULT_S3_SECRET)


def s3_secret_keys() -> dict[str, str]:
    """Secret key -> environment variable, from ``KEY=ENV,KEY=ENV`` (default: the AWS variable names)."""
    raw = os.environ.get(S3_SECRET_KEYS_ENV, "").strip()
    if not raw:
        return dict(DEFAULT_S3_SECRET_KEYS)
    mapping = {}
    for item in raw.split(","):
        key, sep, env = item.partition("=")
        if not sep or not key.strip() or not env.strip():
            raise ValueError(f"{S3_SECRET_KEYS_ENV}: expected KEY=ENV[,KEY=ENV], got {raw!r}")
        mapping[key.strip()] = env.strip()
    return mapping


def training_timeout() -> int:
    """Seconds a training step may run before Kubernetes stops it."""
    raw = os.environ.get(TRAINING_TIMEOUT_ENV, str(DEFAULT_TRAINING_TIMEOUT))
    try:
        seconds = int(raw)
    except ValueError:
        raise ValueError(f"{TRAINING_TIMEOUT_ENV}={raw!r} is not an integer") from None
    if seconds <= 0:
        raise ValueError(f"{TRAINING_TIMEOUT_ENV} must be positive, got {seconds}")
    return seconds
