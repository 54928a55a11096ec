"""The alignment benchmark's tasks and its reading of a finished run (benchmarks/alignment*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.alignment import format_row, measure_run, score_generations
from benchmarks.alignment_tasks import TASKS, make_task_data


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_pairs_follow_the_outside_scorer_and_held_out_subjects_are_new(name: str) -> None:
    task = TASKS[name]
    data = make_task_data(task, n_sft=40, n_pairs=40, n_eval_prompts=10, n_corpus=20)
    score = task.scorer()
    for pair in data.train_pairs + data.eval_pairs:
        assert score(pair["chosen"]) >= score(pair["rejected"]) + task.min_gap
    train_prompts = {row["prompt"][0]["content"] for row in data.sft + data.train_pairs}
    held_out = {row["prompt"] for row in data.eval_prompts}
    assert len(data.eval_pairs) == 4 and len(data.eval_prompts) == 10
    assert not held_out & train_prompts
    spread = [score(row["completion"]) for row in data.sft]
    assert max(spread) - min(spread) > 2 * task.min_gap  # the SFT answers span the scorer's range
    assert make_task_data(task, n_sft=40, n_pairs=40, n_eval_prompts=10, n_corpus=20).sft == data.sft


def _write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")


def test_a_finished_run_becomes_one_table_row(tmp_path: Path) -> None:
    run = tmp_path / "preftune-rlhf-x"
    generations = [
        {"prompt": "p1", "candidate": "good good", "reference": "bad"},
        {"prompt": "p2", "candidate": "good", "reference": "good"},
        {"prompt": "p3", "candidate": "bad", "reference": "good good"},
        {"prompt": "p4", "candidate": "good good good", "reference": "bad"},
    ]
    (run / "evaluate-2").mkdir(parents=True)
    (run / "evaluate-2" / "generations").write_text("".join(json.dumps(r) + "\n" for r in generations))
    _write(
        run / "evaluate-2" / "metrics",
        {"kl_candidate_reference": 4.5, "diversity_ratio_vs_reference": 0.9, "selected_step": 6.0,
         "selected_final": 0.0},
    )  # fmt: skip
    checks = [
        {"name": "kl_candidate_reference", "passed": True},
        {"name": "diversity_ratio", "passed": False},
    ]
    _write(run / "gate-2" / "decision", {"promote": False, "checks": checks})
    # the reward model step was cached: its metrics are in the run's summary, not in a directory of the run
    steps = {"reward-model": {"status": "SUCCEEDED", "metrics": {"eval_accuracy": 0.97}}}
    _write(run / "summary.json", {"status": "SUCCEEDED", "duration_seconds": 61.0, "steps": steps})

    def scorer(text: str) -> float:
        return text.count("good") - text.count("bad")

    row = measure_run(run, scorer)
    assert row["prompts"] == 4
    assert row["scorer_sft"] == pytest.approx((-1 + 1 + 2 - 1) / 4)
    assert row["scorer_lift"] == pytest.approx((2 + 1 - 1 + 3) / 4 - 0.25)
    assert row["scorer_win_rate"] == pytest.approx((2 + 0.5) / 4)  # a tie counts half
    assert (row["kl"], row["distinct_2_ratio"], row["reward_model_accuracy"]) == (4.5, 0.9, 0.97)
    assert row["promoted"] is False and row["refused_by"] == ["diversity_ratio"]
    line = format_row({"task": "t", "method": "rlhf", **row})
    assert "| step 6 | refused: diversity_ratio | 61 |" in line
    assert score_generations(run / "evaluate-2" / "generations", scorer)["scorer_policy"] == 1.25


def test_a_run_without_an_evaluate_step_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    with pytest.raises(RuntimeError, match="expected one evaluate step"):
        measure_run(tmp_path / "run", len)


def test_results_of_one_method_join_those_of_the_others() -> None:
    from benchmarks.alignment import merge

    def row(task: str, method: str, lift: float) -> dict:
        return {"task": task, "method": method, "scorer_lift": lift}

    first = merge({}, [row("b", "rlhf", 1.0), row("b", "dpo", 2.0), row("a", "dpo", 3.0)], 60.0, seed=0)
    assert [(r["task"], r["method"]) for r in first["rows"]] == [("a", "dpo"), ("b", "dpo"), ("b", "rlhf")]
    second = merge(first, [row("b", "dpo", 5.0), row("b", "kto", 4.0)], 30.0, seed=0)
    assert [(r["method"], r["scorer_lift"]) for r in second["rows"] if r["task"] == "b"] == [
        ("dpo", 5.0), ("rlhf", 1.0), ("kto", 4.0),
    ]  # fmt: skip
    assert second["seconds"] == 90.0
    other_settings = merge(first, [row("b", "kto", 4.0)], 30.0, seed=1)
    assert other_settings["rows"] == [row("b", "kto", 4.0)]
