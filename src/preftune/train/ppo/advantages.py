"""Step 3 of a PPO iteration: the per-token shaped reward (score minus the KL penalty), GAE advantages and
returns, whitened over the whole rollout batch; and the rollout's logged statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from preftune.model.losses import gae, masked_moments, shape_rewards, whiten


@dataclass
class Advantages:
    """A rollout batch's shaped rewards, their KL part, advantages and returns, each ``(B, R)``, and the mask
    of response tokens they cover."""

    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor


def shaped_advantages(
    rollout: Any,
    kl_coef: float,
    config: Any,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Advantages:
    """Per-token reward ``-kl_coef * (log pi - log ref)`` plus the score at the last response token, then GAE
    (``config.gamma``, ``config.lam``); with ``config.whiten_advantages`` the advantages are whitened with the
    moments of every process's rollouts (``reduce`` sums over processes; None for one process)."""
    mask = rollout.response_mask.float()
    rewards, kl = shape_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    advantages, returns = gae(rewards, rollout.values, mask, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask, reduce=reduce)
    return Advantages(rewards, kl, advantages, returns, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (1 = perfect critic, <= 0 = useless)."""
    _, var_returns = masked_moments(returns, mask)
    _, var_error = masked_moments(returns - values, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - var_error / var_returns)


def rollout_stats(
    rollout: Any,
    shaped: Advantages,
    kl_coef: float,
    accelerator: Any,
    raw_scores: torch.Tensor | None = None,
) -> dict[str, float]:
    """The iteration's rollout values, as means over every process's responses: score (the reward model's own,
    ``raw_scores`` when the rollout's were normalised), shaped reward, KL to the reference (per response), entropy
    (per token), length, eos rate, and the critic's explained variance."""
    mask = shaped.mask
    stats = accelerator.gather_for_metrics(
        torch.stack(
            [
                rollout.scores if raw_scores is None else raw_scores,
                shaped.kl.sum(dim=1),
                mask.sum(dim=1),
                rollout.ended.float(),
                (rollout.entropy.sum(dim=1) / mask.sum(dim=1).clamp(min=1)),
                shaped.rewards.sum(dim=1),
            ],
            dim=1,
        )
    )
    score, kl, length, eos_rate, entropy, total_reward = stats.float().mean(dim=0).tolist()
    return {
        "score": score,
        "reward": total_reward,
        "kl": kl,
        "kl_coef": kl_coef,
        "entropy": entropy,
        "response_length": length,
        "eos_rate": eos_rate,
        "explained_variance": explained_variance(rollout.values, shaped.returns, mask),
    }
