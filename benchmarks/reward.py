"""Reward model: preftune.train.reward.train_reward_model against TRL's RewardTrainer (same model, pairs, seed)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.dpo import _features, token_counts

LEARNING_RATE = 1e-3


def run(
    impl: str,
    *,
    model: str = "tiny",
    pairs: int = 256,
    batch_size: int = 16,
    use_lora: bool = True,
    max_length: int = 256,
    levers: dict[str, Any] | None = None,
    precision: str = "fp32",
    liger: bool = False,
) -> dict[str, Any]:
    model_path = common.model_dir(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rm-"))
    train = common.write_jsonl(tmp / "train.jsonl", common.pair_rows(pairs))
    evalp = common.write_jsonl(tmp / "eval.jsonl", common.pair_rows(8))
    counts = token_counts(_features(model_path, train, max_length))
    if impl == "ours":
        from preftune.train import reward

        eval_timer = common.Timer()
        reward._evaluate = eval_timer.wrap(reward._evaluate)
        config = reward.RewardConfig(
            epochs=1,
            learning_rate=LEARNING_RATE,
            batch_size=batch_size,
            max_length=max_length,
            use_lora=use_lora,
            eval_steps=0,
            logging_steps=10**6,
            seed=0,
            precision=precision,
            **(levers or {}),
        )
        metrics = reward.train_reward_model(
            model_path, train, evalp, str(tmp / "out"), str(tmp / "r.html"), config
        )
        result = {"seconds": metrics["train_seconds"] - eval_timer.seconds, "steps": metrics.get("steps")}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import RewardConfig, RewardTrainer

        from preftune.model import modeling
        from preftune.model.templating import render_prompt

        tokenizer = modeling.load_tokenizer(model_path)
        rm = modeling.prepare_reward_model(model_path, use_lora=False)
        rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
        data = Dataset.from_list(
            [
                {
                    "prompt": render_prompt(tokenizer, r["prompt"]),
                    "chosen": r["chosen"],
                    "rejected": r["rejected"],
                }
                for r in rows
            ]
        )
        peft_config = (
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules="all-linear",
                modules_to_save=["score"],
                task_type="SEQ_CLS",
            )
            if use_lora
            else None
        )
        args = RewardConfig(
            output_dir=str(tmp / "trl"),
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear",
            warmup_steps=0.1,
            max_length=max_length,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            **common.trl_device_args(precision, liger),
            seed=0,
            disable_dropout=True,
            dataloader_num_workers=0,
            max_grad_norm=1.0,
            gradient_checkpointing=False,  # TRL's default is on; ours is off (set alike on both sides)
            center_rewards_coefficient=None,
        )
        trainer = RewardTrainer(
            model=rm, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
        )
        out = trainer.train()
        result = {"seconds": out.metrics["train_runtime"], "steps": out.global_step}
    # A reward model scores prompt + answer for each answer: useful = both full sequences, no padding.
    result.update(counts)
    result["useful_tokens"] = counts["useful_tokens"] + counts["prompt_tokens"]
    result["pairs"] = pairs
    return result
