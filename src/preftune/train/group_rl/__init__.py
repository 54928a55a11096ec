"""Critic-free policy optimisation: GRPO, Dr. GRPO and RLOO from the SFT model, held near it by a KL term.

No value model: each prompt gets ``num_generations`` (K) answers, and an answer's advantage is its reward against
the other answers to the same prompt (preftune.model.policy_losses: group-normalised for GRPO, mean-centred for
Dr. GRPO, leave-one-out for RLOO). That halves PPO's models and memory, and is what TRL, OpenRLHF and verl lead
with today.

Models: the **policy** is the merged SFT model with a fresh LoRA adapter; the **reference** is the same weights
with the adapter off (without LoRA, a frozen copy). The **reward** of an answer is the reward model's score and/or
Python reward functions named by import path, weighted (rewards.py); the reward model is optional when functions
are given, and may use its own tokenizer (answers are scored as text).

One iteration (trainer.py, on the engine's RL loop preftune.train.engine.iterations):

1. **Sample** K answers to each of ``prompts_per_iteration`` prompts (seeded order; PPO's KV-cached sampling),
   each process its own prompts: a group never spans processes, so advantages need no communication.
2. **Score** every sampled token under the policy and the reference (PPO's packed scoring), and every answer
   with the reward sources; ``score_clip`` bounds the reward model, ``missing_eos_penalty`` charges answers cut
   without eos.
3. **KL**: with ``kl_penalty=reward``, ``kl_coef`` x the answer's summed log-ratio is taken off its reward; with
   ``loss`` (default) the per-token k3 estimate enters the loss. The answers' KL to the SFT model is logged either
   way; past ``kl_blowup`` training stops before the update, keeping the last good policy.
4. **Advantages** per group, by the estimator.
5. **Update** (update.py): ``update_epochs`` passes over minibatches of ``mini_batch_size`` answers, each step
   the clipped policy-ratio loss; the KL controller (fixed or adaptive) then sees the iteration's KL.

The engine owns iterations, progress, resume, the NaN stop and the snapshots of the reward-vs-KL chart; the run
saves the policy artifact (lineage with every setting, ``kl_penalty`` among them) and an HTML report
(report.py). ``train_grpo`` (driver.py) is the stage.
"""

from preftune.config.grpo import GRPOConfig
from preftune.train.group_rl.driver import reward_sources, train_grpo
from preftune.train.group_rl.prompts import load_prompt_records
from preftune.train.group_rl.rewards import (
    RewardFunction,
    RewardFunctionError,
    Rewards,
    RewardSources,
    call_reward_function,
    load_reward_functions,
)
from preftune.train.group_rl.sampling import load_policy, load_reward, sample_groups, score_tokens
from preftune.train.group_rl.trainer import GroupExperience, GroupRLTrainer
from preftune.train.group_rl.update import IterationData, TrainedPolicy, group_update

__all__ = [
    "GRPOConfig",
    "GroupExperience",
    "GroupRLTrainer",
    "IterationData",
    "RewardFunction",
    "RewardFunctionError",
    "RewardSources",
    "Rewards",
    "TrainedPolicy",
    "call_reward_function",
    "group_update",
    "load_policy",
    "load_prompt_records",
    "load_reward",
    "load_reward_functions",
    "reward_sources",
    "sample_groups",
    "score_tokens",
    "train_grpo",
]
