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

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from preftune.config.dpo import DPO_LOSS_TYPES

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


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


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the LM head's matmul runs in: autocast's when it is on (as the model's own head would run),
    else the wider of the two inputs' dtypes, so fp32 hidden states never meet bf16 weights in one matmul."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _HeadLogprobs(torch.autograd.Function):
    """``log softmax(hidden @ weight.T)[target]`` per row, never holding more than one chunk of vocabulary logits.

    Forward keeps only ``hidden``, ``weight`` and the targets; backward recomputes each chunk's logits and turns
    ``d logp / d logits = onehot - softmax`` (scaled by the incoming per-row gradient) into the gradients of
    ``hidden`` and ``weight``. Costs one extra head matmul, saves the ``(rows, vocab)`` logits of the graph.
    Both matmuls run in the dtype chosen at forward (:func:`head_dtype`; backward runs outside autocast), the
    weight's gradient is accumulated in fp32, and each gradient comes back in its input's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):  # type: ignore[override]
        dtype = head_dtype(hidden, weight)
        w = weight.to(dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[start : start + chunk_size].to(dtype) @ w.t()).float()
            picked = logits.gather(-1, targets[start : start + chunk_size].unsqueeze(-1)).squeeze(-1)
            out[start : start + chunk_size] = picked - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = ctx.dtype
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size].to(dtype)
            g = grad_out[start : start + ctx.chunk_size].float()
            d_logits = torch.softmax((h @ w.t()).float(), dim=-1).mul_(-g.unsqueeze(-1))
            rows = torch.arange(h.shape[0], device=h.device)
            d_logits[rows, targets[start : start + ctx.chunk_size]] += g
            d_logits = d_logits.to(dtype)
            if need_h:
                grad_h[start : start + ctx.chunk_size] = d_logits @ w
            if need_w:
                grad_w += (d_logits.t() @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


def head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Log-probability of each target token from final hidden states and the LM head's weight, in float32.

    Args:
        hidden: ``(rows, hidden_size)`` final (normed) hidden states of the positions that predict ``targets``.
        weight: ``(vocab, hidden_size)`` output-embedding matrix (a bias-free LM head, as in Llama-style models).
        targets: ``(rows,)`` token ids.
        chunk_size: rows whose logits exist at once, forward and backward.

    Equal to ``token_logprobs(hidden @ weight.T, targets)``, but only the rows that are scored go through the
    head and at most ``chunk_size`` rows of vocabulary logits exist at any time, in the graph or out of it.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return _HeadLogprobs.apply(hidden, weight, targets, chunk_size)


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


# ------------------------------------------------------------------------------------------------ reward model


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pair Bradley-Terry loss of a reward model: ``-log sigmoid(r_chosen - r_rejected - margin)``.

    Under the Bradley-Terry model ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``; this is its negative
    log-likelihood. ``margin`` (one value per pair, >= 0) is how much better the data says the chosen answer is
    (a rank gap, a normalised score difference, a severity): it is subtracted inside the sigmoid, as in Llama 2's
    margin loss (Touvron et al. 2023), so pairs marked as clearly different must be separated by at least that
    much reward before their loss gets small. ``None`` means no margin; NaN entries (pairs without one) count
    as 0. Computed in float32 whatever the dtype of the rewards.

    Returns:
        ``(batch,)`` float32 tensor of losses (take ``.mean()`` for the batch loss).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen rewards {tuple(chosen_rewards.shape)} do not match rejected {tuple(rejected_rewards.shape)}"
        )
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=torch.float32, device=diff.device)
        if margin.shape != diff.shape:
            raise ValueError(f"margin {tuple(margin.shape)} does not match rewards {tuple(diff.shape)}")
        diff = diff - torch.nan_to_num(margin, nan=0.0)
    return -F.logsigmoid(diff)


def reward_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-response squared error ``(predicted - target) ** 2`` of a reward model regressed on scores.

    The targets are the normalised (z-scored) human ratings carried by pairs made from scalar ratings; the mean
    of the returned tensor is the MSE. Computed in float32.
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} does not match target {tuple(target.shape)}")
    return (predicted.float() - target.float().to(predicted.device)) ** 2


# ---------------------------------------------------------------------------------------------------------- PPO
#
# PPO works on per-token tensors of shape ``(batch, response_length)``: position t is the t-th generated token,
# ``mask`` is 1 on the response tokens (up to and including the first eos) and 0 on the padding after them.
# Each row's mask is one contiguous run starting at position 0 (gae assumes it).

#: A reduce hook: sums a tensor over every process (e.g. ``lambda t: accelerator.reduce(t, "sum")``).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``); 0 where none are."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, *, reduce: Reduce | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of ``x`` over the masked positions, in float64.

    Two passes (mean first, then the squared deviations from it), each a sum that ``reduce`` may add up over
    every process, so a multi-GPU run whitens with the moments of the whole rollout batch, not of one shard.
    """
    x64, m64 = x.detach().double(), mask.double()
    totals = torch.stack([(x64 * m64).sum(), m64.sum()])
    if reduce is not None:
        totals = reduce(totals)
    count = totals[1]
    if count < 1:
        raise ValueError("masked_moments: the mask selects no position")
    mean = totals[0] / count
    squares = (((x64 - mean) * m64) ** 2).sum()
    if reduce is not None:
        squares = reduce(squares)
    var = squares / (count - 1) if count > 1 else torch.zeros_like(squares)
    return mean, var


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    *,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked positions; masked-out positions come back as 0.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as for returns. ``moments`` takes
    a precomputed ``(mean, var)``; otherwise they come from :func:`masked_moments` with ``reduce`` (see there).
    """
    mean, var = moments if moments is not None else masked_moments(x, mask, reduce=reduce)
    out = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * mask.double()).to(x.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over per-token rewards and values.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where values and
    advantages after a row's last response token are 0 (the episode ends there: bootstrap 0). ``returns = A + V``
    is the critic's regression target. Both outputs are detached and 0 where ``mask`` is 0.

    Returns:
        ``(advantages, returns)``, each of shape ``rewards.shape``.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            "must have one shape"
        )
    mask = mask.to(torch.float32)
    rewards = rewards.detach().float() * mask
    values = values.detach().float() * mask
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[..., 0])
    next_advantage = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(length)):
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[..., t]
        advantages[..., t] = next_advantage
        next_value = values[..., t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    With ``ratio = exp(logprobs - old_logprobs)``: the per-token loss is
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))``, averaged over the masked tokens.

    Returns:
        ``(loss, clip_fraction, approx_kl)``: ``clip_fraction`` is the share of tokens where the clipped term
        wins (the gradient is cut there); ``approx_kl`` estimates KL(old || new) as the masked mean of
        ``(ratio - 1) - log ratio`` (Schulman's k3 estimator: unbiased, never negative). Both are detached.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be positive, got {clip_range}")
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ``0.5 * max((V - R)^2, (V_clip - R)^2)``, averaged over the masked tokens.

    ``V_clip = V_old + clip(V - V_old, -clip_range_value, clip_range_value)`` keeps the critic from moving far
    from the values the advantages were computed with in one iteration.

    Returns:
        ``(loss, clip_fraction)``: the share of tokens where the clipped error is the larger one (detached).
    """
    if clip_range_value <= 0:
        raise ValueError(f"clip_range_value must be positive, got {clip_range_value}")
    values = values.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clip_fraction


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF's PPO: a KL penalty on every response token, the score at the last one.

    ``kl_t = logprobs_t - ref_logprobs_t`` (the sampled token's log-ratio, whose sum over a response estimates
    KL(policy || reference)); ``reward_t = -kl_coef * kl_t``, plus the reward model's ``scores[b]`` at the last
    masked position of row b. Rows whose mask is all 0 get no score. Both outputs are 0 where ``mask`` is 0.

    Returns:
        ``(rewards, kl)``, each of shape ``logprobs.shape``, detached, float32.
    """
    mask = mask.to(torch.float32)
    kl = (logprobs.detach().float() - ref_logprobs.detach().float()) * mask
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (positions * (mask > 0)).argmax(dim=-1)  # the last masked position of each row
    rows = torch.nonzero(mask.sum(dim=-1) > 0).squeeze(-1)
    rewards[rows, last[rows]] += scores.detach().float().to(rewards.device)[rows]
    return rewards, kl


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of the softmax of ``logits`` at each position, shape ``logits.shape[:-1]``, float32.

    Rows are processed ``chunk_size`` positions at a time, so at most one chunk's float32 log-softmax exists
    besides the logits themselves.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], chunk_size):
        logp = torch.log_softmax(flat[start : start + chunk_size].float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(dim=-1))
    if not parts:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    return torch.cat(parts).reshape(logits.shape[:-1])
