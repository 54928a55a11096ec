"""Online DPO: rounds of sampling from the current policy, ranking by a judge, and DPO steps on the pairs it gives.

The article's RLHF is iterative (collect feedback, train, collect again); online DPO runs that loop inside one
stage with the reward model (and/or reward functions) as the annotator. One round, on the engine's RL loop
(preftune.train.engine.iterations):

1. **Sample** ``num_generations`` answers to each of ``prompts_per_round`` prompts from the current policy (the
   sampling stages' code: preftune.train.group_rl.sampling), each process its own prompts; log-probabilities under
   the policy and the SFT model give the KL per answer, logged and bounded by ``kl_blowup`` as in PPO.
2. **Rank**: the judge scores every answer (group_rl.rewards); each prompt's best answer over its worst is one
   pair (model.policy_losses.best_worst_pairs), unless their scores differ by ``min_score_gap`` or less.
3. **Reference**: every pair's log-probabilities under the SFT model (the policy's adapter off, or a frozen
   copy), no gradients; the reference stays the SFT model for every round. The pairs of every process are then
   shared, so every process sees the same list.
4. **Train**: ``dpo_epochs`` passes over the round's pairs in a seeded order, ``batch_size`` pairs per step
   (each process its share of each step's pairs; a last, short step is filled up from the start of the order, so
   every process takes the same steps), minimising DPO's loss (model.losses.dpo_loss) on DPO's packed,
   prefix-shared pair batches (train.dpo.pair_logprobs).

Answers are trained on exactly as sampled: the tokens up to and including the first eos (an answer cut at
``max_new_tokens`` has none).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object

from preftune.config.online_dpo import OnlineDPOConfig, validate
from preftune.config.shared import learning_rate_of
from preftune.io import storage
from preftune.model import modeling
from preftune.model.generation import GenerationBackend
from preftune.model.generation.stage import require_backend
from preftune.model.losses import dpo_loss
from preftune.model.policy_losses import best_worst_pairs
from preftune.model.sampling import eos_ids_of
from preftune.report import html as reports
from preftune.train.batching import PackedPairCollator
from preftune.train.dpo import pair_logprobs
from preftune.train.engine import (
    Artifact,
    Engine,
    Halt,
    IterationTrainer,
    Resumable,
    Run,
    finite_everywhere,
    run_iterations,
)
from preftune.train.group_rl.driver import reward_sources
from preftune.train.group_rl.prompts import load_prompt_records
from preftune.train.group_rl.report import curve_sections, rollout_metrics, sample_section
from preftune.train.group_rl.rewards import RewardSources
from preftune.train.group_rl.sampling import load_policy, sample_round
from preftune.train.group_rl.trainer import sample_stats
from preftune.train.loop import History, Meter, config_rows, make_optimizer, trainable_parameters
from preftune.train.packed import fused_head_weight
from preftune.train.ppo.models import adapter_off, check_lengths
from preftune.train.ppo.prompts import Messages, PromptCycler, encode_prompts, prompt_text
from preftune.train.ppo.rollout import Rollout, _chunks, rollout_backend

log = logging.getLogger(__name__)


@dataclass
class OnlineDPOState(Resumable):
    """Online DPO's resumable state: the prompt order, the first step's loss (ln 2 for sigmoid), the pairs made,
    KL blow-ups, generation time and tokens, and the sample answers shown (by round, as a string key)."""

    cycler: PromptCycler
    first: Meter = field(default_factory=Meter)
    pairs: int = 0
    blowups: int = 0
    blowup_note: str = ""
    rollout_seconds: float = 0.0
    rollout_tokens: int = 0
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class RoundExperience:
    """One round's pairs (every process's, with their reference log-probs) and what the loop reads."""

    iteration: int
    ids: torch.Tensor
    tokens: int
    logged: dict[str, float]
    pairs: list[dict[str, Any]]
    halt: bool = False


def rollout_pairs(
    rollout: Rollout, scores: torch.Tensor, group_size: int, min_gap: float
) -> list[dict[str, Any]]:
    """The round's pairs on this process as DPO features: each group's best answer (chosen) over its worst."""
    pairs = []
    for chosen, rejected in best_worst_pairs(scores, group_size, min_gap=min_gap):
        pairs.append(
            {
                "prompt_ids": list(rollout.prompt_tokens[chosen]),
                "chosen_ids": list(rollout.response_tokens[chosen]),
                "rejected_ids": list(rollout.response_tokens[rejected]),
                "chosen_score": float(scores[chosen]),
                "rejected_score": float(scores[rejected]),
                "index": len(pairs),
            }
        )
    return pairs


class OnlineDPOTrainer(IterationTrainer):
    """Online DPO on the engine (see the module docstring): the policy is trained; the reference (the policy with
    its adapter off, or a frozen copy) and the judge stay frozen."""

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
        self.eos_ids = eos_ids_of(tokenizer, policy)
        optimizer = make_optimizer(policy, learning_rate_of(config), config.weight_decay)
        policy, optimizer = accelerator.prepare(policy, optimizer)
        self.reference = reference.to(accelerator.device) if reference is not None else None
        if rewards.model is not None:
            rewards.model.to(accelerator.device)
        self.policy, self.optimizer, self.params = policy, optimizer, trainable_parameters(policy)
        self.fused = fused_head_weight(policy) is not None
        # built once per run (the vllm engine from the SFT model); each round of sampling hands it the weights
        self.backend = backend or rollout_backend(accelerator.unwrap_model(policy), config)
        self.collator = PackedPairCollator(
            tokenizer, prefix_sharing=config.prefix_sharing, pack_length=config.pack_length
        )
        self.modules, self.optimizers = {"policy": policy}, {"policy": optimizer}
        self.state = OnlineDPOState(PromptCycler(len(prompts), config.seed))
        self.per_process = max(1, config.prompts_per_round // accelerator.num_processes)

    def collect(self, iteration: int) -> RoundExperience:
        config, accelerator, state = self.config, self.accelerator, self.state
        sampled = sample_round(self)
        rollout, rewards, kl = sampled.rollout, sampled.rewards, sampled.kl
        logged = sample_stats(rollout, rewards, kl, rewards.total, config.num_generations, accelerator)
        pairs = rollout_pairs(rollout, rewards.total, config.num_generations, config.min_score_gap)
        self._reference_logps(pairs)
        if accelerator.num_processes > 1:
            pairs = gather_object(pairs)  # every process trains on every process's pairs, in one order
        logged["pairs"] = float(len(pairs))
        if pairs:
            logged["chosen_score"] = sum(p["chosen_score"] for p in pairs) / len(pairs)
            logged["rejected_score"] = sum(p["rejected_score"] for p in pairs) / len(pairs)
        state.pairs += len(pairs)
        experience = RoundExperience(iteration, sampled.indices, sampled.tokens, logged, pairs)
        if iteration == 1 or iteration == config.rounds:
            self._keep_samples(iteration, rollout)
        if config.kl_blowup > 0 and logged["kl"] > config.kl_blowup:
            self._blow_up(experience, rollout)
        return experience

    @torch.no_grad()
    def _reference_logps(self, pairs: list[dict[str, Any]]) -> None:
        """Each pair's log-probabilities under the SFT model (``ref_chosen_logps``, ``ref_rejected_logps``)."""
        model = self.reference if self.reference is not None else self.accelerator.unwrap_model(self.policy)
        model.eval()
        fused = fused_head_weight(model) is not None
        with adapter_off(model) if self.reference is None else nullcontext():
            for part in _chunks(len(pairs), self.config.forward_batch_size):
                batch = self.collator(pairs[part])
                batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
                chosen, rejected = pair_logprobs(model, batch, fused_head=fused)
                for pair, c, r in zip(pairs[part], chosen.tolist(), rejected.tolist(), strict=True):
                    pair["ref_chosen_logps"], pair["ref_rejected_logps"] = c, r

    def update(self, experience: RoundExperience) -> Halt | None:
        pairs, config = experience.pairs, self.config
        meter, steps = Meter(), 0
        self.policy.train()
        for order in self._orders(experience.iteration, len(pairs)):
            for start in range(0, len(order), config.batch_size):
                loss = self._step(
                    [pairs[i] for i in self._share(order[start : start + config.batch_size])], meter
                )
                if loss is not None:
                    experience.logged.update({**meter.means(), "steps": float(steps), "nonfinite_loss": 1.0})
                    return Halt(
                        f"online_dpo: the loss is {loss} in round {experience.iteration} after {steps} steps "
                        "(not applied)",
                        "the policy before that step is saved",
                        "Lower the learning rate or raise beta",
                    )
                if experience.iteration == 1 and steps == 0:
                    self.state.first.add(1.0, loss=meter.means()["loss"])
                steps += 1
        experience.logged.update({**meter.means(), "steps": float(steps)})
        return None

    def _orders(self, iteration: int, n: int) -> list[list[int]]:
        """Each pass's pair order, the same on every process (seeded by the round), filled up cyclically to
        whole steps of ``batch_size`` pairs; no pass when the round made no pair."""
        if n == 0:
            return []
        generator = torch.Generator().manual_seed(self.config.seed * 100003 + iteration)
        size = self.config.batch_size
        width = math.ceil(n / size) * size
        orders = []
        for _ in range(self.config.dpo_epochs):
            order = torch.randperm(n, generator=generator).tolist()
            orders.append([order[k % n] for k in range(width)])
        return orders

    def _share(self, step: list[int]) -> list[int]:
        """This process's part of a step's pairs."""
        per = len(step) // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return step[rank * per : (rank + 1) * per]

    def _step(self, pairs: list[dict[str, Any]], meter: Meter) -> float | None:
        """One DPO step on this process's pairs; the loss when it is not finite (the step is then not applied)."""
        accelerator, config = self.accelerator, self.config
        batch = {k: v.to(accelerator.device) for k, v in self.collator(pairs).items()}
        chosen, rejected = pair_logprobs(self.policy, batch, fused_head=self.fused)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen_logps"].to(chosen.device),
            batch["ref_rejected_logps"].to(chosen.device),
            beta=config.beta,
            loss_type=config.loss_type,
        )
        loss = losses.mean()
        if not finite_everywhere(loss, accelerator):
            return float(loss.detach())
        accelerator.backward(loss)
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        losses, chosen_rewards, rejected_rewards = accelerator.gather_for_metrics(
            (losses.detach(), chosen_rewards, rejected_rewards)
        )
        meter.add(
            loss=float(losses.mean()),
            reward_accuracy=float((chosen_rewards > rejected_rewards).float().mean()),
            reward_margin=float((chosen_rewards - rejected_rewards).mean()),
        )
        return None

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {
            "score": f"{logged['score']:.3f}",
            "kl": f"{logged['kl']:.2f}",
            "pairs": f"{logged['pairs']:.0f}",
        }

    def _keep_samples(self, iteration: int, rollout: Rollout) -> None:
        rows = [
            {"iteration": iteration, "prompt": prompt_text(p), "response": t, "score": float(s)}
            for p, t, s in zip(rollout.prompts, rollout.texts, rollout.scores.tolist(), strict=True)
        ]
        self.state.samples[str(iteration)] = rows[: self.config.samples_shown]

    def _blow_up(self, experience: RoundExperience, rollout: Rollout) -> None:
        state, iteration = self.state, experience.iteration
        state.blowups += 1
        state.blowup_note = (
            f"Training stopped at round {iteration}: the KL to the SFT model, {experience.logged['kl']:.2f} nats "
            f"per answer, passed kl_blowup = {self.config.kl_blowup}. The policy saved is the one that produced "
            "these answers; lower learning_rate or raise beta."
        )
        log.warning(state.blowup_note)
        self._keep_samples(iteration, rollout)
        experience.logged = {**experience.logged, "kl_blowup": 1.0}
        experience.halt = True


