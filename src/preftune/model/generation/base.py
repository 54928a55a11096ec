"""What every generation backend takes and gives back: token ids in, answers (and optionally their sampled
log-probabilities) out, so the trainers never see which engine drew them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class NeedsVLLM(RuntimeError):
    """The vllm backend was asked for where vLLM is not installed (or cannot start)."""


@dataclass(frozen=True)
class SamplingSettings:
    """Explicit sampling settings: only these act (every other processor is neutral), in every backend."""

    max_new_tokens: int
    temperature: float
    top_p: float
    eos_ids: tuple[int, ...]
    pad_id: int
    batch_size: int = 32  # prompts per generate call (transformers; vLLM schedules its own batches)


@dataclass
class Samples:
    """One answer per prompt, in the prompts' order.

    ``tokens`` runs up to and including the first stop token (or ``max_new_tokens`` tokens without one);
    ``logprobs``, when asked for, holds each of those tokens' log-probability under the sampling distribution
    (the model's logits divided by the temperature, before top-p), as the scoring pass computes it.
    """

    tokens: list[list[int]]
    ended: list[bool]
    logprobs: list[list[float]] | None = None


class GenerationBackend(Protocol):
    """Samples answers with the current weights of a policy."""

    name: str

    def sync(self, model: Any) -> None:
        """Make the next ``generate`` sample with ``model``'s current weights."""

    def generate(
        self, prompts: Sequence[list[int]], settings: SamplingSettings, *, logprobs: bool = False
    ) -> Samples:
        """One answer per prompt (token ids, no padding); draws from torch's (or the engine's) seeded stream."""

    def close(self) -> None:
        """Free what the backend holds (vLLM: the engine and its KV cache)."""


def cut_at_stop(row: Sequence[int], stops: set[int]) -> tuple[list[int], bool]:
    """``row`` up to and including its first stop token, and whether it had one."""
    end = next((k for k, token in enumerate(row) if token in stops), None)
    return (list(row), False) if end is None else (list(row[: end + 1]), True)
