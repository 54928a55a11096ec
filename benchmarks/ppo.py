"""PPO: preftune.train.ppo.train_ppo against TRL's RLOOTrainer (TRL has no PPO trainer now), same work.

Same SFT model, same reward model (a sequence classifier both load), the same pool of bundled prompts, the same
number of sampled sequences per iteration (32: ours 32 prompts x 1 sample; RLOO 16 prompts x 2, the fewest
samples per prompt its leave-one-out baseline allows), the same generation length (32 new tokens at most,
temperature 1, top-p 1, stop at eos), minibatches of 8 sequences, 2 passes over each batch, LoRA r=16 on both,
KL coefficient 0.05 against the adapter-disabled reference, lr 1e-3, fp32. RLOO has no critic, so per iteration
it trains one model where PPO trains two: the comparison is of the two algorithms as each library runs them.

Three measurements (``impl``):

- ``ours`` / ``trl``: a whole training run; sampled tokens (eos included, nothing after it) per second of the
  training loop, seconds per iteration and the share of it spent generating (ours: ``generate_rollout``;
  TRL: ``RLOOTrainer._generate``, i.e. prompt tokenisation, ``generate`` and decoding).
- ``rollout``: our ``generate_rollout`` against a bare KV-cached ``model.generate`` of the same policy on the same
  left-padded batch with the same generation settings and seed, alternating, in one process.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

LEARNING_RATE = 1e-3
KL_COEF = 0.05
#: Schedule shared by both sides: sequences per iteration, per optimisation step, passes, new tokens.
ROLLOUT, MINI, EPOCHS, NEW_TOKENS = 32, 8, 2, 32


def _prompt_rows(n: int) -> list[dict[str, Any]]:
    """Unique bundled prompts (chat messages), first ``n``."""
    rows, seen = [], set()
    for r in common.pair_rows(4 * n):
        key = json.dumps(r["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": r["prompt"]})
        if len(rows) == n:
            break
    return rows


def run(
    impl: str,
    *,
    model: str = "tiny",
    iterations: int = 4,
    prompts: int = 256,
    use_lora: bool = True,
    repeats: int = 5,
    levers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    model_path = common.model_dir(model)
    reward_path = common.reward_model_dir(model)
    if impl == "prepare":  # build the cached models outside any measured process
        return {"model": model_path, "reward_model": reward_path}
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    rows = _prompt_rows(prompts)
    if impl == "rollout":
        return _rollout(model_path, reward_path, rows, repeats)
    path = common.write_jsonl(tmp / "prompts.jsonl", rows)
    if impl == "ours":
        result = _ours(model_path, reward_path, path, tmp, iterations, use_lora, levers or {})
    else:
        result = _trl(model_path, reward_path, rows, tmp, iterations, use_lora)
    result["iterations"] = iterations
    result["seconds_per_iteration"] = result["seconds"] / iterations
    result["generation_share"] = result["generation_seconds"] / result["seconds"]
    result["useful_tokens"] = result["sampled_tokens"]
    result["examples"] = iterations * ROLLOUT  # sampled sequences
    return result


def _config(use_lora: bool, iterations: int, levers: dict[str, Any]) -> Any:
    from preftune.train import ppo

    return ppo.PPOConfig(
        iterations=iterations,
        rollout_batch_size=ROLLOUT,
        mini_batch_size=MINI,
        ppo_epochs=EPOCHS,
        learning_rate=LEARNING_RATE,
        critic_learning_rate=LEARNING_RATE,
        max_new_tokens=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        kl_coef=KL_COEF,
        use_lora=use_lora,
        kl_blowup=0.0,  # never stop early: both sides run every iteration
        max_approx_kl=0.0,
        seed=0,
        precision="fp32",
        **levers,
    )


def _ours(model_path, reward_path, prompts, tmp, iterations, use_lora, levers) -> dict[str, Any]:
    from preftune.train import ppo

    config = _config(use_lora, iterations, levers)
    metrics = ppo.train_ppo(model_path, reward_path, prompts, str(tmp / "out"), str(tmp / "r.html"), config)
    sampled = metrics["rollout_tokens_per_second"] * metrics["rollout_seconds"]
    return {
        "seconds": metrics["train_seconds"],
        "generation_seconds": metrics["rollout_seconds"],
        "sampled_tokens": round(sampled),
        "scored_tokens": metrics["train_tokens"],  # prompt + response, no padding, every iteration
        "ppo_epochs": EPOCHS,
        "reward_first": metrics["reward_first"],
        "reward_last": metrics["reward_last"],
    }


def _trl(model_path, reward_path, rows, tmp, iterations, use_lora) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RLOOConfig, RLOOTrainer

    from preftune.model import modeling

    counts = {"seconds": 0.0, "tokens": 0}

    class TimedRLOO(RLOOTrainer):
        """RLOOTrainer that times its generation step and counts the completion tokens it samples."""

        def _generate(self, prompts):  # noqa: ANN001, ANN202 - TRL's own signature
            start = time.perf_counter()
            out = super()._generate(prompts)
            counts["seconds"] += time.perf_counter() - start
            counts["tokens"] += sum(len(c) for c in out[1])
            return out

    tokenizer = modeling.load_tokenizer(model_path)
    reward = modeling.load_reward_model(reward_path)
    peft_config = (
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if use_lora
        else None
    )
    args = RLOOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=MINI,
        generation_batch_size=ROLLOUT,
        num_generations=2,
        num_iterations=EPOCHS,
        max_steps=iterations * (ROLLOUT // MINI) * EPOCHS,  # one generation round per iteration
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=KL_COEF,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is on; ours does not checkpoint
        disable_dropout=True,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        bf16=False,
        dataloader_num_workers=0,
    )
    trainer = TimedRLOO(
        model=modeling.load_causal_lm(model_path),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),  # conversational prompts: TRL applies the same chat template
        processing_class=tokenizer,
        reward_processing_classes=modeling.load_tokenizer(reward_path),
        peft_config=peft_config,
    )
    out = trainer.train()
    return {
        "seconds": out.metrics["train_runtime"],
        "generation_seconds": counts["seconds"],
        "sampled_tokens": counts["tokens"],
        "steps": out.global_step,
    }


def _rollout(model_path, reward_path, rows, repeats) -> dict[str, Any]:
    """Our rollout (prompt batching, generate, eos masking, decoding) against bare ``generate`` on its batch."""
    import torch

    from preftune.model import modeling
    from preftune.model.templating import _prompt_keep, render_prompt
    from preftune.train import ppo

    config = _config(True, 1, {})
    policy, _, _, _ = ppo.load_models(model_path, reward_path, config)
    tokenizer = modeling.load_tokenizer(model_path)
    eos_ids = [tokenizer.eos_token_id]
    declared = policy.generation_config.eos_token_id
    for token in declared if isinstance(declared, list) else [declared]:
        if token is not None and token not in eos_ids:
            eos_ids.append(token)
    messages = [r["prompt"] for r in rows[:ROLLOUT]]
    encoded = [
        _prompt_keep(
            list(tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"]),
            config.max_prompt_length,
            tokenizer.bos_token_id,
        )
        for m in messages
    ]
    device = torch.device("cpu")
    eos = set(eos_ids)

    # The bare call gets exactly what our rollout hands to generate: its batch and its generation config.
    captured: dict[str, Any] = {}
    generate = policy.generate

    def spy(**kwargs: Any) -> Any:
        captured.update(kwargs)
        return generate(**kwargs)

    policy.generate = spy
    ppo.generate_rollout(policy, tokenizer, messages, encoded, config, eos_ids, device)
    policy.generate = generate
    width = captured["input_ids"].shape[1]

    def ours() -> int:
        rollout = ppo.generate_rollout(policy, tokenizer, messages, encoded, config, eos_ids, device)
        return int(rollout.response_mask.sum())

    def bare() -> int:
        with torch.no_grad():
            out = policy.generate(**captured)
        tokens = 0
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in eos), None)
            tokens += len(row) if end is None else end + 1
        return tokens

    policy.eval()
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    tokens: dict[str, list[int]] = {"ours": [], "bare": []}
    ours(), bare()  # warm-up
    for i in range(repeats):
        for name in ("ours", "bare") if i % 2 == 0 else ("bare", "ours"):
            torch.manual_seed(i)  # the same samples for both: the same work
            start = time.perf_counter()
            tokens[name].append((ours if name == "ours" else bare)())
            times[name].append(time.perf_counter() - start)
    rates = {k: [n / t for n, t in zip(tokens[k], times[k], strict=True)] for k in times}
    ratios = [o / b for o, b in zip(rates["ours"], rates["bare"], strict=True)]
    return {
        "ours_tokens_per_s": statistics.median(rates["ours"]),
        "bare_tokens_per_s": statistics.median(rates["bare"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "same_tokens": tokens["ours"] == tokens["bare"],
        "tokens": tokens["ours"],
        "repeats": repeats,
    }
