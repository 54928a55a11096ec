"""Steps 1 and 2 of a PPO iteration: sample one response per prompt, then score every sampled token (policy and
reference log-probs, entropy, critic values) and every response (the reward model's score)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.config.ppo import PPOConfig
from preftune.model.generation import GenerationBackend, SamplingSettings
from preftune.model.generation.stage import stage_backend
from preftune.model.losses import head_dtype
from preftune.model.sampling import generate
from preftune.model.templating import completion_ids, pad_id, turn_frame
from preftune.train.batching import FIRST_ANSWER, PROMPT, pack_documents
from preftune.train.packed import fused_head_weight, packed_call, scored_hidden
from preftune.train.ppo.models import TokenValueModel, adapter_off, is_peft, response_values, token_values
from preftune.train.ppo.prompts import Messages


@dataclass
class Rollout:
    """One iteration's samples and everything PPO needs about them; per-token tensors are ``(B, R)``."""

    query_ids: torch.Tensor  # (B, P) left-padded rendered prompts
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) sampled tokens, padded after the first eos
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first eos
    prompts: list[Messages]
    texts: list[str]
    ended: torch.Tensor  # (B,) True where the response ended with eos
    prompt_tokens: list[list[int]] = field(default_factory=list)  # each prompt's ids, unpadded
    response_tokens: list[list[int]] = field(default_factory=list)  # each response up to its first eos
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    sampled_logprobs: torch.Tensor | None = None  # (B, R) as the sampler computed them, when asked for

    def packed(self, rows: list[int], pad: int, pack_length: int) -> dict[str, torch.Tensor]:
        """The sequences ``rows`` (prompt + response, unpadded) packed by ``batching.pack_documents``; every
        response token is scored. ``flat`` indexes each scored token in the flattened ``(B, R)`` tensors."""
        docs = [
            [(self.prompt_tokens[r], PROMPT, -1), (self.response_tokens[r], FIRST_ANSWER, k)]
            for k, r in enumerate(rows)
        ]
        batch = pack_documents(docs, pad, pack_length)
        width = self.response_ids.shape[1]
        batch["flat"] = (
            torch.tensor(rows, dtype=torch.long)[batch["target_segment"]] * width + batch["target_pos"]
        )
        device = self.response_ids.device
        return {k: v.to(device) for k, v in batch.items()}


