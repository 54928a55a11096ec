"""How a stage computes and holds its weights: the ``precision`` setting turned into dtypes and autocast.

One rule for every stage: trainable weights are fp32 master weights whatever the checkpoint's dtype (a bf16
AdamW update of 5e-7 rounds away on most weights); frozen weights are held in the compute dtype, which saves
memory under bf16 / fp16; the forward runs under autocast in that dtype. ``fp32`` computes and holds everything
in fp32, which is what the bundled CPU demo runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from preftune.config.fields import PRECISION_CHOICES

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: accelerate's spelling of each precision (its ``mixed_precision`` argument and environment variable).
_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_FROM_ACCELERATE = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``fp32``, ``bf16`` or ``fp16``."""

    name: str

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype matrix multiplications run in (and frozen weights are held in)."""
        return _DTYPES[self.name]

    @property
    def frozen_dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def mixed(self) -> bool:
        """True when the forward runs under half-precision autocast."""
        return self.name != "fp32"

    @property
    def accelerate(self) -> str:
        """accelerate's ``mixed_precision`` value for this precision."""
        return _ACCELERATE[self.name]

    def autocast(self, device: torch.device | str) -> Any:
        """A context running ops in the compute dtype on ``device`` (nothing to do in fp32)."""
        if not self.mixed:
            return nullcontext()
        device_type = torch.device(device).type
        return torch.autocast(device_type=device_type, dtype=self.compute_dtype)


def resolve_precision(value: str) -> Precision:
    """Turn a config value (``auto``, ``fp32``, ``bf16``, ``fp16``; the older ``no`` = fp32) into a Precision.

    ``auto`` follows ``ACCELERATE_MIXED_PRECISION`` when it is set (accelerate launchers set it), else bf16 on a
    CUDA device that supports it and fp32 otherwise (CPU, older GPUs).
    """
    if value == "no":
        return Precision("fp32")
    if value not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {value!r}")
    if value != "auto":
        return Precision(value)
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
    if env in _FROM_ACCELERATE:
        return Precision(_FROM_ACCELERATE[env])
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return Precision("bf16")
    return Precision("fp32")


def precision_of(config: Any) -> Precision:
    """The precision a stage's config asks for (its ``precision`` field, or the older ``mixed_precision``)."""
    value = getattr(config, "precision", None)
    if value is None:
        value = getattr(config, "mixed_precision", "auto")
    return resolve_precision(value)


def fp32_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Hold every trainable parameter in fp32 (a no-op for those that already are): the master weights."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def trainable_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes of the trainable parameters (``{torch.float32}`` for every model a stage trains)."""
    return {p.dtype for p in model.parameters() if p.requires_grad}


@contextmanager
def no_autocast(device: torch.device | str) -> Iterator[None]:
    """Run a block with autocast off (explicit dtypes inside), whatever the caller's context."""
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        yield
