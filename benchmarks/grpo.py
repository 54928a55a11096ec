"""GRPO and RLOO: preftune.train.group_rl.train_grpo against TRL's GRPOTrainer and RLOOTrainer, same work.

Both sides start from the same model, take the same bundled prompts (chat messages; TRL applies the same chat
template), draw the same number of answers per iteration (``prompts`` x ``generations`` per prompt, one
generation batch), with the same generation settings (at most ``NEW_TOKENS`` new tokens, temperature 1, top-p 1,
no top-k, stop at eos), and train the same schedule: minibatches of ``MINI`` answers, one pass over each
iteration's answers (so ``iterations * prompts * generations / MINI`` optimiser steps), AdamW at a constant
``LEARNING_RATE``, gradient clipping at 1, no weight decay, dropout off, no activation checkpointing, fp32, LoRA
r=16 / alpha 32 on every linear layer (or all weights). The reward is the Python function :func:`reward` on both
sides (no reward model), so the comparison is of sampling, scoring and updating alone.

The objectives are matched as the parity tests match them (tests/test_new_trainers_parity.py): GRPO is TRL's
``loss_type="grpo"`` (per-token ratio, loss averaged per answer, group-normalised advantages) with the k3 KL in
the loss at ``beta`` = our ``kl_coef`` = 0.04; RLOO is TRL's RLOOTrainer (one ratio per answer, leave-one-out
baseline) with the KL taken off the reward at ``beta`` = ``kl_coef`` = 0.05. Both sides therefore score every
answer under the sampling policy (the old log-probs: TRL computes them whenever a generation batch feeds more
than one optimiser step, as here) and under the reference.

What cannot be matched: the order of prompts and answers (each library draws its own shuffles, so the sampled
texts and their lengths differ), and TRL's prompt truncation (1.16 has none; ours keeps a prompt's last 128
tokens, which no bundled prompt reaches). Tokens/s are sampled tokens (eos included, nothing after it) per
second of the training loop; ``examples`` counts the answers each side actually sampled.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.ppo import _prompt_rows

LEARNING_RATE = 1e-3
#: KL coefficient by estimator: GRPO's (DeepSeekMath; ours by default) and RLOO's (TRL's RLOOConfig default).
KL_COEF = {"grpo": 0.04, "rloo": 0.05}
MINI, NEW_TOKENS = 8, 32


def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """Share of distinct words in each answer, minus a pull towards 12 words: cheap, deterministic, and varied
    across a group. Takes TRL's conversational completions (a list of messages) as well as our plain text."""
    out = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        words = text.split()
        out.append(len(set(words)) / max(len(words), 1) - abs(len(words) - 12) / 12)
    return out


def run(
    impl: str,
    *,
    estimator: str = "grpo",
    model: str = "tiny",
    iterations: int = 4,
    prompts: int = 8,
    generations: int = 4,
    use_lora: bool = True,
) -> dict[str, Any]:
    """One training run of ``impl`` (ours / trl; ``prepare`` builds the model only): sampled tokens, seconds and
    sequences."""
    if estimator not in KL_COEF:
        raise ValueError(f"estimator {estimator!r}: grpo or rloo")
    model_path = common.model_dir(model)
    if impl == "prepare":  # build the cached model outside any measured process
        return {"model": model_path}
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{estimator}-"))
    rows = _prompt_rows(max(64, prompts * iterations))
    settings = (estimator, iterations, prompts, generations, use_lora)
    if impl == "ours":
        path = common.write_jsonl(tmp / "prompts.jsonl", rows)
        result = _ours(model_path, path, tmp, *settings)
    elif impl == "trl":
        result = _trl(model_path, rows, tmp, *settings)
    else:
        raise ValueError(f"impl {impl!r}: ours or trl")
    result["iterations"] = iterations
    result["seconds_per_iteration"] = result["seconds"] / iterations
    result["generation_share"] = result["generation_seconds"] / result["seconds"]
    result["useful_tokens"] = result["sampled_tokens"]
    return result


