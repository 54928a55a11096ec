"""The GRPO, RLOO and KTO benchmark scenarios (issue 19) run both sides at a tiny size and measure the same work:
positive token counts, the same number of sampled answers or trained examples on each side. No timings are judged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks package sits at the repo root
from benchmarks import grpo, kto  # noqa: E402
from benchmarks.__main__ import FULL, QUICK, merge  # noqa: E402

pytest.importorskip("trl")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_rl_scenario_samples_as_many_answers_on_both_sides(estimator: str) -> None:
    sizes = {"estimator": estimator, "iterations": 1, "prompts": 4, "generations": 2}
    ours, trl = grpo.run("ours", **sizes), grpo.run("trl", **sizes)
    for result in (ours, trl):
        assert result["useful_tokens"] > 0 and result["sampled_tokens"] == result["useful_tokens"]
        assert result["seconds"] > 0 and 0 < result["generation_share"] <= 1
    assert ours["examples"] == trl["examples"] == 4 * 2
    assert trl["steps"] == 1  # 8 answers in minibatches of 8: one optimiser step, as ours


@pytest.mark.parametrize("use_lora", [True, False])
def test_kto_scenario_trains_the_same_examples_on_both_sides(use_lora: bool) -> None:
    ours, trl = kto.run("ours", pairs=8, use_lora=use_lora), kto.run("trl", pairs=8, use_lora=use_lora)
    for result in (ours, trl):
        assert result["useful_tokens"] > result["scored_tokens"] > 0 and result["seconds"] > 0
    assert ours["examples"] == trl["examples"] == 16
    assert ours["useful_tokens"] == trl["useful_tokens"]
    assert ours["steps"] == trl["steps"] == 1


def test_the_reward_reads_text_and_trls_conversational_completions() -> None:
    text = "one two three"
    assert grpo.reward([None], [text]) == grpo.reward([None], [[{"role": "assistant", "content": text}]])


def test_group_rl_and_kto_rows_are_registered_with_issue_19s_goals() -> None:
    for table in (FULL, QUICK):
        for name in ("grpo-lora", "rloo-lora", "kto-lora", "kto-full"):
            task, kwargs, goal, memory = table[name]
            assert task == ("kto" if name.startswith("kto") else "grpo") and (goal, memory) == (1.5, 1.0)
        assert table["rloo-lora"][1]["estimator"] == "rloo"
    assert {f"grpo-lora-125m-t{n}" for n in (1, 2)} <= set(FULL)


def test_merge_replaces_rows_of_the_same_name_and_keeps_the_others() -> None:
    committed = {
        "rows": [{"scenario": "dpo-lora", "v": 1}, {"scenario": "kto-lora", "v": 1}],
        "gate": {"dpo": {"ok": True}},
        "ceilings": {"tiny@1": 1},
        "machine": "full run",
    }
    partial = {
        "rows": [{"scenario": "grpo-lora", "v": 2}, {"scenario": "kto-lora", "v": 2}],
        "gate": {"dpo": {"ok": False}},
        "ceilings": {"125m@1": 2},
        "machine": "partial run",
        "repeats": 5,
        "threads": 1,
        "forked": False,
        "seconds": 9.0,
    }
    out = merge(committed, partial)
    assert [(r["scenario"], r["v"]) for r in out["rows"]] == [
        ("dpo-lora", 1),
        ("kto-lora", 2),
        ("grpo-lora", 2),
    ]
    assert out["machine"] == "full run" and out["gate"] == {"dpo": {"ok": True}}
    assert out["ceilings"] == {"tiny@1": 1, "125m@1": 2}
    assert out["merged"][0]["scenarios"] == ["grpo-lora", "kto-lora"]
    assert out["merged"][0]["machine"] == "partial run"
