"""End to end: `preftune run rlhf` through kfp.local on the bundled model and a slice of the bundled data."""

from __future__ import annotations

import pytest
import torch
from e2e import bundled_slice, run_cli

from preftune.model.modeling import load_reward_model, load_tokenizer
from preftune.model.scoring import score_texts

MAX_KL = 12.0


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small but real RLHF pipeline run, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("e2e-rlhf")
    params = {
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 600),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 800),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 24),
        "eval_fraction": 0.15,
        "sft_max_steps": 60,
        "reward_max_steps": 60,
        "ppo_iterations": 10,
        "ppo_max_kl": MAX_KL,
        "eval_max_prompts": 24,
        "eval_max_new_tokens": 32,
        "registry_uri": str(tmp / "registry"),
        "num_checkpoints": 2,
    }
    return run_cli("rlhf", params, tmp / "runs")


@pytest.mark.slow
def test_every_step_succeeded(rlhf_run: dict) -> None:
    steps = rlhf_run["steps"]
    assert rlhf_run["status"] == "SUCCEEDED"
    assert {
        "ingest",
        "preference-import",
        "sft",
        "reward-model",
        "ppo",
        "evaluate",
        "gate",
        "promote",
    } <= set(steps)
    # the branches of the other policy_optimizer values (grpo, rloo) are skipped
    assert all(step["status"] in ("SUCCEEDED", "SKIPPED") for step in steps.values())
    assert all(steps[name]["status"] == "SUCCEEDED" for name in ("ppo", "evaluate", "gate", "promote"))


@pytest.mark.slow
def test_reward_model_beats_chance_on_held_out_pairs(rlhf_run: dict) -> None:
    metrics = rlhf_run["steps"]["reward-model"]["metrics"]
    assert metrics["eval_accuracy"] > 0.75
    assert metrics["eval_accuracy"] > metrics["first_eval_accuracy"]


@pytest.mark.slow
def test_ppo_raises_reward_within_the_kl_bound(rlhf_run: dict) -> None:
    metrics = rlhf_run["steps"]["ppo"]["metrics"]
    assert metrics["iterations"] == 10
    assert metrics["reward_last"] > metrics["reward_first"]
    assert metrics["kl_blowups"] == 0
    assert 0 <= metrics["kl_max"] < MAX_KL


@pytest.mark.slow
def test_policy_beats_the_sft_model_under_the_reward_model(rlhf_run: dict) -> None:
    metrics = rlhf_run["steps"]["evaluate"]["metrics"]
    assert metrics["win_rate_vs_reference"] > 0.5
    assert metrics["judge_reward_candidate"] > metrics["judge_reward_reference"]
    assert 0.0 <= metrics["lc_win_rate_vs_reference"] <= 1.0
    # the reference, 2 snapshots and the final policy, each placed by the reward model
    assert metrics["frontier_points"] == 4


@pytest.mark.slow
def test_reward_artifact_scores_texts_on_its_own(rlhf_run: dict) -> None:
    reward_dir = rlhf_run["steps"]["reward-model"]["artifacts"]["model"]
    model = load_reward_model(reward_dir).eval()
    tokenizer = load_tokenizer(reward_dir)
    prompt = "What colour is the sky?"
    good, bad = "Sure! The sky is blue.", "Figure it out yourself."
    with torch.no_grad():
        scores = score_texts(model, tokenizer, [prompt, prompt], [good, bad])
    assert scores[0] > scores[1]
