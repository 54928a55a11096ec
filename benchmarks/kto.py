"""KTO: preftune.train.kto.train_kto against TRL's KTOTrainer, same model, examples, schedule and seed.

Both sides train on the same unpaired examples: the first ``pairs`` bundled preference pairs, each split into a
desirable (chosen) and an undesirable (rejected) answer, ``2 * pairs`` examples in all. Ours reads the pairs
(``train_kto`` splits them itself); TRL gets the unpaired rows with the prompt rendered by the same chat template
(non-conversational, so TRL appends eos to the answer and tokenises as DPO's benchmark does). Shared settings:
batches of ``batch_size`` examples, one epoch, beta 0.1, desirable and undesirable weights 1, AdamW at
``LEARNING_RATE`` with 10% linear warm-up then linear decay, gradient clipping at 1, no weight decay, dropout
off, no activation checkpointing, fp32, the reference scored on every batch (no precomputed reference), the
KL reference point from each batch's mismatched prompt/answer pairs, LoRA r=16 / alpha 32 on every linear layer
(or all weights with a frozen reference copy).

What cannot be matched: the order of examples. TRL's KTO requires its sequential sampler (its mismatched answers
are fixed per batch when the data is prepared), while ours shuffles each epoch; the batches hold the same
number of examples either way. Tokens/s are trained tokens (each example's prompt and answer, eos included,
counted once; the mismatched answers both sides also score are not counted) per second of the training loop,
evaluation excluded.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

BETA = 0.1
LEARNING_RATE = 1e-3


def token_counts(model_path: str, rows_path: str, max_length: int) -> dict[str, int]:
    """Trained tokens (prompt + answer of every example, no padding) and scored (answer) tokens, by our
    tokenisation of the examples."""
    from preftune.model import modeling
    from preftune.train.kto import load_kto_features

    features = load_kto_features(rows_path, modeling.load_tokenizer(model_path), max_length)
    answers = sum(len(f["completion_ids"]) for f in features)
    prompts = sum(len(f["prompt_ids"]) for f in features)
    return {"useful_tokens": prompts + answers, "scored_tokens": answers, "examples": len(features)}


def run(
    impl: str,
    *,
    model: str = "tiny",
    pairs: int = 256,
    batch_size: int = 16,
    use_lora: bool = True,
    max_length: int = 256,
) -> dict[str, Any]:
    """One training run of ``impl`` (ours / trl): trained tokens, seconds and examples."""
    model_path = common.model_dir(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kto-"))
    train = common.write_jsonl(tmp / "train.jsonl", common.pair_rows(pairs))
    counts = token_counts(model_path, train, max_length)
    if impl == "ours":
        evalp = common.write_jsonl(tmp / "eval.jsonl", common.pair_rows(4))
        result = _ours(model_path, train, evalp, tmp, batch_size, use_lora, max_length)
    elif impl == "trl":
        result = _trl(model_path, train, tmp, batch_size, use_lora, max_length)
    else:
        raise ValueError(f"impl {impl!r}: ours or trl")
    result.update(counts)
    result["pairs"] = pairs
    return result


def _ours(model_path, train, evalp, tmp, batch_size, use_lora, max_length) -> dict[str, Any]:
    from preftune.train import kto

    durations: list[float] = []
    evaluate = kto.KTOTrainer.evaluate
    timer = common.Timer()

    def timed(self: Any, model: Any) -> dict[str, float]:
        before = timer.seconds
        try:
            return timer.wrap(evaluate)(self, model)
        finally:
            durations.append(timer.seconds - before)

    kto.KTOTrainer.evaluate = timed
    config = kto.KTOConfig(
        epochs=1,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        warmup_ratio=0.1,
        eval_steps=0,
        logging_steps=10**6,
        num_checkpoints=0,
        seed=0,
        precision="fp32",
    )
    try:
        metrics = kto.train_kto(model_path, train, evalp, str(tmp / "out"), str(tmp / "r.html"), config)
    finally:
        kto.KTOTrainer.evaluate = evaluate
    # the step-0 evaluation runs before the loop's clock starts; the end-of-epoch one inside it
    return {
        "seconds": metrics["train_seconds"] - sum(durations[1:]),
        "steps": metrics["steps"],
        "first_step_loss": metrics["first_step_loss"],
    }


def _trl(model_path, train, tmp, batch_size, use_lora, max_length) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import KTOConfig, KTOTrainer

    from preftune.model import modeling
    from preftune.model.templating import render_prompt

    tokenizer = modeling.load_tokenizer(model_path)
    rows = [json.loads(line) for line in Path(train).read_text().splitlines()]
    examples = []
    for r in rows:  # each pair as two unpaired examples, in the order our loader makes them
        prompt = render_prompt(tokenizer, r["prompt"])
        examples.append({"prompt": prompt, "completion": r["chosen"], "label": True})
        examples.append({"prompt": prompt, "completion": r["rejected"], "label": False})
    args = KTOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.0,
        beta=BETA,
        desirable_weight=1.0,
        undesirable_weight=1.0,
        max_length=max_length,
        precompute_ref_log_probs=False,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_dropout=True,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
    )
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if use_lora
        else None
    )
    trainer = KTOTrainer(
        model=modeling.load_causal_lm(model_path),
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "steps": out.global_step}