def train_online_dpo(
    sft_model: str,
    reward_model: str | None,
    prompts: str,
    model_dir: str,
    report_path: str,
    config: OnlineDPOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, float]:
    """Train the SFT policy with online DPO (see the module docstring) and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        reward_model: The reward model artifact that ranks the answers (its own tokenizer is used), or None when
            ``config.reward_functions`` rank them alone.
        prompts: JSONL file or directory of rows with a ``prompt`` (text or chat messages); duplicates are
            dropped, and the other columns of each prompt's first row reach the reward functions.
        model_dir: Where to write the policy artifact (with LoRA, the adapter stacked on the SFT artifact).
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies (preftune.train.snapshots).

    Returns:
        Metrics: ``reward_first`` / ``reward_last`` (mean judge reward of the sampled answers over the first /
        last 20% of rounds), ``reward_gain``, ``kl_last`` / ``kl_max`` (KL to the SFT model per answer, nats),
        ``entropy_last``, ``response_length_last``, ``distinct_answers_last``, ``pairs`` (made over the run),
        ``first_step_loss`` (ln 2 for sigmoid), ``train_loss_last`` and ``reward_accuracy_last`` (DPO's, on the
        last round's pairs), ``iterations`` (rounds run), ``kl_blowups``, ``train_seconds``, ``rollout_seconds``,
        ``rollout_tokens_per_second``, ``resumed_from_iteration`` and the engine's resources.
    """
    validate(config)
    require_backend(config)  # vllm where it cannot run: refused before anything is loaded
    engine = Engine("online_dpo", config)
    prompt_rows, records = load_prompt_records(prompts)  # bad input fails before any model is loaded
    rewards, described = reward_sources(reward_model, config)
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    policy, reference = load_policy(sft_model, config)
    check_lengths(policy, config)
    encoded, truncated = encode_prompts(tokenizer, prompt_rows, config.max_prompt_length)

    backend = rollout_backend(policy, config, model_ref=sft_model)
    trainer = OnlineDPOTrainer(
        engine, policy, reference, rewards, tokenizer, prompt_rows, records, encoded, backend
    )
    engine.artifact = Artifact(
        tokenizer,
        model_dir,
        report_path,
        parent_uri=sft_model_uri or sft_model,
        parameters={**dataclasses.asdict(config), "reward_model": reward_model},
        artifact_uri=model_uri,
        snapshot_dir=snapshot_dir,
        snapshots=config.num_checkpoints,
    )
    try:
        run = run_iterations(engine, trainer, config.rounds)
    finally:
        backend.close()

    metrics = _metrics(engine, run, trainer.state)
    engine.save(
        trainer.policy,
        run,
        data={"prompts": storage.sha256_of(prompts)},
        metrics=metrics,
        report=lambda: _report(
            metrics, run.history, config, trainer.state, len(prompt_rows), truncated, described
        ),
    )
    return metrics


