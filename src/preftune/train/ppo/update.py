"""Step 4 of a PPO iteration: ``ppo_epochs`` passes over shuffled minibatches of the rollouts, each step
minimising the clipped policy loss + ``vf_coef`` x the clipped value loss, with an early stop on the approximate
KL and a stop (the step not applied) on a non-finite loss or gradient. Forwards run under the run's autocast,
backwards outside it."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.config.ppo import PPOConfig
from preftune.model.losses import ppo_policy_loss, ppo_value_loss
from preftune.train.engine import checked_gradient_groups, finite_everywhere, step_optimizers
from preftune.train.loop import Meter
from preftune.train.packed import scored_logprobs
from preftune.train.ppo.advantages import Advantages
from preftune.train.ppo.models import response_values
from preftune.train.ppo.rollout import Rollout


@dataclass
class ActorCritic:
    """What the update trains: the policy and the critic (as accelerate prepared them), their optimisers, their
    trainable weights (clipping need not walk the frozen ones on every step), and whether the policy's LM head
    can run on the scored positions only."""

    policy: Any
    critic: Any
    policy_optimizer: Any
    critic_optimizer: Any
    policy_params: list[torch.nn.Parameter]
    critic_params: list[torch.nn.Parameter]
    fused_head: bool


@dataclass
class UpdateResult:
    """What one iteration's update did: its logged means, the steps applied, whether it stopped early (on
    ``max_approx_kl`` or a non-finite loss, whose value is then ``nonfinite``), and each step's clip fraction."""

    meter: Meter = field(default_factory=Meter)
    steps: int = 0
    stopped: bool = False
    nonfinite: float | None = None
    what: str = "loss"  # what was not finite: the loss, or the gradient norm (the loss being finite)
    clip_fractions: list[float] = field(default_factory=list)


@dataclass
class _Targets:
    """The rollout's per-token tensors flattened from ``(B, R)``: a packed minibatch reads its scored tokens'
    entries through ``batch["flat"]``."""

    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo_update(
    models: ActorCritic,
    rollout: Rollout,
    shaped: Advantages,
    config: PPOConfig,
    accelerator: Any,
    pad: int,
    autocast: Any = nullcontext,
) -> UpdateResult:
    """Update the policy and the critic on one iteration's rollouts (see the module docstring)."""
    result = UpdateResult()
    n = rollout.query_ids.shape[0]
    mini = max(1, config.mini_batch_size // accelerator.num_processes)
    targets = _Targets(
        rollout.logprobs.view(-1),
        rollout.values.view(-1),
        shaped.advantages.reshape(-1),
        shaped.returns.reshape(-1),
    )
    models.policy.train()
    models.critic.train()
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n).tolist()
        for start in range(0, n, mini):
            batch = rollout.packed(order[start : start + mini], pad, config.pack_length)
            if not _step(models, batch, targets, config, accelerator, result, autocast):
                break
        if result.stopped:
            break
    return result


def _step(
    models: ActorCritic,
    batch: dict[str, torch.Tensor],
    targets: _Targets,
    config: PPOConfig,
    accelerator: Any,
    result: UpdateResult,
    autocast: Any = nullcontext,
) -> bool:
    """One minibatch step; False when the iteration's updates stop here (this step is then not applied)."""
    index = batch["flat"]
    tokens = torch.ones_like(index, dtype=torch.float32)
    with autocast():
        new_logprobs = scored_logprobs(
            models.policy, batch, fused_head=models.fused_head, temperature=config.temperature
        )
        policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
            new_logprobs, targets.logprobs[index], targets.advantages[index], tokens, config.clip_range
        )
    mean_kl = float(accelerator.reduce(approx_kl.detach(), "mean"))
    if config.max_approx_kl > 0 and mean_kl > config.max_approx_kl:
        result.stopped = True
        result.meter.add(approx_kl=mean_kl)
        return False
    with autocast():
        new_values = response_values(models.critic, batch)
        value_loss, value_clip = ppo_value_loss(
            new_values, targets.values[index], targets.returns[index], tokens, config.clip_range_value
        )
        loss = policy_loss + config.vf_coef * value_loss
    if not finite_everywhere(loss, accelerator):
        result.nonfinite, result.stopped = float(loss.detach()), True
        return False
    accelerator.backward(loss)
    norms = checked_gradient_groups(
        accelerator, [models.policy_params, models.critic_params], config.max_grad_norm
    )
    if any(norm is not None for norm in norms):
        models.policy_optimizer.zero_grad()
        models.critic_optimizer.zero_grad()
        bad = next(norm for norm in norms if norm is not None)
        result.nonfinite, result.what, result.stopped = bad, "gradient norm", True
        return False
    step_optimizers(accelerator, [models.policy_optimizer, models.critic_optimizer])
    models.policy_optimizer.zero_grad()
    models.critic_optimizer.zero_grad()
    result.steps += 1
    result.meter.add(
        policy_loss=float(policy_loss.detach()),
        value_loss=float(value_loss.detach()),
        clip_fraction=float(clip_fraction),
        value_clip_fraction=float(value_clip),
        approx_kl=mean_kl,
    )
    result.clip_fractions.append(float(clip_fraction))
    return True
