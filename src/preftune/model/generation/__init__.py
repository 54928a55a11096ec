"""Generation backends: one interface in front of whatever samples the policy's answers.

PPO, GRPO / RLOO, online DPO and evaluate sample through a :class:`GenerationBackend`; which one is a setting
(``generation_backend``, :mod:`preftune.config.generation`), never a code path of their own.

- ``transformers`` (:mod:`.transformers_backend`): ``model.generate`` on the training process's own module, so
  the weights it samples with are always the ones being trained and ``sync`` has nothing to copy. Its speed
  options (static KV cache, ``torch.compile`` of the decode step, batching by length) are measured side by side
  in ``benchmarks/rollout.py``; the defaults are the fastest that keep sampled log-probs equal to the scoring
  pass within 1e-5 in fp32.
- ``vllm`` (:mod:`.vllm_backend`): a vLLM engine in the same process, on the same device (colocated, as TRL's
  colocate mode and OpenRLHF's hybrid engine run it), started once from the SFT model's directory. Before each
  round of sampling the trainer calls ``sync(policy)``:

  * LoRA policy: the adapter alone is hot-loaded. It is saved (safetensors, a few MB) to a fresh folder and
    handed to vLLM as a new ``LoRARequest`` id, which vLLM loads on the next ``generate`` and evicts the old one
    (``max_loras=1``). The base weights never move; the reference (adapter off) is the engine's base model.
  * Full fine-tuning: every weight is pushed into the engine's model in place (``load_weights`` with the
    policy's ``named_parameters``, vLLM's ``reload_weights``) and the prefix cache reset, so the KV blocks of the old weights are never
    reused.

  vLLM reports each sampled token's log-probability (``logprobs_mode="processed_logprobs"``: after
  temperature, as the PPO ratio needs); the trainers still score every sample with their own forward pass, so
  the two engines' numerics never mix in a loss. Without vLLM installed the backend refuses with
  :class:`NeedsVLLM`, saying what to install.

Each stage builds its backend once per run from its config with :mod:`.stage`, whose docstring is the design of
the hand-off: refused before anything loads where vLLM is missing, one engine per run, the weights every round.
"""

from __future__ import annotations

from typing import Any

from preftune.config.generation import GenerationOptions
from preftune.model.generation.base import GenerationBackend, NeedsVLLM, Samples, SamplingSettings

__all__ = ["GenerationBackend", "NeedsVLLM", "Samples", "SamplingSettings", "make_backend"]


def make_backend(
    model: Any, options: GenerationOptions, *, model_dir: str = "", **vllm: Any
) -> GenerationBackend:
    """The backend ``options.backend`` names, for ``model`` (the module being trained or evaluated).

    ``model_dir`` is where vLLM loads the base weights from (the SFT model); ``vllm`` holds its engine options
    (``max_model_len``, ``dtype``, ``seed``, ``enable_lora``, ``max_lora_rank``).
    """
    if options.backend == "vllm":
        from preftune.model.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, options, **vllm)
    from preftune.model.generation.transformers_backend import TransformersBackend

    return TransformersBackend(model, options)
