"""SFT: preftune.train.sft.train_sft against TRL's SFTTrainer, packing on for both (padding-free, per-document
attention on our side; TRL's default best-fit-decreasing packing with position ids that restart per document)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

LEARNING_RATE = 2e-3


def run(
    impl: str,
    *,
    model: str = "tiny",
    examples: int = 256,
    batch_size: int = 16,
    use_lora: bool = True,
    max_length: int = 256,
    levers: dict[str, Any] | None = None,
    precision: str = "fp32",
    liger: bool = False,
) -> dict[str, Any]:
    from preftune.model import modeling
    from preftune.train.batching import load_sft_features

    model_path = common.model_dir(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    train = common.write_jsonl(tmp / "train.jsonl", common.sft_rows(examples))
    evalp = common.write_jsonl(tmp / "eval.jsonl", common.sft_rows(8))
    features = load_sft_features(train, modeling.load_tokenizer(model_path), max_length)
    useful = sum(len(f["prompt_ids"]) + len(f["completion_ids"]) for f in features)
    if impl == "ours":
        from preftune.train import sft

        eval_timer = common.Timer()
        sft._evaluate = eval_timer.wrap(sft._evaluate)
        config = sft.SFTConfig(
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
        metrics = sft.train_sft(model_path, train, evalp, str(tmp / "out"), str(tmp / "r.html"), config)
        result = {"seconds": metrics["train_seconds"] - eval_timer.seconds, "steps": metrics["steps"]}
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        from preftune.model.templating import render_prompt

        tokenizer = modeling.load_tokenizer(model_path)
        rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
        data = Dataset.from_list(
            [{"prompt": render_prompt(tokenizer, r["prompt"]), "completion": r["completion"]} for r in rows]
        )
        peft_config = (
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
            if use_lora
            else None
        )
        args = SFTConfig(
            output_dir=str(tmp / "trl"),
            per_device_train_batch_size=batch_size,
            num_train_epochs=1,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="linear",
            warmup_steps=0.05,
            max_length=max_length,
            packing=True,
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            **common.trl_device_args(precision, liger),
            seed=0,
            dataloader_num_workers=0,
            max_grad_norm=1.0,
            gradient_checkpointing=False,  # TRL's default is on; ours is off (set alike on both sides)
        )
        trainer = SFTTrainer(
            model=modeling.load_causal_lm(model_path),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        out = trainer.train()
        result = {"seconds": out.metrics["train_runtime"], "steps": out.global_step}
    result.update({"useful_tokens": useful, "examples": examples})
    return result
