"""DPO: preftune.train.dpo.train_dpo against TRL's DPOTrainer, same model, pairs, schedule and seed."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

BETA = 0.1
LEARNING_RATE = 1e-3


def _features(model: str, rows_path: str, max_length: int) -> list[dict[str, Any]]:
    from preftune.model import modeling
    from preftune.train.batching import load_pair_features

    return load_pair_features(rows_path, modeling.load_tokenizer(model), max_length)


def token_counts(features: list[dict[str, Any]]) -> dict[str, int]:
    """Useful tokens (prompt once per pair, both answers, no padding) and scored (answer) tokens."""
    answers = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    prompts = sum(len(f["prompt_ids"]) for f in features)
    return {"useful_tokens": prompts + answers, "scored_tokens": answers, "prompt_tokens": prompts}


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
    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    train = common.write_jsonl(tmp / "train.jsonl", common.pair_rows(pairs))
    evalp = common.write_jsonl(tmp / "eval.jsonl", common.pair_rows(8))
    features = _features(model_path, train, max_length)
    counts = token_counts(features)
    result = (
        _ours(
            model_path,
            train,
            evalp,
            tmp,
            batch_size,
            use_lora,
            max_length,
            {**(levers or {}), "precision": precision},
        )
        if impl == "ours"
        else _trl(model_path, train, tmp, batch_size, use_lora, max_length, levers or {}, precision, liger)
    )
    result.update(counts)
    result["pairs"] = pairs
    return result


def _ours(model_path, train, evalp, tmp, batch_size, use_lora, max_length, levers) -> dict[str, Any]:
    from preftune.train import dpo

    ref_timer, eval_timer = common.Timer(), common.Timer()
    dpo.score_reference = ref_timer.wrap(dpo.score_reference)
    dpo._evaluate = eval_timer.wrap(dpo._evaluate)
    config = dpo.DPOConfig(
        epochs=1,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        eval_steps=0,
        logging_steps=10**6,
        seed=0,
        **levers,
    )
    metrics = dpo.train_dpo(model_path, train, evalp, str(tmp / "out"), str(tmp / "report.html"), config)
    seconds = metrics["train_seconds"] - eval_timer.seconds + ref_timer.seconds
    return {
        "seconds": seconds,
        "reference_seconds": ref_timer.seconds,
        "first_step_loss": metrics["first_step_loss"],
        "steps": metrics["steps"],
    }


def _trl(
    model_path, train, tmp, batch_size, use_lora, max_length, levers, precision, liger
) -> dict[str, Any]:
    import json

    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from preftune.model import modeling
    from preftune.model.templating import render_prompt

    tokenizer = modeling.load_tokenizer(model_path)
    model = modeling.load_causal_lm(model_path)
    # The adapter as TRL users attach it (peft_config): the reference is then the adapter-disabled model.
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if use_lora
        else None
    )
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    # Non-conversational rows with the prompt rendered by the same chat template: TRL then tokenises prompt and
    # answers separately and appends eos, giving the same token ids as preftune (checked in the correctness gate).
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
    args = DPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        beta=BETA,
        max_length=max_length,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        **common.trl_device_args(precision, liger),
        seed=0,
        disable_dropout=True,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        # TRL defaults to activation checkpointing; both sides get the same setting (ours: off unless asked)
        gradient_checkpointing=levers.get("gradient_checkpointing", False),
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    out = trainer.train()
    return {
        "seconds": out.metrics["train_runtime"],
        "steps": out.global_step,
        "first_step_loss": float("nan"),
    }