def _logprobs_and_entropy(
    model: Any, batch: dict[str, torch.Tensor], temperature: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the sampled tokens of a packed batch under the sampling distribution
    (logits / ``temperature``), no gradients; the LM head runs on response positions only, in chunks."""
    targets = batch["target_ids"]
    if fused:
        hidden, weight = scored_hidden(model, batch), fused_head_weight(model)
    else:
        call = packed_call(model, batch)
        out = call.unflatten(model(**call.inputs, use_cache=False).logits)
        hidden, weight = out[batch["target_row"], batch["target_src"]], None
    logps, ents = [], []
    dtype = head_dtype(hidden, weight) if weight is not None else hidden.dtype
    for start in range(0, hidden.shape[0], _HEAD_CHUNK):
        chunk = hidden[start : start + _HEAD_CHUNK]
        logits = chunk.to(dtype) @ weight.to(dtype).t() if weight is not None else chunk
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logps.append(logp.gather(-1, targets[start : start + _HEAD_CHUNK, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(logps), torch.cat(ents)


#: Scored positions whose vocabulary logits exist at once in the no-grad scoring pass.
_HEAD_CHUNK = 1024


def _scatter(flat: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=values.device)
    out[flat] = values.float()
    return out.view(shape)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _generate(*args: Any, **kwargs: Any) -> torch.Tensor:
    # looked up at call time, so a test can stand in for this module's ``generate``
    return generate(*args, **kwargs)


def rollout_backend(policy: Any, config: Any, model_ref: str = "") -> GenerationBackend:
    """The backend of the stage's generation options, built once per run: the transformers backend with the speed
    options, or (``generation_backend`` vllm) a vLLM engine started from ``model_ref``, the SFT model the policy
    starts from, whose weights ``generate_rollout`` hands over each round (``preftune.model.generation.stage``)."""
    return stage_backend(
        policy,
        config,
        model_ref=model_ref,
        max_model_len=config.max_prompt_length + config.max_new_tokens,
        generate_fn=_generate,
    )


def sampling_settings(config: Any, eos_ids: list[int], pad: int) -> SamplingSettings:
    return SamplingSettings(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        eos_ids=tuple(eos_ids),
        pad_id=pad,
        batch_size=config.forward_batch_size,
    )


@torch.no_grad()
def generate_rollout(
    policy: Any,
    tokenizer: Any,
    prompts: list[Messages],
    prompt_ids: list[list[int]],
    config: PPOConfig,
    eos_ids: list[int],
    device: torch.device,
    *,
    backend: GenerationBackend | None = None,
    logprobs: bool = False,
) -> Rollout:
    """Sample one response per prompt with the policy (KV cache, left padding, stop at eos) through ``backend``
    (default: the transformers backend with the config's generation options), synced to the policy first.

    ``logprobs``: keep each sampled token's log-prob as the sampler computed it (``Rollout.sampled_logprobs``),
    for checking it against the scoring pass."""
    pad = pad_id(tokenizer)
    backend = backend or rollout_backend(policy, config)
    backend.sync(policy)
    samples = backend.generate(prompt_ids, sampling_settings(config, eos_ids, pad), logprobs=logprobs)
    width = max(len(ids) for ids in prompt_ids)
    query = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    for i, ids in enumerate(prompt_ids):
        query[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        query_mask[i, width - len(ids) :] = 1
    length = max(len(row) for row in samples.tokens)
    response = torch.full((len(prompt_ids), length), pad, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    sampled = torch.zeros(response.shape, dtype=torch.float32) if logprobs else None
    for i, row in enumerate(samples.tokens):
        response[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        response_mask[i, : len(row)] = 1
        if sampled is not None:
            sampled[i, : len(row)] = torch.tensor(samples.logprobs[i], dtype=torch.float32)
    bodies = [row[:-1] if ended else row for row, ended in zip(samples.tokens, samples.ended, strict=True)]
    return Rollout(
        query_ids=query.to(device),
        query_mask=query_mask.to(device),
        response_ids=response.to(device),
        response_mask=response_mask.to(device),
        prompts=prompts,
        texts=[tokenizer.decode(b, skip_special_tokens=True) for b in bodies],
        ended=torch.tensor(samples.ended, dtype=torch.bool, device=device),
        prompt_tokens=[list(ids) for ids in prompt_ids],
        response_tokens=[list(row) for row in samples.tokens],
        sampled_logprobs=None if sampled is None else sampled.to(device),
    )


@torch.no_grad()
def score_responses(
    reward: TokenValueModel,
    tokenizer: Any,
    prompts: list[Messages],
    texts: list[str],
    batch_size: int,
    device: torch.device,
    *,
    pack_length: int = 256,
) -> torch.Tensor:
    """The reward model's score of each response, on its training input: the prompt and the response rendered
    as an assistant turn by the chat template (preftune.model.templating), as reward-model training reads them.

    The score head is read where a transformers sequence classifier pools, and so where the reward model was
    trained to score: the last token whose id differs from the model's ``config.pad_token_id`` (the closing eos
    when pad and eos differ, else the last response token). ``reward`` must be in its frozen state (adapter
    disabled) when this is called. ``batch_size`` sequences at a time are packed into rows of up to
    ``pack_length`` tokens (``batching.pack_documents``; 0 = one per row).
    """
    pad = pad_id(tokenizer)
    inner = reward.model.get_base_model() if is_peft(reward.model) else reward.model
    pool_pad = getattr(inner.config, "pad_token_id", None)
    rows, reads = [], []
    for messages, text in zip(prompts, texts, strict=True):
        frame = turn_frame(tokenizer, messages)
        prompt_ids = tokenizer(frame.prompt, add_special_tokens=False)["input_ids"]
        row = list(prompt_ids) + completion_ids(tokenizer, messages, text, frame)
        rows.append(row)
        reads.append(max((k for k, token in enumerate(row) if token != pool_pad), default=len(row) - 1))
    scores = []
    for part in _chunks(len(rows), batch_size):
        batch = pack_documents([[(row, PROMPT, -1)] for row in rows[part]], pad, pack_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        values = token_values(reward, batch)
        read = batch["doc_start"] + torch.tensor(reads[part], device=device)
        scores.append(values[batch["doc_row"], read])
    return torch.cat(scores)


@torch.no_grad()
def policy_logprobs(rollout: Rollout, policy: Any, tokenizer: Any, config: Any) -> torch.Tensor:
    """``(B, R)`` log-probs of the sampled tokens under ``policy`` exactly as the scoring pass computes them
    (packed rows, LM head on response positions, at the sampling temperature): what a sampler's own log-probs
    (``generate_rollout(logprobs=True)``) are checked against."""
    n, pad = rollout.query_ids.shape[0], pad_id(tokenizer)
    fused = fused_head_weight(policy) is not None
    policy.eval()
    flat, logprobs = [], []
    for part in _chunks(n, config.forward_batch_size):
        batch = rollout.packed(list(range(n))[part], pad, config.pack_length)
        flat.append(batch["flat"])
        logprobs.append(_logprobs_and_entropy(policy, batch, config.temperature, fused)[0])
    return _scatter(torch.cat(flat), torch.cat(logprobs), rollout.response_ids.shape)


@torch.no_grad()
def score_rollout(
    rollout: Rollout,
    policy: Any,
    reference: Any,
    critic: Any,
    reward: Any,
    tokenizer: Any,
    config: PPOConfig,
) -> None:
    """Fill in the rollout's old and reference log-probs, entropy, values and scores (no gradients).

    Each chunk of ``forward_batch_size`` sequences is packed once (no padding) and goes through the policy, the
    reference and the critic; the LM heads run on response positions only.
    """
    device = rollout.query_ids.device
    n = rollout.query_ids.shape[0]
    pad = pad_id(tokenizer)
    shape = rollout.response_ids.shape
    flat, logprobs, ref_logprobs, values, entropy = [], [], [], [], []
    policy.eval()
    critic.eval()
    ref_model = policy if reference is None else reference
    fused, ref_fused = fused_head_weight(policy) is not None, fused_head_weight(ref_model) is not None
    for part in _chunks(n, config.forward_batch_size):
        batch = rollout.packed(list(range(n))[part], pad, config.pack_length)
        flat.append(batch["flat"])
        lp, ent = _logprobs_and_entropy(policy, batch, config.temperature, fused)
        logprobs.append(lp)
        entropy.append(ent)
        with adapter_off(policy) if reference is None else nullcontext():
            # the policy's arithmetic: before any update the two agree bit for bit (KL exactly 0)
            ref_logprobs.append(_logprobs_and_entropy(ref_model, batch, config.temperature, ref_fused)[0])
        values.append(response_values(critic, batch))
    index = torch.cat(flat)
    rollout.logprobs = _scatter(index, torch.cat(logprobs), shape)
    rollout.ref_logprobs = _scatter(index, torch.cat(ref_logprobs), shape)
    rollout.entropy = _scatter(index, torch.cat(entropy), shape)
    rollout.values = _scatter(index, torch.cat(values), shape)
    scorer = critic if reward is None else reward
    with adapter_off(critic) if reward is None else nullcontext():
        scores = score_responses(
            scorer,
            tokenizer,
            rollout.prompts,
            rollout.texts,
            config.forward_batch_size,
            device,
            pack_length=config.pack_length,
        )
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
    if config.score_clip is not None:
        scores = scores.clamp(-config.score_clip, config.score_clip)
    rollout.scores = scores


def count_rollout(state: Any, seconds: float, rollout: Rollout) -> int:
    """Add a rollout's generation time and sampled tokens to a run's state (``rollout_seconds``,
    ``rollout_tokens``: PPO's, GRPO's and online DPO's); returns the tokens it holds (prompt + answers, no
    padding)."""
    state.rollout_seconds += seconds
    state.rollout_tokens += int(rollout.response_mask.sum())
    return int(rollout.query_mask.sum() + rollout.response_mask.sum())
