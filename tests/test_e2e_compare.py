"""End to end: `preftune run compare` through kfp.local, three of the six methods from one SFT model, judged alike;
the other three run their stand-in step, and the compare step reads each method through dsl.OneOf."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e import bundled_slice, run_cli

from preftune.model.modeling import read_lineage

FIGURES = (
    "wall_seconds", "gpu_hours", "train_tokens", "peak_memory_mb", "judge_reward", "win_rate_vs_sft",
    "lc_win_rate_vs_sft", "kl_to_sft", "distinct_2", "diversity_ratio_vs_sft", "mean_length",
)  # fmt: skip


#: The evaluate steps of DPO, RLHF and KTO (the compiler numbers them in the pipeline's method order).
EVALUATIONS = ("evaluate", "evaluate-2", "evaluate-5")


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("e2e-compare")
    params = {
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 400),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 480),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 12),
        "eval_fraction": 0.2,
        "sft_max_steps": 20,
        "dpo_max_steps": 12,
        "dpo_learning_rate": 1e-3,
        "reward_max_steps": 20,
        "ppo_iterations": 4,
        "ppo_rollout_batch_size": 16,
        "num_checkpoints": 1,
        "eval_max_prompts": 8,
        "eval_max_new_tokens": 16,
        "methods": "kto, rlhf,dpo",
    }
    return run_cli("compare", params, tmp / "runs")


@pytest.mark.slow
def test_the_chosen_branches_ran_from_the_same_sft_model(compare_run: dict) -> None:
    steps = compare_run["steps"]
    assert compare_run["status"] == "SUCCEEDED"
    ran = {name for name, step in steps.items() if step["status"] == "SUCCEEDED"}
    assert {"choose-methods", "sft", "dpo", "reward-model", "ppo", "kto", "compare", *EVALUATIONS} <= ran
    assert not {"grpo", "grpo-2", "online-dpo"} & ran  # switched off: their stand-ins ran instead
    skipped = sorted(steps[n]["outputs"]["Output"] for n in ran if n.startswith("skip-method"))
    assert skipped == ["grpo skipped", "online_dpo skipped", "rloo skipped"]
    sft = steps["sft"]["artifacts"]["model"]
    for stage in ("dpo", "reward-model", "ppo", "kto"):
        assert read_lineage(steps[stage]["artifacts"]["model"])["parent"] == sft, stage
    # every evaluation: the same prompts, the same reference and judge (the pipeline's reward model)
    rows = [
        [json.loads(x) for x in Path(steps[e]["artifacts"]["generations"]).read_text().splitlines()]
        for e in EVALUATIONS
    ]
    for other in rows[1:]:
        assert [r["prompt"] for r in other] == [r["prompt"] for r in rows[0]] and len(other) == 8
        assert [r["reference"] for r in other] == [r["reference"] for r in rows[0]]  # same seed: same answers
        # the same judge: the SFT answers get the same rewards (up to float noise from how texts were batched)
        assert [r["reference_reward"] for r in other] == pytest.approx(
            [r["reference_reward"] for r in rows[0]], abs=1e-4
        )


@pytest.mark.slow
def test_the_report_has_every_figure_for_the_chosen_methods(compare_run: dict) -> None:
    comparison = compare_run["steps"]["compare"]
    metrics = comparison["metrics"]
    for figure in FIGURES:
        for method in ("dpo", "rlhf", "kto"):
            assert f"{method}_{figure}" in metrics, f"{method}_{figure}"
    assert not any(k.startswith(("grpo_", "rloo_", "online_dpo_")) for k in metrics)
    assert (
        metrics["rlhf_wall_seconds"] > 0
        and metrics["dpo_train_tokens"] > 0
        and metrics["kto_train_tokens"] > 0
    )
    for a, b in (("dpo", "rlhf"), ("dpo", "kto"), ("rlhf", "kto")):
        assert metrics[f"{a}_win_rate_vs_{b}"] + metrics[f"{b}_win_rate_vs_{a}"] == pytest.approx(1.0)
    assert metrics["head_to_head_prompts"] == 8
    html = Path(comparison["artifacts"]["report"]).read_text(encoding="utf-8")
    for section in ("Verdict", "Side by side", "Head to head under the judge", "Reward vs KL over training"):
        assert section in html
    assert "favours RLHF" in html  # no independent judge was given


@pytest.mark.slow
def test_the_verdict_is_an_output_and_printed(compare_run: dict) -> None:
    sentences = compare_run["steps"]["compare"]["outputs"]["Output"].splitlines()
    assert len(sentences) >= 3 and any("head to head" in s or "prefers" in s for s in sentences), sentences
    printed = compare_run["printed"]
    for sentence in sentences:
        assert sentence in printed
    assert "rlhf_win_rate_vs_dpo = " in printed  # the compare step's headline metrics
    assert printed.count(" win_rate_vs_reference = ") == 3  # every evaluation's headline (not lc_...)
