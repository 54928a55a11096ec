"""Hand-written training objectives.

Kept free of models and data so each formula can be checked against arithmetic done by hand
(tests/test_losses.py). Conventions:

- ``logits[:, t]`` is the model's distribution for ``labels[:, t]``: callers shift once (``logits[:, :-1]``
  against ``input_ids[:, 1:]``) before calling, so every function here works on aligned tensors.
- Log-probabilities are summed over the completion tokens of a sequence (``mask`` is 1 there, 0 on prompt and
  padding), the sequence-level log-likelihood that DPO's derivation uses.

The Bradley-Terry reward-model loss and the PPO losses belong here too, next to DPO.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under its logits, shape ``labels.shape``, in float32.

    Computed as ``logit[label] - logsumexp(logits)`` one sequence at a time, so no full-vocabulary
    log-softmax tensor is kept: for a 128k vocabulary a batch's log-softmax copy would cost as much memory as
    the logits themselves. Half-precision logits are upcast per row, because logsumexp in bf16 loses the
    small differences DPO depends on. Labels outside the vocabulary (e.g. -100) give 0 here; mask them.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    safe = labels.clamp(min=0).unsqueeze(-1)
    rows = []
    for row_logits, row_labels in zip(logits, safe, strict=True):
        row_logits = row_logits.float()
        picked = torch.gather(row_logits, -1, row_labels).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    out = torch.stack(rows)
    return out.masked_fill(labels < 0, 0.0)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the label log-probabilities over the tokens where ``mask`` is 1, one value per sequence.

    Args:
        logits: ``(batch, length, vocab)``, already aligned with ``labels`` (position t predicts label t).
        labels: ``(batch, length)`` token ids.
        mask: ``(batch, length)``, 1 on completion tokens, 0 on prompt and padding.

    Returns:
        ``(batch,)`` float32 tensor of summed log-probabilities.
    """
    if mask.shape != labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match labels {tuple(labels.shape)}")
    return (token_logprobs(logits, labels) * mask.to(torch.float32)).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses and the implicit rewards.

    With ``h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`` (sequence log-probabilities):

    - ``sigmoid`` (DPO, Rafailov et al. 2023), with conservative label smoothing ``eps`` for noisy labels:
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``.
    - ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta)) ** 2``; regresses the log-ratio gap to a fixed target
      instead of pushing it to infinity, which resists overfitting deterministic preferences.
    - ``hinge`` (SLiC, Zhao et al. 2023): ``relu(1 - beta * h)``.

    The implicit rewards are ``beta * (log pi - log ref)`` for each answer (reported for all loss types, as
    they show whether the policy prefers chosen answers more than the reference does).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``(batch,)``; rewards are detached.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
