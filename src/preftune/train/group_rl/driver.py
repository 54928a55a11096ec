"""``train_grpo``: GRPO, Dr. GRPO or RLOO from the SFT model against a reward model and/or reward functions, on the
engine's RL loop."""

from __future__ import annotations

import dataclasses
from typing import Any

from preftune.config.grpo import GRPOConfig, validate
from preftune.io import storage
from preftune.model import modeling
from preftune.model.generation.stage import require_backend
from preftune.train.engine import Artifact, Engine, run_iterations
from preftune.train.group_rl.prompts import load_prompt_records
from preftune.train.group_rl.report import group_metrics, report
from preftune.train.group_rl.rewards import RewardSources, load_reward_functions
from preftune.train.group_rl.sampling import load_policy, load_reward
from preftune.train.group_rl.trainer import GroupRLTrainer
from preftune.train.ppo.models import check_lengths
from preftune.train.ppo.prompts import encode_prompts
from preftune.train.ppo.rollout import rollout_backend


def reward_sources(reward_model: str | None, config: Any) -> tuple[RewardSources, str]:
    """The reward of the sampling stages (the reward model and/or the config's functions) and its description
    for the report; refuses a run with neither, and functions that cannot be imported, before any policy
    is loaded."""
    functions = load_reward_functions(config.reward_functions, config.reward_weights)
    if not reward_model and not functions:
        raise ValueError(
            "no reward: pass a reward model, set reward_functions (package.module:function, ...), or both"
        )
    model, tokenizer = load_reward(reward_model, config)
    parts = [f"the reward model x {config.reward_model_weight}"] if model is not None else []
    parts += [f"{fn.name} x {fn.weight}" for fn in functions]
    return RewardSources(model, tokenizer, functions, config), " + ".join(parts)


def train_grpo(
    sft_model: str,
    reward_model: str | None,
    prompts: str,
    model_dir: str,
    report_path: str,
    config: GRPOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, float]:
    """Optimise the SFT policy with GRPO, Dr. GRPO or RLOO (``config.estimator``) and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        reward_model: The reward model artifact that scores answers (its own tokenizer is used), or None when
            ``config.reward_functions`` give the reward alone.
        prompts: JSONL file or directory of rows with a ``prompt`` (text or chat messages), e.g. the preference
            import's train pairs; duplicate prompts are dropped, and the other columns of each prompt's first
            row reach the reward functions.
        model_dir: Where to write the policy artifact. With LoRA only the adapter is saved, stacked on the SFT
            artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies, saved after the updates of
            iterations, denser early (preftune.train.snapshots); None keeps none.

    Returns:
        Metrics: ``reward_first`` / ``reward_last`` (mean reward of the answers before any KL penalty, over the
        first / last 20% of iterations), ``reward_gain``, ``kl_last`` and ``kl_max`` (KL to the SFT model per
        answer, nats), ``entropy_last``, ``response_length_last``, ``distinct_answers_last`` (share of distinct
        answers per prompt), ``clip_fraction_mean``, ``zero_std_groups_mean`` (share of prompts whose answers
        all got one reward), ``iterations``, ``kl_blowups``, ``train_seconds``, ``rollout_seconds``,
        ``rollout_tokens_per_second``, ``resumed_from_iteration`` and the engine's resources.
    """
    validate(config)
    require_backend(config)  # vllm where it cannot run: refused before anything is loaded
    engine = Engine(config.estimator, config)
    prompt_rows, records = load_prompt_records(prompts)  # bad input fails before any model is loaded
    rewards, described = reward_sources(reward_model, config)
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    policy, reference = load_policy(sft_model, config)
    check_lengths(policy, config)
    encoded, truncated = encode_prompts(tokenizer, prompt_rows, config.max_prompt_length)

    backend = rollout_backend(policy, config, model_ref=sft_model)
    trainer = GroupRLTrainer(
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
        run = run_iterations(engine, trainer, config.iterations)
    finally:
        backend.close()

    metrics = group_metrics(engine, run, trainer.state)
    engine.save(
        trainer.policy,
        run,
        data={"prompts": storage.sha256_of(prompts)},
        metrics=metrics,
        report=lambda: report(
            metrics, run.history, config, trainer.state, len(prompt_rows), truncated, described
        ),
    )
    return metrics
