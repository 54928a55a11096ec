"""The transformers backend: ``model.generate`` on the module being trained, with explicit sampling settings.

Speed options (:class:`preftune.config.generation.GenerationOptions`), each measured side by side in
``benchmarks/rollout.py``:

- ``kv_cache`` static: the cache is allocated once at prompt + ``max_new_tokens`` instead of growing per token;
- ``compile_decode``: ``torch.compile`` of the one-token decode step (transformers' own compiled forward, which
  it uses with a static cache; on CPU it must be asked for explicitly);
- ``length_bucketing``: with more prompts than one batch, prompts are sorted by length before being cut into
  batches, so each batch pads to its own longest prompt; answers come back in the prompts' order.

Sampled log-probabilities are recorded on request by a logits processor that sees each step's raw logits (before
temperature and top-p, which transformers applies after every custom processor) and keeps only the sampled
token's ``log_softmax(logits / temperature)``: one ``(batch, vocab)`` tensor alive at a time, never the whole
``(batch, new tokens, vocab)`` scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import CompileConfig, GenerationConfig, LogitsProcessor, LogitsProcessorList

from preftune.config.generation import GenerationOptions
from preftune.model.generation.base import Samples, SamplingSettings, cut_at_stop

#: Every generation setting that can change which tokens are drawn, at its neutral value. A GenerationConfig
#: leaves a setting it does not name to the model's generation_config.json, so each is named here.
NEUTRAL: dict[str, Any] = {
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "min_new_tokens": 0,  # takes precedence over any min_length
    "max_length": None,
    "num_beams": 1,
    "num_beam_groups": 1,
    "num_return_sequences": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "use_cache": True,
    "stop_strings": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
}


def generation_config(
    *, max_new_tokens: int, temperature: float, top_p: float, eos_ids: list[int], pad_id: int
) -> GenerationConfig:
    """Explicit sampling settings: only ``temperature``, ``top_p``, the length and the stop tokens act.

    Every other setting that could reshape the distribution is at its neutral value (:data:`NEUTRAL`), and
    :func:`generate` hides the model's own generation_config.json while sampling, so nothing of it leaks in.
    """
    values = {k: v for k, v in NEUTRAL.items() if hasattr(GenerationConfig(), k)}
    values.update(max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id)
    if temperature == 0:
        return GenerationConfig(do_sample=False, **{**values, "top_p": None})
    return GenerationConfig(do_sample=True, **{**values, "temperature": temperature, "top_p": top_p})


def with_speed_options(config: GenerationConfig, options: GenerationOptions) -> GenerationConfig:
    """``config`` with the static cache and the compiled decode step when ``options`` ask for them."""
    if options.kv_cache == "static" or options.compile_decode:
        config.cache_implementation = "static"
    if options.compile_decode:
        # "default": reduce-overhead means CUDA graphs, which a CPU has not; transformers compiles the decode
        # step only on accelerators unless told otherwise.
        compile_config = CompileConfig(mode="default", dynamic=None)
        compile_config._compile_all_devices = True
        config.compile_config = compile_config
    else:
        config.disable_compile = True
    return config


def _generating_model(model: Any) -> Any:
    """The transformers model whose ``generation_config`` ``generate`` reads (under PEFT and DDP wrappers)."""
    for _ in range(8):
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            break
    return model


@contextmanager
def _blank_generation_config(model: Any) -> Iterator[None]:
    inner = _generating_model(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    logits_processor: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """``model.generate`` with ``config`` alone in force: the model's generation_config.json (min_p,
    suppress_tokens, sequence_bias, forced_eos_token_id, ...) is hidden while it samples."""
    extra = {} if logits_processor is None else {"logits_processor": logits_processor}
    with _blank_generation_config(model):
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra
        )


class SampledLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits / temperature)`` of each sampled token; leaves the scores untouched.

    Called once per step with the sequence so far: the token sampled at the previous step is its last column, so
    the previous step's log-probs are gathered then and only the current step's are kept.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.steps: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(self.pending.gather(-1, input_ids[:, -1:])[:, 0])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """``(B, R)`` log-probs of ``generated`` (the new tokens), steps past its length dropped."""
        length = generated.shape[1]
        if len(self.steps) < length and self.pending is not None:
            self.steps.append(self.pending.gather(-1, generated[:, len(self.steps), None])[:, 0])
        self.pending = None
        if length == 0:
            return torch.zeros(generated.shape, dtype=torch.float32)
        return torch.stack(self.steps[:length], dim=1).cpu()


def batch_order(lengths: Sequence[int], size: int, bucketing: bool) -> list[list[int]]:
    """Indices of each generate batch: in order, or (bucketing, more than one batch) sorted by length."""
    indices = list(range(len(lengths)))
    if bucketing and len(indices) > size:
        indices.sort(key=lambda i: lengths[i])
    return [indices[s : s + size] for s in range(0, len(indices), size)]


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` left-padded to their longest (every prompt ends where generation starts) and the mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[j, width - len(row) :] = 1
    return ids, mask


class TransformersBackend:
    """``model.generate`` on the given module: its weights are the trained ones, so ``sync`` copies nothing.

    ``generate_fn`` is the call that samples one padded batch, ``(model, input_ids, attention_mask, config)``
    (and ``logits_processor=`` when log-probs are recorded); the default is :func:`generate`.
    """

    name = "transformers"

    def __init__(
        self, model: Any, options: GenerationOptions, generate_fn: Callable[..., torch.Tensor] | None = None
    ) -> None:
        self.model, self.options = model, options
        self.generate_fn = generate_fn or generate

    def sync(self, model: Any) -> None:
        self.model = model

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[list[int]], settings: SamplingSettings, *, logprobs: bool = False
    ) -> Samples:
        config = with_speed_options(
            generation_config(
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                eos_ids=list(settings.eos_ids),
                pad_id=settings.pad_id,
            ),
            self.options,
        )
        device = next(self.model.parameters()).device
        stops = set(settings.eos_ids)
        tokens: list[list[int]] = [[] for _ in prompts]
        ended, logps = [False] * len(prompts), [[] for _ in prompts]
        self.model.eval()
        lengths = [len(p) for p in prompts]
        for batch in batch_order(lengths, settings.batch_size, self.options.length_bucketing):
            ids, mask = left_padded([prompts[i] for i in batch], settings.pad_id)
            if logprobs:
                recorder = SampledLogprobs(settings.temperature)
                out = self.generate_fn(
                    self.model, ids.to(device), mask.to(device), config, logits_processor=[recorder]
                )
                drawn = recorder.finish(out[:, ids.shape[1] :]).tolist()
            else:
                out = self.generate_fn(self.model, ids.to(device), mask.to(device), config)
            for j, (i, row) in enumerate(zip(batch, out[:, ids.shape[1] :].cpu().tolist(), strict=True)):
                tokens[i], ended[i] = cut_at_stop(row, stops)
                if logprobs:
                    logps[i] = drawn[j][: len(tokens[i])]
        return Samples(tokens=tokens, ended=ended, logprobs=logps if logprobs else None)
