"""The update of a GRPO / RLOO iteration: ``update_epochs`` passes over shuffled minibatches of the iteration's
answers, each step minimising the clipped policy-ratio loss (with the KL term when it acts in the loss), and a stop
(the step not applied) on a non-finite loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.model.policy_losses import Estimator, clipped_policy_loss
from preftune.train.engine import finite_everywhere
from preftune.train.loop import Meter
from preftune.train.packed import scored_logprobs
from preftune.train.ppo.rollout import Rollout


@dataclass
class TrainedPolicy:
    """The policy as accelerate prepared it, its optimiser, its trainable weights (what clipping walks) and
    whether its LM head can run on the scored positions only."""

    model: Any
    optimizer: Any
    params: list[torch.nn.Parameter]
    fused_head: bool


@dataclass
class UpdateResult:
    """What one iteration's update did: its logged means, the steps applied, the non-finite loss that stopped
    it (None when none did) and each step's clip fraction."""

    meter: Meter = field(default_factory=Meter)
    steps: int = 0
    nonfinite: float | None = None
    clip_fractions: list[float] = field(default_factory=list)


def minibatch_logprobs(
    policy: TrainedPolicy, rollout: Rollout, rows: list[int], pad: int, config: Any
) -> torch.Tensor:
    """The current policy's log-probabilities of the sampled tokens of ``rows``, ``(len(rows), R)`` with
    gradients (0 after each answer's end), from one packed forward at the sampling temperature."""
    batch = rollout.packed(rows, pad, config.pack_length)
    token = scored_logprobs(policy.model, batch, fused_head=policy.fused_head, temperature=config.temperature)
    out = torch.zeros(len(rows), rollout.response_ids.shape[1], dtype=torch.float32, device=token.device)
    return out.index_put((batch["target_segment"], batch["target_pos"]), token)


@dataclass
class IterationData:
    """What one iteration's update trains on: its answers, their advantages, the estimator (ratio level and
    averaging), the KL coefficient, and the run's settings."""

    rollout: Rollout
    advantages: torch.Tensor
    estimator: Estimator
    kl_coef: float
    config: Any
    pad: int


def group_update(policy: TrainedPolicy, data: IterationData, accelerator: Any) -> UpdateResult:
    """Update the policy on one iteration's answers (see the module docstring); ``data.kl_coef`` weights the KL
    term when ``config.kl_penalty`` is ``loss`` (with ``reward`` it is already in the advantages)."""
    result = UpdateResult()
    n = data.rollout.response_ids.shape[0]
    mini = max(1, data.config.mini_batch_size // accelerator.num_processes)
    policy.model.train()
    for _ in range(data.config.update_epochs):
        order = torch.randperm(n).tolist()
        for start in range(0, n, mini):
            if not _step(policy, data, order[start : start + mini], accelerator, result):
                return result
    return result


def _step(
    policy: TrainedPolicy, data: IterationData, rows: list[int], accelerator: Any, result: UpdateResult
) -> bool:
    """One minibatch step; False when a non-finite loss stops the update (that step is then not applied)."""
    config, rollout = data.config, data.rollout
    index = torch.tensor(rows, device=data.advantages.device)
    in_loss = config.kl_penalty == "loss"
    out = clipped_policy_loss(
        minibatch_logprobs(policy, rollout, rows, data.pad, config),
        rollout.logprobs[index],
        data.advantages[index],
        rollout.response_mask[index],
        clip_low=config.clip_range,
        clip_high=config.clip_range_high,
        level=data.estimator.level,
        aggregation=data.estimator.aggregation,
        max_length=config.max_new_tokens,
        ref_logprobs=rollout.ref_logprobs[index] if in_loss else None,
        kl_coef=data.kl_coef if in_loss else 0.0,
    )
    if not finite_everywhere(out.loss, accelerator):
        result.nonfinite = float(out.loss.detach())
        return False
    accelerator.backward(out.loss)
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(policy.params, config.max_grad_norm)
    policy.optimizer.step()
    policy.optimizer.zero_grad()
    result.steps += 1
    stats = torch.stack([out.policy_loss, out.kl_loss, out.clip_fraction, out.approx_kl, out.loss.detach()])
    policy_loss, kl_loss, clip_fraction, approx_kl, loss = accelerator.reduce(stats, "mean").tolist()
    result.meter.add(
        loss=loss, policy_loss=policy_loss, kl_loss=kl_loss, clip_fraction=clip_fraction, approx_kl=approx_kl
    )
    result.clip_fractions.append(clip_fraction)
    return True
