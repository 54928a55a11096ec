"""Critic-free policy optimisation and unpaired preference objectives, free of models and data.

Each formula is checked against arithmetic done by hand (tests/test_policy_losses.py) and against TRL's trainers on
the same inputs (tests/test_new_trainers_parity.py). Per-token tensors are ``(sequences, response_length)`` with
``mask`` 1 on the response tokens (up to and including the first eos), as in PPO (preftune.model.losses). A
*group* is the ``group_size`` answers sampled for one prompt, stored next to each other: rows ``[g * K, (g + 1) *
K)`` of a flat ``(groups * K,)`` tensor.

- **GRPO** (Shao et al. 2024, "DeepSeekMath"): the advantage of an answer is its reward minus the mean reward of
  its group, divided by the group's standard deviation; the clipped ratio is per token and the loss is averaged
  over each answer's tokens, then over answers.
- **Dr. GRPO** (Liu et al. 2025, "Understanding R1-Zero-Like Training"): the same without the division by the
  standard deviation (which favours groups that are nearly all right or all wrong) and with the per-answer
  length normalisation replaced by one constant, ``max_new_tokens`` (which otherwise rewards long wrong answers).
- **RLOO** (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): the baseline of an answer is the mean
  reward of the *other* answers of its group, an unbiased baseline; the whole answer is one action, so the ratio
  is the sequence's (the sum of its token log-ratios).
- **KL to the reference**, either as a loss term (Schulman's k3 estimator per token, ``exp(ref - logp) - (ref -
  logp) - 1``, never negative, as GRPO does) or as a reward penalty (the sequence's summed log-ratio ``sum(logp -
  ref)`` times the coefficient taken off its reward before the advantages, as RLOO and PPO do).
- **KTO** (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"): desirable and
  undesirable answers are scored apart against a reference point ``z0``, the policy's KL to the reference
  estimated on mismatched (prompt, answer) pairs.
- **Online DPO** (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xiong et al. 2024):
  each prompt's sampled answers, ranked by a judge, give one pair: the best answer over the worst.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from preftune.model.losses import masked_mean

RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["sequence_mean", "constant_length"]

#: Added to a group's standard deviation before dividing (TRL's value; keeps a group of equal rewards at 0).
STD_EPS = 1e-4


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """A flat ``(groups * K,)`` tensor as ``(groups, K)``, refusing what is not whole groups of at least two."""
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 answers per prompt, got group_size={group_size}")
    if values.dim() != 1 or values.numel() % group_size:
        raise ValueError(f"{tuple(values.shape)} values do not split into groups of {group_size}")
    return values.float().view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True) -> torch.Tensor:
    """GRPO's advantages: ``(r - mean(group)) / (std(group) + 1e-4)``; Dr. GRPO's with ``scale=False``: ``r -
    mean(group)``. The standard deviation is the unbiased one (divided by K - 1). Returns ``(groups * K,)``."""
    grouped = _groups(rewards, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + STD_EPS)
    return advantages.reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages: ``r_i - mean(r_j for the other j of the group)``. Returns ``(groups * K,)``."""
    grouped = _groups(rewards, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``exp(ref - logp) - (ref - logp) - 1`` (Schulman's k3:
    unbiased on samples of the policy, never negative). Gradients flow through ``logprobs``."""
    delta = ref_logprobs.float() - logprobs.float()
    return torch.exp(delta) - delta - 1.0


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's summed log-ratio ``sum(logp - ref)`` over its tokens ``(sequences,)``, detached: the KL
    estimate a reward penalty subtracts (k1, as PPO's shaped reward and RLOO use it)."""
    return ((logprobs.detach().float() - ref_logprobs.detach().float()) * mask.float()).sum(dim=-1)


@dataclass
class PolicyLoss:
    """A minibatch's loss and its detached statistics.

    ``clip_fraction``: share of ratios (tokens, or sequences at the sequence level) in the clipped region, where
    the gradient is cut; ``approx_kl``: KL(old || new) per token as the masked mean of ``(ratio - 1) - log
    ratio``; ``kl``: mean per-token k3 KL to the reference (0 when no reference was given).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    kl: torch.Tensor


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation, max_length: int | None):
    if aggregation == "sequence_mean":
        return (masked_mean(per_token, mask, dim=-1)).mean()
    if aggregation == "constant_length":
        if not max_length:
            raise ValueError(
                "the constant_length aggregation needs max_length (the longest response allowed)"
            )
        return (per_token * mask).sum() / (per_token.shape[0] * max_length)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected sequence_mean or constant_length")


def _combine(
    values: torch.Tensor,
    mask: torch.Tensor,
    level: RatioLevel,
    aggregation: Aggregation,
    max_length: int | None,
) -> torch.Tensor:
    """A minibatch's mean loss: at the sequence level per-sequence values (per-token ones summed per sequence
    first) averaged over sequences; at the token level by ``aggregation``."""
    if level == "sequence":
        return (values if values.dim() == 1 else values.sum(dim=-1)).mean()
    return _aggregate(values, mask, aggregation, max_length)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    level: RatioLevel = "token",
    aggregation: Aggregation = "sequence_mean",
    max_length: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> PolicyLoss:
    """The clipped policy-ratio loss of GRPO, Dr. GRPO and RLOO, with an optional KL-to-reference loss term.

    ``ratio = exp(logp - old)`` per token (``level="token"``), or per sequence from the summed log-ratio of its
    tokens (``level="sequence"``); the loss is ``-min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)``
    with ``A`` the sequence's advantage ``(sequences,)``. Token-level losses are averaged per sequence and then over
    sequences (``sequence_mean``, GRPO) or summed and divided by ``sequences * max_length`` (``constant_length``,
    Dr. GRPO); sequence-level losses are averaged over sequences. With ``ref_logprobs`` and ``kl_coef > 0``,
    ``kl_coef * k3`` is added per token and aggregated like the policy term (at the sequence level: summed over a
    sequence's tokens, then averaged over sequences).
    """
    if clip_low <= 0 or (clip_high is not None and clip_high <= 0):
        raise ValueError(f"clip ranges must be positive, got {clip_low} and {clip_high}")
    if level not in ("token", "sequence"):
        raise ValueError(f"unknown ratio level {level!r}; expected token or sequence")
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.float()
    token_log_ratio = (logprobs.float() - old_logprobs.float()) * mask
    if level == "sequence":
        log_ratio, advantages = token_log_ratio.sum(dim=-1), advantages.float()
    else:
        log_ratio, advantages = token_log_ratio, advantages.float().unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_item = -torch.minimum(ratio * advantages, clipped * advantages)
    policy_loss = _combine(per_item, mask, level, aggregation, max_length)
    kl_tokens = torch.zeros_like(mask) if ref_logprobs is None else k3_kl(logprobs, ref_logprobs) * mask
    kl_loss = _combine(kl_tokens, mask, level, aggregation, max_length)
    loss = policy_loss + kl_coef * kl_loss if kl_coef else policy_loss
    with torch.no_grad():
        region = ((ratio < 1.0 - clip_low) & (advantages < 0)) | (
            (ratio > 1.0 + clip_high) & (advantages > 0)
        )
        share = region.float().mean() if level == "sequence" else masked_mean(region.float(), mask)
        approx_kl = masked_mean(torch.exp(token_log_ratio) - 1.0 - token_log_ratio, mask)
        kl = masked_mean(kl_tokens, mask)
    return PolicyLoss(loss, policy_loss.detach(), kl_loss.detach(), share, approx_kl, kl)


# ---------------------------------------------------------------------------------------------------------- KTO

#: A reduce hook: the mean of a scalar over every process (e.g. ``lambda t: accelerator.reduce(t, "mean")``).
ReduceMean = Callable[[torch.Tensor], torch.Tensor]


def mismatched_order(n: int) -> list[int]:
    """For a batch of ``n`` examples, which answer each prompt is paired with to estimate KTO's reference point:
    the previous example's (``[n - 1, 0, 1, ..., n - 2]``), so no prompt meets its own answer when ``n >= 2``."""
    if n < 1:
        raise ValueError("an empty batch has no mismatched pairs")
    return [n - 1, *range(n - 1)]


def kto_reference_point(
    kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, reduce: ReduceMean | None = None
) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log ref(y'|x)))`` over mismatched pairs (x, y'),
    detached (the paper passes no gradient through it). ``reduce`` averages the batch means of every process."""
    mean = (kl_logps.detach().float() - ref_kl_logps.detach().float()).mean()
    if reduce is not None:
        mean = reduce(mean)
    return mean.clamp(min=0.0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses and implicit rewards.

    With ``r = logp - ref`` (sequence log-probabilities) and ``z0`` the reference point:
    desirable ``lambda_D * (1 - sigmoid(beta * (r - z0)))``, undesirable ``lambda_U * (1 - sigmoid(beta * (z0 -
    r)))``. The paper advises ``lambda_D * n_D / (lambda_U * n_U)`` in ``[1, 4/3]`` for ``n_D`` desirable and
    ``n_U`` undesirable examples. Returns ``(losses, rewards)``, each ``(batch,)``; ``rewards = beta * r``
    (detached). The batch loss is ``losses.mean()``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    desirable = desirable.bool()
    logratio = logps.float() - ref_logps.float()
    z0 = torch.as_tensor(reference_point, dtype=torch.float32, device=logratio.device)
    gain = torch.where(desirable, logratio - z0, z0 - logratio)
    weight = torch.where(
        desirable,
        torch.full_like(logratio, desirable_weight),
        torch.full_like(logratio, undesirable_weight),
    )
    losses = weight * (1.0 - F.sigmoid(beta * gain))
    return losses, beta * logratio.detach()


# --------------------------------------------------------------------------------------------------- online DPO


def best_worst_pairs(scores: torch.Tensor, group_size: int, *, min_gap: float = 0.0) -> list[tuple[int, int]]:
    """One preference pair per group of ranked answers: ``(best, worst)`` as flat indices into ``scores``.

    The best answer is the group's highest score, the worst its lowest (the first one on a tie). A group whose
    best and worst differ by ``min_gap`` or less gives no pair: the judge cannot tell them apart.
    """
    grouped = _groups(scores, group_size)
    pairs = []
    for g, row in enumerate(grouped.tolist()):
        best = max(range(group_size), key=lambda k: (row[k], -k))
        worst = min(range(group_size), key=lambda k: (row[k], k))
        if row[best] - row[worst] > min_gap:
            pairs.append((g * group_size + best, g * group_size + worst))
    return pairs


# --------------------------------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class Estimator:
    """What distinguishes GRPO, Dr. GRPO and RLOO: how an answer's advantage is made from its group's rewards,
    whether the ratio is per token or per answer, and how token losses are averaged."""

    advantages: Callable[[torch.Tensor, int], torch.Tensor]
    level: RatioLevel
    aggregation: Aggregation


def _dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    return group_advantages(rewards, group_size, scale=False)


#: The critic-free estimators by name (the ``estimator`` setting of preftune.config.grpo).
ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(group_advantages, "token", "sequence_mean"),
    "dr_grpo": Estimator(_dr_grpo_advantages, "token", "constant_length"),
    "rloo": Estimator(leave_one_out_advantages, "sequence", "sequence_mean"),
}
