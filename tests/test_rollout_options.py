"""Rollout speed options (issue 22): measured side by side by benchmarks/rollout.py, each checked against the
scoring pass, and the default of preftune.config.generation is the fastest that stays correct."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks import rollout
from preftune.config.generation import GenerationOptions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results-rollout.json"


def test_the_committed_measurement_checked_every_option_and_the_default_is_its_fastest_correct_one() -> None:
    result = json.loads(RESULTS.read_text(encoding="utf-8"))
    assert set(result["options"]) == set(rollout.OPTIONS)
    for name, row in result["options"].items():
        assert row["max_abs_diff"] <= rollout.BOUND, name  # sampled = scored within 1e-5, fp32
        assert row["correct"] and len(row["seconds"]) == result["turns"]
    fastest = result["fastest_correct"]
    assert fastest == min(result["options"], key=lambda n: result["options"][n]["run_seconds"])
    defaults = dataclasses.asdict(GenerationOptions())
    chosen = {k: defaults[k] for k in ("kv_cache", "compile_decode", "length_bucketing")}
    assert chosen == rollout.OPTIONS[fastest], (
        f"the defaults {chosen} are not the measured fastest correct option {fastest!r}"
    )
    assert result["bare_generate"]["same_tokens"] is True
    assert result["bare_generate"]["ratio"] >= rollout.BARE_GOAL


def test_options_are_timed_on_fresh_prompts_each_turn_and_checked_against_the_scoring_pass() -> None:
    names = ["dynamic cache", "dynamic cache + length bucketing"]
    result = rollout.run(turns=2, options=names)
    assert set(result["options"]) == set(names)
    for row in result["options"].values():
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"])
        assert 0 <= row["max_abs_diff_first"] <= rollout.BOUND
        assert 0 <= row["max_abs_diff_last"] <= rollout.BOUND
        assert row["correct"] is True
    assert result["fastest_correct"] in names


def test_break_even_counts_the_turns_a_compile_takes_to_pay_off() -> None:
    out = {
        "base": {"seconds": [1.0, 1.0, 1.0, 1.0]},
        "compiled": {"seconds": [11.0, 3.0, 0.5, 0.5]},  # 12 s extra over two turns, 0.5 s saved per turn
        "slower": {"seconds": [1.0, 1.0, 2.0, 2.0]},
    }
    rollout._break_even(out, "base")
    assert out["compiled"]["break_even_turns"] == 2 + 12 / 0.5
    assert out["slower"]["break_even_turns"] is None and out["base"]["break_even_turns"] is None
