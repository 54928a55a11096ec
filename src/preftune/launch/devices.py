"""The GPUs a step was given and the ones torch can use, and refusing to train when they disagree.

A pod with a GPU limit whose torch sees no GPU (a node driver too old for the image's CUDA build, a device
plugin that mounted nothing, the CPU image on a GPU node) would otherwise train on the CPU without a word, for
hours, on an expensive node. ``pipelines/cluster.py`` compiles each step's GPU count into its pod as
``PREFTUNE_STEP_GPUS``; in a Kubernetes pod a step with GPUs and none visible fails at once, naming why.
Outside Kubernetes (kfp.local, a laptop) the compiled count is not a promise and nothing is checked.
"""

from __future__ import annotations

import os

from preftune.launch import platform

STEP_GPUS_ENV = "PREFTUNE_STEP_GPUS"


class GPUUnavailable(RuntimeError):
    """The step's pod was given GPUs but torch cannot use any of them."""


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def in_kubernetes() -> bool:
    """Whether this process runs in a Kubernetes pod (the kubelet sets the service host in every container)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def expected_gpus() -> int:
    """GPUs this step's pod was compiled to request; 0 outside a Kubernetes pod."""
    if not in_kubernetes():
        return 0
    raw = os.environ.get(STEP_GPUS_ENV, "0").strip() or "0"
    return int(raw) if raw.isdigit() else 0


def _why(torch_cuda: str | None) -> str:
    if not torch_cuda:
        return "this torch is a CPU-only build: the step runs the CPU image on a GPU node; compile with the CUDA image"
    return (
        f"this torch is built for CUDA {torch_cuda}: the node's NVIDIA driver may be too old for it (it needs a "
        "driver supporting that CUDA version), or the NVIDIA device plugin / container toolkit did not give the "
        "container its GPUs (check NVIDIA_VISIBLE_DEVICES and the node's driver)"
    )


def check_gpus(visible: int | None = None) -> int:
    """Fail when the step's pod has GPUs but torch sees none; returns the GPUs torch sees."""
    expected = expected_gpus()
    if expected == 0:
        return visible_gpus() if visible is None else visible
    visible = visible_gpus() if visible is None else visible
    if visible == 0:
        import torch

        raise GPUUnavailable(
            f"this step's pod has {expected} GPU(s) ({platform.accelerator_type()}) but torch "
            f"{torch.__version__} sees none; {_why(torch.version.cuda)}. Refusing to train on the CPU instead."
        )
    return visible
