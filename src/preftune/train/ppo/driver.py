"""``train_ppo``: PPO from the SFT model against a reward model, on the engine's RL loop."""

from __future__ import annotations

import dataclasses
import math

from preftune.config.ppo import PPOConfig, validate
from preftune.io import storage
from preftune.model import modeling
from preftune.model.generation.stage import require_backend
from preftune.train.engine import Artifact, Engine, run_iterations
from preftune.train.packed import check_kernel
from preftune.train.ppo.models import check_lengths, check_tokenizers, load_models
from preftune.train.ppo.prompts import encode_prompts, load_prompts
from preftune.train.ppo.report import ppo_metrics, report
from preftune.train.ppo.rollout import rollout_backend
from preftune.train.ppo.trainer import PPOTrainer

#: The iteration count ``iterations = -1`` picks: one pass over the prompts, within these bounds.
AUTO_ITERATIONS = (8, 64)


def planned_iterations(config: PPOConfig, prompts: int) -> int:
    """``config.iterations``, or for -1 one pass over the unique prompts, clamped to :data:`AUTO_ITERATIONS`."""
    if config.iterations != -1:
        return config.iterations
    low, high = AUTO_ITERATIONS
    return min(max(math.ceil(prompts / config.rollout_batch_size), low), high)


def train_ppo(
    sft_model: str,
    reward_model: str,
    prompts: str,
    model_dir: str,
    report_path: str,
    config: PPOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, float]:
    """Optimise the SFT policy against a reward model with PPO and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        reward_model: The reward model (a sequence classifier artifact, or a LoRA adapter with its score head);
            it scores responses and initialises the critic. It must share the SFT model's tokenizer.
        prompts: JSONL file or directory of rows with a ``prompt`` (text or chat messages), e.g. the preference
            import's train pairs; duplicate prompts are dropped.
        model_dir: Where to write the policy artifact. With LoRA only the PPO adapter is saved, stacked on the
            SFT artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies, saved after the updates
            of iterations, denser early (preftune.train.snapshots); None keeps none.

    Returns:
        Metrics: ``reward_first`` / ``reward_last`` (mean reward-model score of the responses in the first / last
        20% of iterations, at least one), ``reward_gain`` (last - first), ``kl_last`` and ``kl_max`` (rollout
        KL to the SFT model per response, nats), ``entropy_last`` (mean per-token entropy of the policy on its
        samples), ``clip_fraction_mean`` (share of tokens clipped, over all updates), ``value_loss_last``,
        ``explained_variance_last``, ``response_length_last`` (tokens, eos included), ``iterations`` (run),
        ``early_stops`` (iterations whose updates stopped on max_approx_kl), ``kl_blowups`` (1 when training
        stopped on kl_blowup), ``train_seconds``, ``rollout_seconds`` (time in generation) and
        ``rollout_tokens_per_second`` (sampled tokens per second of generation).
    """
    validate(config)
    require_backend(config)  # vllm where it cannot run: refused before anything is loaded
    engine = Engine("ppo", config)
    prompt_rows = load_prompts(prompts)  # bad input fails before any model is loaded
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    reward_tokenizer = modeling.load_tokenizer(reward_model, trust_remote_code=config.trust_remote_code)
    check_tokenizers(tokenizer, reward_tokenizer, sft_model, reward_model)
    models = load_models(sft_model, reward_model, config)
    check_lengths(models[0], config)
    for model in models:
        if model is not None:  # rollouts are scored and trained as packed rows, one prompt + response each
            check_kernel(model, engine.accelerator.device, packed=True)
    encoded, truncated = encode_prompts(tokenizer, prompt_rows, config.max_prompt_length)
    config = dataclasses.replace(config, iterations=planned_iterations(config, len(prompt_rows)))
    engine.config = config

    backend = rollout_backend(models[0], config, model_ref=sft_model)  # once per run
    trainer = PPOTrainer(engine, models, tokenizer, prompt_rows, encoded, config.iterations, backend)
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
    metrics = ppo_metrics(engine, run, trainer.state)
    engine.save(
        trainer.policy,
        run,
        data={"prompts": storage.sha256_of(prompts)},
        metrics=metrics,
        report=lambda: report(metrics, run.history, config, trainer.state, len(prompt_rows), truncated),
    )
    return metrics
