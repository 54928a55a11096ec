"""Settings of the evaluate step."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import generation, shared
from preftune.config.fields import check, param


@dataclass
class EvalConfig:
    """Settings of one evaluation run; it checks itself on construction."""

    max_new_tokens: int = param(48, "Longest generated response, in tokens.", low=1)
    temperature: float = param(
        0.7,
        "Sampling temperature of the displayed generations (0 = greedy), the same for every model.",
        low=0,
    )
    top_p: float = param(
        0.9,
        "Nucleus sampling threshold of the displayed generations (1 = off).",
        low=0,
        high=1,
        low_inclusive=False,
    )
    seed: int = param(
        0, "Sampling seed; every model samples with it, so differences come from the models.", low=0
    )
    beta: float = param(
        0.1,
        "The DPO beta scaling the implicit rewards on the held-out preference pairs.",
        low=0,
        low_inclusive=False,
    )
    max_prompts: int = param(64, "Evaluate at most this many held-out prompts.", low=1)
    batch_size: int = param(16, "Prompts (or sequences) per forward / generate batch.", low=1)
    max_length: int = param(
        256,
        "Longest prompt + answer in tokens when scoring held-out pairs and judging responses, truncated as "
        "training truncates (the pipelines pass the training steps' max_length).",
        low=2,
    )
    generation_backend: str = generation.backend()
    kv_cache: str = generation.kv_cache()
    compile_decode: bool = generation.compile_decode()
    length_bucketing: bool = generation.length_bucketing()
    vllm_gpu_memory_utilization: float = generation.vllm_gpu_memory_utilization()
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    select_snapshot: bool = param(
        True,
        "Choose the candidate among the final policy and the training snapshots: the best held-out judge reward "
        "(else judge reward, else held-out implicit-reward accuracy) inside max_kl, min_diversity_ratio and "
        "min_judge_confirmation; the gate and promote then use it. False evaluates the final policy only.",
    )
    max_kl: float = shared.max_kl()
    min_diversity_ratio: float = shared.min_diversity_ratio()
    min_judge_confirmation: float = shared.min_judge_confirmation()

    def __post_init__(self) -> None:
        validate(self)


def validate(config: EvalConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    generation.validate(config)
