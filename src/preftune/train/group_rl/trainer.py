"""One GRPO / RLOO iteration for the engine's RL loop: ``collect`` (K answers per prompt, their rewards, the KL to
the SFT model, the group advantages; the KL blow-up check) and ``update`` (the minibatch update, then the KL
controller)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from preftune.model.generation import GenerationBackend
from preftune.model.policy_losses import ESTIMATORS
from preftune.model.sampling import eos_ids_of
from preftune.model.templating import pad_id
from preftune.train.engine import Engine, Halt, IterationTrainer
from preftune.train.group_rl.rewards import Rewards, RewardSources
from preftune.train.group_rl.sampling import group_diversity, sample_round
from preftune.train.group_rl.update import IterationData, TrainedPolicy, group_update
from preftune.train.kl_control import make_kl_controller
from preftune.train.loop import make_optimizer, trainable_parameters
from preftune.train.packed import fused_head_weight
from preftune.train.ppo.prompts import Messages, PromptCycler, prompt_text
from preftune.train.ppo.rollout import Rollout, rollout_backend
from preftune.train.ppo.state import PPOState

log = logging.getLogger(__name__)


@dataclass
class GroupExperience:
    """One iteration's answers and advantages (and what the engine's loop reads: ``ids``, ``tokens``,
    ``logged``, ``halt``)."""

    iteration: int
    ids: torch.Tensor
    tokens: int
    logged: dict[str, float]
    rollout: Rollout
    advantages: torch.Tensor
    halt: bool = False


def sample_stats(
    rollout: Rollout,
    rewards: Rewards,
    kl: torch.Tensor,
    penalised: torch.Tensor,
    group_size: int,
    accelerator: Any,
) -> dict[str, float]:
    """An iteration's values as means over every process's answers: the reward (``score``, before any KL
    penalty; ``reward``, after it), its parts, the KL to the SFT model per answer, the entropy per token, the
    length, the eos rate; and per group, the reward's spread, the share of groups whose answers all got one
    reward (no signal) and the share of distinct answers."""
    mask = rollout.response_mask.float()
    columns = {
        "score": rewards.total,
        "reward": penalised,
        "kl": kl,
        "entropy": (rollout.entropy * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1),
        "response_length": mask.sum(dim=1),
        "eos_rate": rollout.ended.float(),
    }
    if rewards.model_score is not None:
        columns["reward_model_score"] = rewards.model_score
    columns.update({f"reward/{name}": values for name, values in rewards.functions.items()})
    per_answer = accelerator.gather_for_metrics(torch.stack(list(columns.values()), dim=1))
    grouped = rewards.total.view(-1, group_size)
    spread = grouped.std(dim=1)
    per_group = torch.stack(
        [spread, (spread == 0).float(), group_diversity(rollout.texts, group_size).to(spread.device)], dim=1
    )
    per_group = accelerator.gather_for_metrics(per_group)
    out = dict(zip(columns, per_answer.float().mean(dim=0).tolist(), strict=True))
    std, zero, distinct = per_group.float().mean(dim=0).tolist()
    out.update({"reward_std": std, "zero_std_groups": zero, "distinct_answers": distinct})
    return out


class GroupRLTrainer(IterationTrainer):
    """GRPO, Dr. GRPO or RLOO (``config.estimator``) on the engine: the policy is trained; the reference (the
    policy with its adapter off, or a frozen copy) and the reward sources stay frozen."""

    def __init__(
        self,
        engine: Engine,
        policy: Any,
        reference: Any | None,
        rewards: RewardSources,
        tokenizer: Any,
        prompts: list[Messages],
        records: list[dict[str, Any]],
        encoded: list[list[int]],
        backend: GenerationBackend | None = None,
    ) -> None:
        config, accelerator = engine.config, engine.accelerator
        self.config, self.accelerator, self.tokenizer, self.rewards = config, accelerator, tokenizer, rewards
        self.prompts, self.records, self.encoded = prompts, records, encoded
        self.eos_ids, self.pad = eos_ids_of(tokenizer, policy), pad_id(tokenizer)
        optimizer = make_optimizer(policy, config.learning_rate, config.weight_decay)
        policy, optimizer = accelerator.prepare(policy, optimizer)
        self.reference = reference.to(accelerator.device) if reference is not None else None
        if rewards.model is not None:
            rewards.model.to(accelerator.device)
        self.trained = TrainedPolicy(
            policy, optimizer, trainable_parameters(policy), fused_head_weight(policy) is not None
        )
        self.policy = policy
        # built once per run (the vllm engine from the SFT model); each round of sampling hands it the weights
        self.backend = backend or rollout_backend(accelerator.unwrap_model(policy), config)
        self.modules, self.optimizers = {"policy": policy}, {"policy": optimizer}
        controller = make_kl_controller(
            config.kl_controller, config.kl_coef, config.target_kl, config.kl_horizon
        )
        self.state = PPOState(controller, PromptCycler(len(prompts), config.seed))
        self.estimator = ESTIMATORS[config.estimator]
        # each process samples its own share of the prompts (whole groups), in one seeded order for all
        self.per_process = max(1, config.prompts_per_iteration // accelerator.num_processes)

    def collect(self, iteration: int) -> GroupExperience:
        config, accelerator, state = self.config, self.accelerator, self.state
        sampled = sample_round(self)
        rollout, rewards, kl = sampled.rollout, sampled.rewards, sampled.kl
        kl_coef = state.controller.value
        penalised = rewards.total - kl_coef * kl if config.kl_penalty == "reward" else rewards.total
        advantages = self.estimator.advantages(penalised, config.num_generations)
        logged = sample_stats(rollout, rewards, kl, penalised, config.num_generations, accelerator)
        logged["kl_coef"] = kl_coef
        experience = GroupExperience(iteration, sampled.indices, sampled.tokens, logged, rollout, advantages)
        if iteration == 1 or iteration == config.iterations:
            self._keep_samples(iteration, rollout)
        if config.kl_blowup > 0 and logged["kl"] > config.kl_blowup:
            self._blow_up(experience)
        return experience

    def update(self, experience: GroupExperience) -> Halt | None:
        config, state, logged = self.config, self.state, experience.logged
        data = IterationData(
            experience.rollout,
            experience.advantages,
            self.estimator,
            state.controller.value,
            config,
            self.pad,
        )
        result = group_update(self.trained, data, self.accelerator)
        state.all_clip.extend(result.clip_fractions)
        answers = config.prompts_per_iteration * config.num_generations
        state.controller.update(logged["kl"], answers)
        logged.update(result.meter.means())
        logged["steps"] = float(result.steps)
        if result.nonfinite is None:
            return None
        logged["nonfinite_loss"] = 1.0
        return Halt(
            f"{config.estimator}: the loss is {result.nonfinite} in iteration {experience.iteration} after "
            f"{result.steps} updates (not applied)",
            "the policy before that update is saved",
            "Lower the learning rate, raise kl_coef, or clip scores (score_clip)",
        )

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {
            "score": f"{logged['score']:.3f}",
            "kl": f"{logged['kl']:.2f}",
            "len": f"{logged['response_length']:.1f}",
        }

    def _keep_samples(self, iteration: int, rollout: Rollout) -> None:
        rows = [
            {"iteration": iteration, "prompt": prompt_text(p), "response": t, "score": float(s)}
            for p, t, s in zip(rollout.prompts, rollout.texts, rollout.scores.tolist(), strict=True)
        ]
        self.state.samples[str(iteration)] = rows[: self.config.samples_shown]

    def _blow_up(self, experience: GroupExperience) -> None:
        """Stop before this iteration's update: the policy has run away from the SFT model, and further updates
        would only optimise the reward's blind spots."""
        state, iteration = self.state, experience.iteration
        state.blowups += 1
        state.blowup_note = (
            f"Training stopped at iteration {iteration}: the KL to the SFT model, {experience.logged['kl']:.2f} "
            f"nats per answer, passed kl_blowup = {self.config.kl_blowup}. The policy saved is the one that "
            "produced these answers; lower learning_rate or raise kl_coef."
        )
        log.warning(state.blowup_note)
        self._keep_samples(iteration, experience.rollout)
        experience.logged = {**experience.logged, "kl_blowup": 1.0}
        experience.halt = True
