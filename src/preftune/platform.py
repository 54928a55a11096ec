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
