"""Rollout speed options side by side: ``python -m benchmarks.rollout [--model tiny|125m] [--turns 6]``.

One process, so every option runs under the same machine load: the PPO benchmark's policy (LoRA r=16 on the
model), 32 new tokens at most, temperature 1, top-p 1. A turn is one PPO-like iteration: ``PROMPTS`` prompts
never seen before (so prompt widths, and with them the shapes a compiled decode step sees, change as they do
between iterations), cut into generate batches of ``BATCH`` (so batching by length has batches to reorder). In
each turn every option set of :data:`OPTIONS` samples the same prompts with the same seed, the order of the
options alternating between turns. Turn 0 is the first iteration of a run: it pays ``torch.compile``'s first
compile. Reported per option: sampled tokens per second over turns 1.. (median), the first turn's seconds, and
the whole run's seconds (every turn, compiles included) as a PPO run of that many iterations would spend them.

Correctness, per option, on the first turn and on one more fresh turn after the timed ones (after any recompile
for new shapes): every sampled token's log-prob as the sampler computed it against the scoring pass
(``ppo.rollout.policy_logprobs``: packed rows, LM head on response positions, as ``score_rollout``), fp32, within
``BOUND``. The default of ``preftune.config.generation`` is the correct option with the shortest run.

Then our ``generate_rollout`` with the default options against a bare ``policy.generate`` called with exactly the
batch and generation config our rollout passes it (captured), same seed, alternating (goal >= ``BARE_GOAL``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks import common

#: Sampled log-probs against the scoring pass, fp32 (issue 22).
BOUND = 1e-5
#: Our rollout against a bare ``generate`` on the same batch (issue 22).
BARE_GOAL = 0.95
PROMPTS, BATCH = 64, 16
#: name -> generation options (preftune.config.generation fields, every speed option named)
OPTIONS: dict[str, dict[str, Any]] = {
    "dynamic cache": {"kv_cache": "dynamic", "compile_decode": False, "length_bucketing": False},
    "static cache": {"kv_cache": "static", "compile_decode": False, "length_bucketing": False},
    "static cache + compiled decode": {
        "kv_cache": "static",
        "compile_decode": True,
        "length_bucketing": False,
    },
    "dynamic cache + length bucketing": {
        "kv_cache": "dynamic",
        "compile_decode": False,
        "length_bucketing": True,
    },
}
#: Not in the default set: transformers caches the compiled decode step on the model, so a second compiled option
#: in the same process would reuse (and pay for) the first one's compiles. Run it alone with ``--options``.
EXTRA: dict[str, dict[str, Any]] = {
    "static + compiled + bucketing": {"kv_cache": "static", "compile_decode": True, "length_bucketing": True},
}


def _with_options(config: Any, options: dict[str, Any]) -> Any:
    """``config`` carrying the generation fields ``options`` (as a stage config declaring them would)."""
    out = dataclasses.replace(config)
    for key, value in options.items():
        object.__setattr__(out, key, value)
    return out


def _encode(tokenizer: Any, messages: list[Any], config: Any) -> list[list[int]]:
    from preftune.model.templating import _prompt_keep, render_prompt

    return [
        _prompt_keep(
            list(tokenizer(render_prompt(tokenizer, m), add_special_tokens=False)["input_ids"]),
            config.max_prompt_length,
            tokenizer.bos_token_id,
        )
        for m in messages
    ]


def _setup(model: str, prompts: int) -> tuple[Any, Any, Any, list[Any], list[list[int]], list[int]]:
    from benchmarks.ppo import _config, _prompt_rows
    from preftune.model import modeling
    from preftune.model.sampling import eos_ids_of
    from preftune.train.loop import disable_dropout, lora_options

    config = dataclasses.replace(_config(True, 1, {}), forward_batch_size=BATCH)
    # the PPO trainer's policy (ppo.load_models), without the critic and reward model it does not sample with
    policy = modeling.prepare_for_training(common.model_dir(model), **lora_options(config))
    disable_dropout(policy)
    policy.config.use_cache = False
    tokenizer = modeling.load_tokenizer(common.model_dir(model))
    messages = [r["prompt"] for r in _prompt_rows(prompts)]
    return (
        config,
        policy,
        tokenizer,
        messages,
        _encode(tokenizer, messages, config),
        eos_ids_of(tokenizer, policy),
    )


def _check(sample: Any, policy: Any, tokenizer: Any, config: Any) -> float:
    """Largest |sampled - scored| log-prob over the sampled tokens of ``sample``."""
    from preftune.train.ppo import rollout as ppo_rollout

    scored = ppo_rollout.policy_logprobs(sample, policy, tokenizer, config)
    mask = sample.response_mask.bool()
    return float((sample.sampled_logprobs - scored)[mask].abs().max())


def run(impl: str = "", *, model: str = "tiny", turns: int = 6, options: list[str] | None = None) -> dict:
    """Every option set of ``options`` (default: all) timed in turns and checked; see the module docstring."""
    import torch

    from preftune.train.ppo import rollout as ppo_rollout

    names = options or list(OPTIONS)
    config, policy, tokenizer, messages, encoded, eos_ids = _setup(model, PROMPTS * (turns + 1))
    known = {**OPTIONS, **EXTRA}
    configs = {n: _with_options(config, known[n]) for n in names}
    device = torch.device("cpu")

    def once(name: str, turn: int, logprobs: bool = False) -> tuple[Any, float]:
        part = slice(turn * PROMPTS, (turn + 1) * PROMPTS)
        torch.manual_seed(1000 + turn)
        start = time.perf_counter()
        sample = ppo_rollout.generate_rollout(
            policy,
            tokenizer,
            messages[part],
            encoded[part],
            configs[name],
            eos_ids,
            device,
            logprobs=logprobs,
        )
        return sample, time.perf_counter() - start

    out: dict[str, dict[str, Any]] = {n: {"options": known[n], "seconds": [], "rates": []} for n in names}
    for turn in range(turns):
        for name in names if turn % 2 == 0 else list(reversed(names)):
            sample, seconds = once(name, turn, logprobs=turn == 0)
            out[name]["seconds"].append(seconds)
            out[name]["rates"].append(int(sample.response_mask.sum()) / seconds)
            if turn == 0:
                out[name]["max_abs_diff_first"] = _check(sample, policy, tokenizer, configs[name])
    for name in names:  # a fresh turn after the timed ones: numerics after any recompile for new shapes
        sample, _ = once(name, turns, logprobs=True)
        row = out[name]
        row["max_abs_diff_last"] = _check(sample, policy, tokenizer, configs[name])
        row["max_abs_diff"] = max(row["max_abs_diff_first"], row["max_abs_diff_last"])
        row["correct"] = row["max_abs_diff"] <= BOUND
        row["first_turn_seconds"] = row["seconds"][0]
        row["run_seconds"] = sum(row["seconds"])
        row["tokens_per_s"] = statistics.median(row["rates"][1:] or row["rates"])
    _break_even(out, names[0])
    correct = [n for n in names if out[n]["correct"]]
    fastest = min(correct, key=lambda n: out[n]["run_seconds"]) if correct else None
    steady = max(correct, key=lambda n: out[n]["tokens_per_s"]) if correct else None
    return {
        "model": model,
        "prompts_per_turn": PROMPTS,
        "batch": BATCH,
        "turns": turns,
        "bound": BOUND,
        "threads": torch.get_num_threads(),
        "options": out,
        "fastest_correct": fastest,
        "fastest_correct_steady_state": steady,
    }


def _break_even(out: dict[str, dict[str, Any]], base: str) -> None:
    """Per option, the run length (turns) from which it beats ``base`` in total time: its extra seconds over the
    first two turns (compiles) over its saving per later turn (``None``: it never catches up)."""
    later = {n: statistics.median(row["seconds"][2:] or row["seconds"]) for n, row in out.items()}
    for name, row in out.items():
        extra = sum(row["seconds"][:2]) - sum(out[base]["seconds"][:2])
        saving = later[base] - later[name]
        row["break_even_turns"] = None if name == base or saving <= 0 else max(2.0, 2 + extra / saving)


def bare_ratio(
    model: str = "tiny", repeats: int = 7, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Our ``generate_rollout`` against a bare ``policy.generate`` on the batch and generation config our
    rollout hands it (captured), one batch of ``BATCH`` prompts, same seed, alternating; median of the ratios.
    ``options`` (default: the stage defaults) ride on the config."""
    import torch

    from preftune.train.ppo import rollout as ppo_rollout

    config, policy, tokenizer, messages, encoded, eos_ids = _setup(model, BATCH * (repeats + 1))
    config = _with_options(config, options or {})
    device, eos = torch.device("cpu"), set(eos_ids)
    captured: dict[str, Any] = {}
    generate = policy.generate

    def spy(**kwargs: Any) -> Any:
        captured.update(kwargs)
        return generate(**kwargs)

    def ours(turn: int) -> int:
        part = slice(turn * BATCH, (turn + 1) * BATCH)
        rollout = ppo_rollout.generate_rollout(
            policy, tokenizer, messages[part], encoded[part], config, eos_ids, device
        )
        return int(rollout.response_mask.sum())

    def bare(turn: int) -> int:
        with torch.no_grad():
            out = generate(**batches[turn])
        width = batches[turn]["input_ids"].shape[1]
        return sum(
            next((k + 1 for k, t in enumerate(row) if t in eos), len(row)) for row in out[:, width:].tolist()
        )

    batches = []
    policy.generate = spy
    for turn in range(repeats + 1):  # capture each turn's batch (and warm up, compile included)
        ours(turn)
        batches.append(dict(captured))
    policy.generate = generate
    bare(0)
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    tokens: dict[str, list[int]] = {"ours": [], "bare": []}
    for turn in range(1, repeats + 1):
        for name in ("ours", "bare") if turn % 2 else ("bare", "ours"):
            torch.manual_seed(turn)  # the same samples for both: the same work
            start = time.perf_counter()
            tokens[name].append((ours if name == "ours" else bare)(turn))
            times[name].append(time.perf_counter() - start)
    rates = {k: [n / t for n, t in zip(tokens[k], times[k], strict=True)] for k in times}
    ratios = [o / b for o, b in zip(rates["ours"], rates["bare"], strict=True)]
    ratio = statistics.median(ratios)
    return {
        "options": options or {},
        "ours_tokens_per_s": statistics.median(rates["ours"]),
        "bare_tokens_per_s": statistics.median(rates["bare"]),
        "ratio": ratio,
        "ratios": ratios,
        "same_tokens": tokens["ours"] == tokens["bare"],
        "goal": BARE_GOAL,
        "met": ratio >= BARE_GOAL,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nrollout options ({result['model']} model, {result['turns']} turns of {result['prompts_per_turn']} "
        f"new prompts in batches of {result['batch']}, {result['threads']} thread(s)):"
    )
    print(
        f"  {'options':<34}{'tok/s':>8}{'turn 0 s':>10}{'run s':>8}{'pays off':>10}  max |sampled - scored|"
    )
    for name, row in result["options"].items():
        mark = " <- default (shortest correct run)" if name == result["fastest_correct"] else ""
        print(
            f"  {name:<34}{row['tokens_per_s']:>8.0f}{row['first_turn_seconds']:>10.2f}{row['run_seconds']:>8.2f}"
            f"{_turns(row['break_even_turns']):>10}"
            f"  {row['max_abs_diff']:.1e} {'OK' if row['correct'] else 'WRONG'}{mark}"
        )
    bare = result.get("bare_generate")
    if bare:
        print(
            f"  rollout vs bare generate (default options): {bare['ratio']:.2f}x ({bare['ours_tokens_per_s']:.0f} "
            f"vs {bare['bare_tokens_per_s']:.0f} tok/s, same samples: {bare['same_tokens']}; goal >= "
            f"{bare['goal']}x: {'MET' if bare['met'] else 'MISSED'})"
        )


def _turns(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} it."


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--options", default="", help="comma-separated names of OPTIONS (default: all)")
    parser.add_argument("--bare-repeats", type=int, default=7, help="0 skips the bare generate comparison")
    parser.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results-rollout.json"))
    args = parser.parse_args(argv)
    common.set_threads()
    started, load = time.time(), os.getloadavg()[0]
    result = run(
        model=args.model, turns=args.turns, options=[o for o in args.options.split(",") if o] or None
    )
    if args.bare_repeats:
        result["bare_generate"] = bare_ratio(args.model, args.bare_repeats)
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0],
    }
    result["seconds"] = time.time() - started
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
