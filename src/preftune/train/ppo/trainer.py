"""One PPO iteration for the engine's RL loop: ``collect`` (rollout, scores normalised, advantages; the KL
blow-up check) and ``update`` (the learning rates of this iteration, the minibatch update, then the KL
controller)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from preftune.config.shared import learning_rate_of
from preftune.model.generation import GenerationBackend
from preftune.model.sampling import eos_ids_of
from preftune.model.templating import pad_id
from preftune.train.engine import Engine, Halt, IterationTrainer
from preftune.train.kl_control import make_kl_controller
from preftune.train.loop import make_optimizer, trainable_parameters
from preftune.train.packed import fused_head_weight
from preftune.train.ppo.advantages import Advantages, rollout_stats, shaped_advantages
from preftune.train.ppo.prompts import Messages, PromptCycler, prompt_text
from preftune.train.ppo.rollout import (
    Rollout,
    count_rollout,
    generate_rollout,
    rollout_backend,
    score_rollout,
)
from preftune.train.ppo.state import PPOState
from preftune.train.ppo.update import ActorCritic, ppo_update

log = logging.getLogger(__name__)


@dataclass
class PPOExperience:
    """One iteration's rollouts and advantages (and what the engine's loop reads: ``ids``, ``tokens``,
    ``logged``, ``halt``)."""

    iteration: int
    ids: torch.Tensor
    tokens: int
    logged: dict[str, float]
    rollout: Rollout
    shaped: Advantages
    raw_scores: torch.Tensor
    halt: bool = False


class PPOTrainer(IterationTrainer):
    """PPO on the engine: the policy and critic are trained, the reference and the reward stay frozen (``None``
    where the policy's or critic's adapter, switched off, serves as them)."""

    def __init__(
        self,
        engine: Engine,
        models: tuple[Any, Any, Any, Any],
        tokenizer: Any,
        prompts: list[Messages],
        encoded: list[list[int]],
        iterations: int,
        backend: GenerationBackend | None = None,
    ) -> None:
        config, accelerator = engine.config, engine.accelerator
        self.iterations = iterations
        self.config, self.accelerator, self.tokenizer = config, accelerator, tokenizer
        self.autocast = engine.autocast
        self.prompts, self.encoded = prompts, encoded
        policy, reference, critic, reward = models
        self.eos_ids, self.pad = eos_ids_of(tokenizer, policy), pad_id(tokenizer)
        policy_opt = make_optimizer(policy, learning_rate_of(config), config.weight_decay)
        critic_opt = make_optimizer(
            critic, learning_rate_of(config, "critic_learning_rate"), config.weight_decay
        )
        policy, critic, policy_opt, critic_opt = accelerator.prepare(policy, critic, policy_opt, critic_opt)
        if reference is not None:
            reference, reward = reference.to(accelerator.device), reward.to(accelerator.device)
        self.reference, self.reward = reference, reward
        self.trained = ActorCritic(
            policy,
            critic,
            policy_opt,
            critic_opt,
            trainable_parameters(policy),
            trainable_parameters(critic),
            fused_head_weight(policy) is not None,
        )
        self.policy = policy
        # built once per run (the vllm engine from the SFT model); each rollout hands it the policy's weights
        self.backend = backend or rollout_backend(accelerator.unwrap_model(policy), config)
        self.modules = {"policy": policy, "critic": critic}
        self.optimizers = {"policy": policy_opt, "critic": critic_opt}
        controller = make_kl_controller(
            config.kl_controller, config.kl_coef, config.target_kl, config.kl_horizon
        )
        # each process samples its own share of the prompts, in one seeded order for all
        self.state = PPOState(controller, PromptCycler(len(prompts), config.seed))
        self.per_process = max(1, config.rollout_batch_size // accelerator.num_processes)
        self.reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    def collect(self, iteration: int) -> PPOExperience:
        config, accelerator, state = self.config, self.accelerator, self.state
        indices, mine = state.cycler.draw(
            self.per_process, accelerator.num_processes, accelerator.process_index
        )
        policy = accelerator.unwrap_model(self.policy)
        began = time.perf_counter()
        rollout = generate_rollout(
            policy,
            self.tokenizer,
            [self.prompts[i] for i in mine],
            [self.encoded[i] for i in mine],
            config,
            self.eos_ids,
            accelerator.device,
            backend=self.backend,
        )
        tokens = count_rollout(state, time.perf_counter() - began, rollout)
        # no gradients here: the modules under DDP's wrapper, whose adapters can be switched off for the
        # reference and the reward
        critic = accelerator.unwrap_model(self.trained.critic)
        score_rollout(rollout, policy, self.reference, critic, self.reward, self.tokenizer, config)
        raw_scores = rollout.scores
        if config.normalize_scores:
            state.scores.update(accelerator.gather_for_metrics(raw_scores))
            rollout.scores = state.scores.normalise(raw_scores, config.normalized_score_clip)
        kl_coef = state.controller.value
        shaped = shaped_advantages(rollout, kl_coef, config, self.reduce)
        logged = rollout_stats(rollout, shaped, kl_coef, accelerator, raw_scores)
        experience = PPOExperience(
            iteration, torch.tensor(indices), tokens, logged, rollout, shaped, raw_scores
        )
        if iteration == 1 or iteration == self.iterations:
            self._keep_samples(iteration, rollout, raw_scores)
        if config.kl_blowup > 0 and logged["kl"] > config.kl_blowup:
            self._blow_up(experience)
        return experience

    def update(self, experience: PPOExperience) -> Halt | None:
        config, state, logged = self.config, self.state, experience.logged
        logged["lr"] = self._set_learning_rates(experience.iteration)
        result = ppo_update(
            self.trained,
            experience.rollout,
            experience.shaped,
            config,
            self.accelerator,
            self.pad,
            self.autocast,
        )
        state.all_clip.extend(result.clip_fractions)
        state.early_stops += int(result.stopped)
        state.controller.update(logged["kl"], config.rollout_batch_size)
        logged.update(result.meter.means())
        logged.update({"early_stop": float(result.stopped), "ppo_steps": float(result.steps)})
        if result.nonfinite is None:
            return None
        logged["nonfinite_loss"] = 1.0
        what = "loss" if result.what == "loss" else "gradient norm (the loss being finite)"
        return Halt(
            f"ppo: the {what} is {result.nonfinite} in iteration {experience.iteration} after {result.steps} "
            "updates (not applied)",
            "the policy and critic before that update are saved",
            "Lower the learning rates, raise kl_coef, or clip scores (score_clip)",
        )

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {
            "score": f"{logged['score']:.3f}",
            "kl": f"{logged['kl']:.2f}",
            "len": f"{logged['response_length']:.1f}",
            "stop": "y" if logged["early_stop"] else "n",
        }

    def _set_learning_rates(self, iteration: int) -> float:
        """Both learning rates for this iteration: linear from the configured ones at the first iteration to a
        tenth of them at the last (a function of the iteration alone, so a resumed run has the same)."""
        done = (iteration - 1) / max(self.iterations - 1, 1)
        factor = 1.0 - 0.9 * min(done, 1.0)
        policy_rate = learning_rate_of(self.config)
        rates = ((self.trained.policy_optimizer, policy_rate),)
        rates += ((self.trained.critic_optimizer, learning_rate_of(self.config, "critic_learning_rate")),)
        for optimizer, base in rates:
            for group in optimizer.param_groups:
                group["lr"] = base * factor
        return policy_rate * factor

    def _keep_samples(self, iteration: int, rollout: Rollout, scores: torch.Tensor) -> None:
        rows = [
            {"iteration": iteration, "prompt": prompt_text(p), "response": t, "score": float(s)}
            for p, t, s in zip(rollout.prompts, rollout.texts, scores.tolist(), strict=True)
        ]
        self.state.samples[str(iteration)] = rows[: self.config.samples_shown]

    def _blow_up(self, experience: PPOExperience) -> None:
        """Stop before this iteration's update: the policy has run away from the reference, and further updates
        would only optimise the reward model's blind spots."""
        state, iteration = self.state, experience.iteration
        state.blowups += 1
        state.blowup_note = (
            f"Training stopped at iteration {iteration}: the rollout KL to the SFT model, "
            f"{experience.logged['kl']:.2f} nats per response, passed kl_blowup = {self.config.kl_blowup}. The "
            "policy saved is the one that produced these rollouts; lower learning_rate or raise kl_coef."
        )
        log.warning(state.blowup_note)
        self._keep_samples(iteration, experience.rollout, experience.raw_scores)
        experience.logged = {**experience.logged, "kl_blowup": 1.0}
        experience.halt = True