def _metrics(engine: Engine, run: Run, state: OnlineDPOState) -> dict[str, float]:
    trained = [r for r in run.history.train if "loss" in r]
    return {
        **rollout_metrics(engine, run, state),
        "pairs": float(state.pairs),
        "first_step_loss": state.first.means().get("loss", float("nan")),
        "train_loss_last": trained[-1]["loss"] if trained else float("nan"),
        "reward_accuracy_last": trained[-1]["reward_accuracy"] if trained else float("nan"),
    }


_CURVES: dict[str, str] = {
    "score": "Mean judge reward of the sampled answers",
    "chosen_score": "Mean judge reward of the chosen (best) answers",
    "rejected_score": "Mean judge reward of the rejected (worst) answers",
    "kl": "KL to the SFT model per answer (nats, mean of sum log pi - log ref)",
    "pairs": "Pairs made in the round",
    "loss": "DPO loss",
    "reward_accuracy": "Share of pairs whose chosen implicit reward beats the rejected one",
    "reward_margin": "Mean implicit reward margin",
    "entropy": "Policy entropy per token on its samples (nats)",
    "response_length": "Mean answer length (tokens, eos included)",
    "distinct_answers": "Share of distinct answers within a prompt's answers",
}


def _report(
    metrics: dict[str, float],
    history: History,
    config: OnlineDPOConfig,
    state: OnlineDPOState,
    prompts: int,
    truncated: int,
    rewards: str,
) -> str:
    intro = (
        f"Online DPO ({config.loss_type}, beta={config.beta}) for {int(metrics['iterations'])} rounds of "
        f"{config.prompts_per_round} prompts x {config.num_generations} answers on {prompts} unique prompts, "
        f"ranked by {rewards}: {int(metrics['pairs'])} pairs, mean reward {metrics['reward_first']:.3f} -> "
        f"{metrics['reward_last']:.3f} (first vs last 20% of rounds), KL to the SFT model "
        f"{metrics['kl_last']:.3f} nats per answer at the end (max {metrics['kl_max']:.3f}). First-step loss "
        f"{metrics['first_step_loss']:.4f}"
        + (" (ln 2 = 0.6931 expected). " if config.loss_type == "sigmoid" else ". ")
        + state.blowup_note
    )
    sections: list[tuple[str, str]] = [("Metrics", reports.key_values(metrics))]
    sections += curve_sections(history, _CURVES, "round")
    sections += [
        sample_section(state),
        ("Rounds", reports.table(history.train)),
        (
            "Data",
            reports.key_values({"unique prompts": prompts, "prompts truncated": truncated, "judge": rewards}),
        ),
        ("Configuration", reports.table(config_rows(config))),
    ]
    return reports.page("Online DPO training", sections, intro=intro)
