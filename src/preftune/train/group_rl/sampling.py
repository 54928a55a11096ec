"""Models and samples of the sampling stages (GRPO / RLOO and online DPO): the policy and its reference on one copy
of the weights where LoRA allows, an optional frozen reward model, K answers per prompt, and their per-token
log-probabilities under the policy and the reference.

Sampling and scoring are PPO's (``ppo.rollout.generate_rollout`` and its packed, chunked LM-head scoring); a
group's K answers are K rows of one rollout, next to each other.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from preftune.model import modeling
from preftune.model.generation import GenerationBackend
from preftune.model.policy_losses import sequence_kl
from preftune.model.templating import pad_id
from preftune.train.group_rl.rewards import Rewards
from preftune.train.loop import disable_dropout, lora_options, model_options
from preftune.train.packed import fused_head_weight
from preftune.train.ppo.models import TokenValueModel, adapter_off
from preftune.train.ppo.prompts import Messages
from preftune.train.ppo.rollout import (
    Rollout,
    _chunks,
    _logprobs_and_entropy,
    _scatter,
    count_rollout,
    generate_rollout,
)


def load_policy(sft_model: str, config: Any) -> tuple[Any, Any | None]:
    """(policy, reference or None): with LoRA the reference is the policy with its adapter off (None here);
    without, a frozen copy of the SFT model."""
    policy = modeling.prepare_for_training(sft_model, **lora_options(config))
    reference = None
    if not config.use_lora:
        reference = modeling.load_causal_lm(
            sft_model, trust_remote_code=config.trust_remote_code, **model_options(config)
        )
        reference.requires_grad_(False)
        reference.eval()
        disable_dropout(reference)
    disable_dropout(policy)
    policy.config.use_cache = False
    return policy, reference


def load_reward(reward_model: str | None, config: Any) -> tuple[TokenValueModel | None, Any | None]:
    """The frozen reward model, read at every position (``TokenValueModel``), and its own tokenizer; (None, None)
    without one. The policy's tokenizer need not be the reward model's: answers are scored as text."""
    if not reward_model:
        return None, None
    tokenizer = modeling.load_tokenizer(reward_model, trust_remote_code=config.trust_remote_code)
    model = TokenValueModel(
        modeling.load_reward_model(
            reward_model, trust_remote_code=config.trust_remote_code, **model_options(config)
        )
    )
    model.requires_grad_(False)
    model.eval()
    disable_dropout(model)
    return model, tokenizer


@torch.no_grad()
def sample_groups(
    policy: Any,
    tokenizer: Any,
    prompts: list[Messages],
    encoded: list[list[int]],
    indices: list[int],
    config: Any,
    eos_ids: list[int],
    device: torch.device,
    *,
    backend: GenerationBackend | None = None,
) -> Rollout:
    """``config.num_generations`` answers to each prompt of ``indices``, as one rollout whose rows ``[g * K, (g
    + 1) * K)`` are prompt g's answers, drawn by ``backend`` (the run's, handed the policy's weights first;
    default: the transformers backend with the config's generation options)."""
    rows = [i for i in indices for _ in range(config.num_generations)]
    return generate_rollout(
        policy,
        tokenizer,
        [prompts[i] for i in rows],
        [encoded[i] for i in rows],
        config,
        eos_ids,
        device,
        backend=backend,
    )


@torch.no_grad()
def score_tokens(rollout: Rollout, policy: Any, reference: Any | None, tokenizer: Any, config: Any) -> None:
    """Fill in the rollout's per-token log-probabilities under the policy (``logprobs``) and the reference
    (``ref_logprobs``, with the policy's adapter off when ``reference`` is None) and the policy's entropy, at the
    sampling temperature, packed ``config.forward_batch_size`` sequences at a time."""
    n, shape, pad = rollout.query_ids.shape[0], rollout.response_ids.shape, pad_id(tokenizer)
    ref_model = policy if reference is None else reference
    fused, ref_fused = fused_head_weight(policy) is not None, fused_head_weight(ref_model) is not None
    policy.eval()
    flat, logprobs, ref_logprobs, entropy = [], [], [], []
    for part in _chunks(n, config.forward_batch_size):
        batch = rollout.packed(list(range(n))[part], pad, config.pack_length)
        flat.append(batch["flat"])
        lp, ent = _logprobs_and_entropy(policy, batch, config.temperature, fused)
        logprobs.append(lp)
        entropy.append(ent)
        with adapter_off(policy) if reference is None else nullcontext():
            ref_logprobs.append(_logprobs_and_entropy(ref_model, batch, config.temperature, ref_fused)[0])
    index = torch.cat(flat)
    rollout.logprobs = _scatter(index, torch.cat(logprobs), shape)
    rollout.ref_logprobs = _scatter(index, torch.cat(ref_logprobs), shape)
    rollout.entropy = _scatter(index, torch.cat(entropy), shape)


def group_diversity(texts: list[str], group_size: int) -> torch.Tensor:
    """Per group, the share of its answers that are distinct texts (1 = all different; 1/K = one answer
    repeated): a group of identical answers carries no signal and says the policy has collapsed there."""
    return torch.tensor(
        [len(set(texts[g : g + group_size])) / group_size for g in range(0, len(texts), group_size)],
        dtype=torch.float32,
    )


@dataclass
class SampledRound:
    """One round of sampling, scored: every process's prompt indices (in the cycler's order), this process's
    groups with their log-probs under policy and reference, their rewards and sequence KL, and the tokens they
    hold (prompt + answers, no padding)."""

    indices: torch.Tensor
    rollout: Rollout
    rewards: Rewards
    kl: torch.Tensor
    tokens: int


def sample_round(trainer: Any) -> SampledRound:
    """Draw this round's prompts, sample ``num_generations`` answers to each, and score them: the part of a round
    that GRPO / RLOO and online DPO share. ``trainer`` is either one's trainer (its config, accelerator, state,
    models, prompts and reward sources); generation time and sampled tokens are added to its state."""
    config, accelerator, state = trainer.config, trainer.accelerator, trainer.state
    indices, mine = state.cycler.draw(
        trainer.per_process, accelerator.num_processes, accelerator.process_index
    )
    policy = accelerator.unwrap_model(trainer.policy)
    began = time.perf_counter()
    rollout = sample_groups(
        policy,
        trainer.tokenizer,
        trainer.prompts,
        trainer.encoded,
        mine,
        config,
        trainer.eos_ids,
        accelerator.device,
        backend=trainer.backend,
    )
    tokens = count_rollout(state, time.perf_counter() - began, rollout)
    score_tokens(rollout, policy, trainer.reference, trainer.tokenizer, config)
    rows = [i for i in mine for _ in range(config.num_generations)]
    records = [trainer.records[i] for i in rows]
    rewards = trainer.rewards(rollout.prompts, records, rollout.texts, rollout.ended)
    rollout.scores = rewards.total
    kl = sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.response_mask)
    return SampledRound(torch.tensor(indices), rollout, rewards, kl, tokens)
