"""End to end: `preftune run` with each policy method beyond PPO and offline DPO, on a slice of the bundled data.

RLHF with ``policy_optimizer`` grpo and rloo (the reward model's step feeds the chosen optimiser, whose model
and snapshots reach the evaluate step through ``dsl.OneOf``), and DPO with ``dpo_method`` kto (on thumbs
up/down feedback, which the import also writes as an unpaired set) and online_dpo (its own judge). Small step
counts: these check the wiring and that each method really trains, not how well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import EXAMPLES, bundled_slice, run_cli

from preftune.train.snapshots import read_index

TRAINING = {"sft_max_steps": 20, "eval_fraction": 0.2, "eval_max_prompts": 8, "eval_max_new_tokens": 16}


def _data(tmp: Path, preferences: str) -> dict:
    return {
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 200),
        "preference_data": preferences,
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 8),
        "num_checkpoints": 2,
        **TRAINING,
    }


def _thumbs(dest: Path, pairs: int) -> str:
    """Binary feedback made from the bundled pairs: each chosen answer a thumbs up, each rejected one a thumbs
    down, and a few prompts with an up-vote only (which give no pair, only unpaired examples)."""
    rows = []
    lines = (EXAMPLES / "data" / "preferences.jsonl").read_text(encoding="utf-8").splitlines()[:pairs]
    for i, line in enumerate(lines):
        pair = json.loads(line)
        rows.append({"prompt": pair["prompt"], "response": pair["chosen"], "label": True})
        if i % 10:
            rows.append({"prompt": pair["prompt"], "response": pair["rejected"], "label": False})
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(dest)


def _lineage(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "lineage.json").read_text(encoding="utf-8"))


def _ran(run: dict) -> set[str]:
    return {name for name, step in run["steps"].items() if step["status"] == "SUCCEEDED"}


def _check_policy_step(run: dict, step: str, stage: str, skipped: set[str]) -> dict:
    """The chosen step trained and its branch's evaluate step judged it; the other branches did not run."""
    assert run["status"] == "SUCCEEDED"
    ran = _ran(run)
    assert {"sft", "preference-import", step} <= ran
    assert not ran & skipped, ran & skipped
    artifacts = run["steps"][step]["artifacts"]
    assert _lineage(artifacts["model"])["stage"] == stage
    assert read_index(artifacts["checkpoints"]), "snapshots kept for the reward-vs-KL chart"
    (evaluation,) = [run["steps"][n] for n in ran if n.split("-")[0] == "evaluate"]
    assert evaluation["metrics"]["kl_candidate_reference"] >= -0.5  # measured (a sampled estimate)
    assert len([n for n in ran if n.split("-")[0] == "gate"]) == 1
    return run["steps"][step]["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["grpo", "rloo"])
def test_rlhf_with_a_critic_free_optimizer(optimizer: str, tmp_path: Path) -> None:
    params = {
        **_data(tmp_path, bundled_slice("preferences.jsonl", tmp_path / "prefs.jsonl", 300)),
        "reward_max_steps": 30,
        "policy_optimizer": optimizer,
        "grpo_iterations": 4,
        "grpo_num_generations": 4,
        "grpo_max_new_tokens": 16,
    }
    run = run_cli("rlhf", params, tmp_path / "runs")
    step = next(n for n, s in run["steps"].items() if s["display_name"] == optimizer.upper())
    metrics = _check_policy_step(run, step, optimizer, skipped={"ppo"})
    assert metrics["iterations"] == 4
    assert metrics["kl_last"] >= 0 and metrics["reward_last"] == metrics["reward_last"]


@pytest.mark.slow
def test_dpo_pipeline_with_kto_on_thumbs(tmp_path: Path) -> None:
    params = {
        **_data(tmp_path, _thumbs(tmp_path / "thumbs.jsonl", 300)),
        "preference_format": "binary",
        "dpo_method": "kto",
        "dpo_max_steps": 12,
    }
    run = run_cli("dpo", params, tmp_path / "runs")
    metrics = _check_policy_step(run, "kto", "kto", skipped={"dpo", "online-dpo"})
    imported = run["steps"]["preference-import"]["metrics"]
    assert imported["unpaired_train"] > imported["pairs_train"]  # up-votes without a down-vote count too
    assert metrics["train_examples"] == imported["unpaired_train"]
    assert metrics["steps"] == 12


@pytest.mark.slow
def test_dpo_pipeline_with_online_dpo(tmp_path: Path) -> None:
    params = {
        **_data(tmp_path, bundled_slice("preferences.jsonl", tmp_path / "prefs.jsonl", 300)),
        "dpo_method": "online_dpo",
        "reward_max_steps": 30,
        "online_dpo_rounds": 3,
        "online_dpo_num_generations": 4,
        "online_dpo_max_new_tokens": 16,
    }
    run = run_cli("dpo", params, tmp_path / "runs")
    metrics = _check_policy_step(run, "online-dpo", "online_dpo", skipped={"dpo", "kto"})
    assert metrics["iterations"] == 3 and metrics["pairs"] > 0
