"""A sampling stage's generation backend, built from its config once per run (PPO, GRPO / RLOO, online DPO and
evaluate), so the choice of engine and its speed options is a setting, never a stage's own code path.

The vLLM weight hand-off, the design every sampling stage follows (the engine's side: :mod:`.vllm_backend`):

1. **Refused early.** ``generation_backend="vllm"`` where vLLM is not installed stops the stage with
   :class:`NeedsVLLM` right after its config is validated, before any prompt, reward or model is loaded
   (:func:`require_backend`): the error comes in seconds, not after minutes of loading.
2. **One engine per run.** After the policy is loaded the stage builds its backend once (:func:`stage_backend`).
   The engine starts from the full weights the policy starts from: the SFT model's directory (evaluate: the
   reference's). An artifact that is an adapter chain is merged once into a temporary directory (weights,
   config, tokenizer; removed when the backend closes): the trained LoRA adapter sits on the merged weights,
   not on the chain's base. Context: the longest prompt plus ``max_new_tokens``; dtype: the precision's compute
   dtype; LoRA enabled exactly when the policy is a LoRA model, ``max_lora_rank`` its rank rounded up to one vLLM
   serves.
3. **The weights handed over every round.** The stages sample only through ``generate_rollout`` (PPO, GRPO /
   RLOO, online DPO) or ``generate_responses`` (evaluate), which call ``backend.sync(policy)`` right before each
   round of sampling, so the engine samples with the weights of the last update: a LoRA policy's adapter alone
   is saved and hot-loaded as a new ``LoRARequest`` (a few MB; the base weights never move, and the engine's base
   model is the reference, as the policy with its adapter off is); full weights are pushed into the engine in
   place and its prefix cache reset. Evaluate syncs each policy it measures (reference, snapshots, final: merged
   models of one architecture and tokenizer) into its one engine in turn; the champion, whose architecture and
   tokenizer may differ, gets an engine of its own once the first is closed.
4. **Closed at the end** of the run, failed runs included (``finally``), freeing the engine and its KV cache.

The transformers backend takes the same path with nothing to hand over: its ``sync`` points it at the module.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.config.generation import options_of
from preftune.model import modeling
from preftune.model.generation import GenerationBackend, make_backend
from preftune.model.generation.transformers_backend import TransformersBackend
from preftune.model.generation.vllm_backend import is_peft, require_vllm, unwrapped
from preftune.model.precision import resolve_precision


def require_backend(config: Any) -> None:
    """Refuse a run whose generation backend cannot start here (vllm without vLLM: :class:`NeedsVLLM`)."""
    if options_of(config).backend == "vllm":
        require_vllm()


def lora_rank(rank: int) -> int:
    """The smallest LoRA rank vLLM serves that holds ``rank`` (it takes 8, 16, 32, ... only)."""
    served = 8
    while served < rank:
        served *= 2
    return served


def engine_directory(ref: str, workdir: Path, *, trust_remote_code: bool = False) -> str:
    """Where vLLM loads ``ref``'s full weights from: ``ref`` itself, or an adapter chain merged into ``workdir``."""
    path = modeling.resolve(ref)
    if not (Path(path).is_dir() and modeling.is_adapter(path)):
        return path
    merged = modeling.load_causal_lm(path, trust_remote_code=trust_remote_code)
    merged.save_pretrained(str(workdir), safe_serialization=True)
    modeling.load_tokenizer(path, trust_remote_code=trust_remote_code).save_pretrained(str(workdir))
    return str(workdir)


def engine_options(model: Any, config: Any, max_model_len: int) -> dict[str, Any]:
    """The vLLM engine's options for ``model`` (the policy) under ``config``."""
    dtype = resolve_precision(getattr(config, "precision", "auto")).compute_dtype
    options: dict[str, Any] = {
        "max_model_len": max_model_len,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": int(getattr(config, "seed", 0)),
        "enable_lora": is_peft(unwrapped(model)),
    }
    if options["enable_lora"]:
        options["max_lora_rank"] = lora_rank(int(getattr(config, "lora_r", 16)))
    return options


def stage_backend(
    model: Any,
    config: Any,
    *,
    model_ref: str,
    max_model_len: int,
    generate_fn: Callable[..., Any] | None = None,
) -> GenerationBackend:
    """The backend ``config``'s generation settings name, for ``model``: the transformers backend with the speed
    options (``generate_fn``: its per-batch call, a test seam), or a vLLM engine started from ``model_ref``'s
    weights (see the module docstring). Close it when the run ends."""
    options = options_of(config)
    if options.backend != "vllm":
        return TransformersBackend(model, options, generate_fn=generate_fn)
    require_vllm()
    if not model_ref:
        raise ValueError(
            "the vllm backend starts from the policy's starting weights: build it once per run with model_ref "
            "(the SFT model) and pass it to every round of sampling"
        )
    workdir = Path(tempfile.mkdtemp(prefix="preftune-vllm-base-"))
    try:
        trust = bool(getattr(config, "trust_remote_code", False))
        model_dir = engine_directory(model_ref, workdir, trust_remote_code=trust)
        return make_backend(
            model,
            options,
            model_dir=model_dir,
            owned_dir=str(workdir),
            **engine_options(model, config, max_model_len),
        )
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