def _ours(
    model_path, prompts, tmp, estimator, iterations, n_prompts, generations, use_lora
) -> dict[str, Any]:
    from preftune.train import group_rl
    from preftune.train.group_rl import sampling

    counts = {"sequences": 0}
    sample = sampling.sample_groups

    def counted(*args: Any, **kwargs: Any) -> Any:
        rollout = sample(*args, **kwargs)
        counts["sequences"] += int(rollout.response_ids.shape[0])
        return rollout

    sampling.sample_groups = counted
    config = group_rl.GRPOConfig(
        estimator=estimator,
        iterations=iterations,
        prompts_per_iteration=n_prompts,
        num_generations=generations,
        mini_batch_size=MINI,
        update_epochs=1,
        learning_rate=LEARNING_RATE,
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        kl_coef=KL_COEF[estimator],
        kl_penalty="reward" if estimator == "rloo" else "loss",
        reward_functions=f"{__name__}:reward",
        kl_blowup=0.0,  # never stop early: both sides run every iteration
        use_lora=use_lora,
        num_checkpoints=0,
        seed=0,
        precision="fp32",
    )
    try:
        metrics = group_rl.train_grpo(
            model_path, None, prompts, str(tmp / "out"), str(tmp / "r.html"), config
        )
    finally:
        sampling.sample_groups = sample
    return {
        "seconds": metrics["train_seconds"],
        "generation_seconds": metrics["rollout_seconds"],
        "sampled_tokens": round(metrics["rollout_tokens_per_second"] * metrics["rollout_seconds"]),
        "examples": counts["sequences"],
    }


def _trl_args(estimator, iterations, n_prompts, generations, tmp) -> Any:
    """TRL's config for the same schedule: a generation batch of all the iteration's answers, split into
    minibatches of ``MINI`` (one optimiser step each, no accumulation), one pass."""
    from trl import GRPOConfig, RLOOConfig

    common_args: dict[str, Any] = dict(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=MINI,
        gradient_accumulation_steps=1,
        generation_batch_size=n_prompts * generations,
        num_generations=generations,
        num_iterations=1,
        max_steps=iterations * (n_prompts * generations // MINI),
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF[estimator],
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
        disable_dropout=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
    )
    if estimator == "rloo":
        return RLOOConfig(**common_args)
    return GRPOConfig(**common_args, loss_type="grpo", scale_rewards="group")


def _trl(model_path, rows, tmp, estimator, iterations, n_prompts, generations, use_lora) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOTrainer, RLOOTrainer

    from preftune.model import modeling

    counts = {"seconds": 0.0, "tokens": 0, "sequences": 0}
    base = RLOOTrainer if estimator == "rloo" else GRPOTrainer

    class Timed(base):  # type: ignore[misc, valid-type]
        """TRL's trainer, timing its generation step and counting the answers and tokens it samples."""

        def _generate(self, prompts):  # noqa: ANN001, ANN202 - TRL's own signature
            start = time.perf_counter()
            out = super()._generate(prompts)
            counts["seconds"] += time.perf_counter() - start
            counts["tokens"] += sum(len(c) for c in out[1])
            counts["sequences"] += len(out[1])
            return out

    peft_config = (
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if use_lora
        else None
    )
    trainer = Timed(
        model=modeling.load_causal_lm(model_path),
        reward_funcs=reward,
        args=_trl_args(estimator, iterations, n_prompts, generations, tmp),
        train_dataset=Dataset.from_list(rows),  # conversational prompts: TRL applies the same chat template
        processing_class=modeling.load_tokenizer(model_path),
        peft_config=peft_config,
    )
    out = trainer.train()
    return {
        "seconds": out.metrics["train_runtime"],
        "generation_seconds": counts["seconds"],
        "sampled_tokens": counts["tokens"],
        "examples": counts["sequences"],
        "steps": out.global_step,
    }
