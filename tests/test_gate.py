"""The promotion gate: each check against its threshold, and the `dsl.If` branch it drives under kfp.local."""

import json
import math
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from preftune.components.champion.component import champion as champion_op
from preftune.components.gate.component import gate as gate_op
from preftune.components.promote.component import promote as promote_op
from preftune.eval.gate import decide, run_gate
from preftune.io import registry
from preftune.orchestration.runner import SKIPPED, SUCCEEDED, format_summary, run_pipeline

THRESHOLDS = {
    "min_win_rate_vs_champion": 0.5,
    "max_kl": 5.0,
    "min_diversity_ratio": 0.8,
    "min_judge_confirmation": 0.5,
    "length_controlled": False,
}
GOOD = {
    "win_rate_vs_champion": 0.6,
    "kl_candidate_reference": 2.0,
    "distinct_2_candidate": 0.45,
    "distinct_2_reference": 0.5,
}


def _check(decision: dict, name: str) -> dict:
    return next(c for c in decision["checks"] if c["name"] == name)


def test_everything_within_thresholds_promotes() -> None:
    decision = decide(GOOD, **THRESHOLDS)
    assert decision["promote"] is True
    assert [c["name"] for c in decision["checks"]] == [
        "win_rate_vs_champion",
        "kl_candidate_reference",
        "diversity_ratio",
        "judge_confirmation",
    ]
    assert all(c["passed"] for c in decision["checks"])
    assert _check(decision, "diversity_ratio")["value"] == pytest.approx(0.9)
    assert _check(decision, "kl_candidate_reference")["threshold"] == 5.0
    assert "no held-out judge" in _check(decision, "judge_confirmation")["reason"]
    assert len(decision["reasons"]) == 4
    json.dumps(decision)


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"win_rate_vs_champion": 0.49}, "win_rate_vs_champion"),
        ({"kl_candidate_reference": 5.01}, "kl_candidate_reference"),
        ({"distinct_2_candidate": 0.39}, "diversity_ratio"),  # 0.39 / 0.5 = 0.78 < 0.8
    ],
)
def test_each_threshold_blocks_on_its_own(change: dict, failing: str) -> None:
    decision = decide({**GOOD, **change}, **THRESHOLDS)
    assert decision["promote"] is False
    assert [c["name"] for c in decision["checks"] if not c["passed"]] == [failing]


def test_the_gate_refuses_a_reward_hacked_candidate() -> None:
    """Training reward model up, held-out judge flat: the gain is not confirmed, so no promotion -- even though
    KL, diversity and the win rate all pass."""
    hacked = {**GOOD, "judge_reward_gain": 1.2, "heldout_reward_gain": 0.02}
    decision = decide(hacked, **THRESHOLDS)
    assert decision["promote"] is False
    check = _check(decision, "judge_confirmation")
    assert check["value"] == pytest.approx(0.02 / 1.2) and not check["passed"]
    assert "possible reward hacking" in check["reason"]
    assert [c["name"] for c in decision["checks"] if not c["passed"]] == ["judge_confirmation"]
    # the same gain confirmed by the held-out judge (0.7 / 1.2 >= 0.5) promotes
    assert decide({**hacked, "heldout_reward_gain": 0.7}, **THRESHOLDS)["promote"] is True
    # a judge gain too small to matter is nothing to confirm; a negative threshold turns the check off
    assert decide({**hacked, "judge_reward_gain": 0.05}, **THRESHOLDS)["promote"] is True
    assert decide(hacked, **{**THRESHOLDS, "min_judge_confirmation": -1})["promote"] is True
    # a broken held-out measurement fails rather than passes
    assert decide({**hacked, "heldout_reward_gain": math.nan}, **THRESHOLDS)["promote"] is False


def test_boundaries_are_inclusive() -> None:
    at_limits = {
        **GOOD,
        "win_rate_vs_champion": 0.5,
        "kl_candidate_reference": 5.0,
        "distinct_2_candidate": 0.4,
    }
    assert decide(at_limits, **THRESHOLDS)["promote"] is True


def test_length_controlled_gate_sees_through_longer_answers() -> None:
    # the judge prefers the candidate 0.6 of the time, but at equal length it would lose
    metrics = {**GOOD, "lc_win_rate_vs_champion": 0.42}
    assert decide(metrics, **THRESHOLDS, has_champion=True)["promote"] is True
    decision = decide(metrics, **{**THRESHOLDS, "length_controlled": True}, has_champion=True)
    assert decision["promote"] is False
    check = _check(decision, "lc_win_rate_vs_champion")
    assert check["value"] == 0.42 and "0.42 < 0.5" in check["reason"]
    # a champion exists but the evaluation had no judge: the reason says what to do
    missing = decide(GOOD, **{**THRESHOLDS, "length_controlled": True}, has_champion=True)
    assert missing["promote"] is False
    assert "give it a judge" in _check(missing, "lc_win_rate_vs_champion")["reason"]


def test_no_champion_yet_passes_the_win_rate_check() -> None:
    metrics = {k: v for k, v in GOOD.items() if k != "win_rate_vs_champion"}
    decision = decide(metrics, **THRESHOLDS)
    assert decision["promote"] is True
    check = _check(decision, "win_rate_vs_champion")
    assert check["passed"] and "no champion yet" in check["reason"] and check["value"] is None
    # but when a champion exists, the comparison is required
    required = decide(metrics, **THRESHOLDS, has_champion=True)
    assert required["promote"] is False
    assert "missing metric win_rate_vs_champion" in _check(required, "win_rate_vs_champion")["reason"]


@pytest.mark.parametrize(
    "missing", ["kl_candidate_reference", "distinct_2_candidate", "distinct_2_reference"]
)
def test_missing_required_metric_says_no_with_the_reason(missing: str) -> None:
    decision = decide({k: v for k, v in GOOD.items() if k != missing}, **THRESHOLDS)
    assert decision["promote"] is False
    assert any(f"missing metric {missing}" in reason for reason in decision["reasons"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, "high", None])
def test_non_finite_or_non_numeric_metric_fails(bad: object) -> None:
    decision = decide({**GOOD, "kl_candidate_reference": bad}, **THRESHOLDS)
    assert decision["promote"] is False
    assert _check(decision, "kl_candidate_reference")["passed"] is False


def test_negative_threshold_disables_a_check() -> None:
    metrics = {**GOOD, "kl_candidate_reference": 99.0}
    decision = decide(metrics, **{**THRESHOLDS, "max_kl": -1})
    assert decision["promote"] is True
    assert "disabled" in _check(decision, "kl_candidate_reference")["reason"]


def test_reference_without_bigrams_is_not_compared() -> None:
    decision = decide({**GOOD, "distinct_2_reference": 0.0}, **THRESHOLDS)
    assert _check(decision, "diversity_ratio")["passed"] is True


def test_run_gate_writes_a_report_and_keeps_the_metrics(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    decision = run_gate(
        {**GOOD, "win_rate_vs_champion": 0.1}, str(report), **THRESHOLDS, champion_uri="s3://r/policy/v1"
    )
    assert decision["promote"] is False and decision["champion_uri"] == "s3://r/policy/v1"
    assert decision["metrics"]["win_rate_vs_champion"] == 0.1
    html = report.read_text()
    assert "DO NOT PROMOTE" in html and "win_rate_vs_champion" in html


# ----------------------------------------------------------------------------- the branch it drives (kfp.local)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def stand_in_training(model: Output[Model]):
    import os

    os.makedirs(model.path, exist_ok=True)
    for name, text in {"config.json": "{}", "model.safetensors": "weights", "README.md": "# model\n"}.items():
        with open(os.path.join(model.path, name), "w") as handle:
            handle.write(text)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def stand_in_evaluate(kl: float, champion: str, metrics: Output[Metrics]):
    metrics.log_metric("kl_candidate_reference", kl)
    metrics.log_metric("distinct_2_candidate", 0.5)
    metrics.log_metric("distinct_2_reference", 0.5)
    if champion:
        metrics.log_metric("win_rate_vs_champion", 0.75)
        metrics.log_metric("lc_win_rate_vs_champion", 0.7)


@dsl.pipeline(name="gate-branch")
def gate_branch(registry_uri: str, kl: float):
    trained = stand_in_training()
    current = champion_op(registry_uri=registry_uri, model_name="policy")
    current.set_caching_options(False)  # the champion changes between runs, as in pipelines/promotion.py
    evaluation = stand_in_evaluate(kl=kl, champion=current.output)
    verdict = gate_op(evaluation=evaluation.outputs["metrics"], champion_uri=current.output, max_kl=5.0)
    with dsl.If(verdict.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition
        promote_op(
            candidate=trained.outputs["model"],
            registry_uri=registry_uri,
            model_name="policy",
            decision=verdict.outputs["decision"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )


def test_the_gate_drives_the_promote_branch_both_ways(tmp_path: Path) -> None:
    uri = str(tmp_path / "registry")
    passed = run_pipeline(gate_branch, {"registry_uri": uri, "kl": 1.0}, tmp_path / "runs")
    steps = passed["steps"]
    assert {name: s["status"] for name, s in steps.items()} == {
        "stand-in-training": SUCCEEDED,
        "champion": SUCCEEDED,
        "stand-in-evaluate": SUCCEEDED,
        "gate": SUCCEEDED,
        "promote": SUCCEEDED,
    }
    assert steps["promote"]["metrics"]["version"] == 1
    assert steps["gate"]["outputs"]["Output"] is True  # parameter outputs are in the summary too
    assert json.loads(steps["gate"]["outputs"]["decision"])["promote"] is True
    pointer = registry.current_champion(uri, "policy")
    assert pointer["version"] == 1 and pointer["decision"]["promote"] is True
    assert pointer["run_id"] and "{{" not in pointer["run_id"]  # the placeholder was filled in
    assert "PROMOTE" in Path(steps["gate"]["artifacts"]["report"]).read_text()

    # A second run: the champion exists now, the evaluation compares with it; KL too high -> no promotion.
    failed = run_pipeline(gate_branch, {"registry_uri": uri, "kl": 9.0}, tmp_path / "runs")
    steps = failed["steps"]
    assert steps["gate"]["status"] == SUCCEEDED
    assert steps["promote"]["status"] == SKIPPED
    assert failed["status"] == SUCCEEDED  # the gate saying no is not a failed run
    printed = format_summary(failed)
    assert "DO NOT PROMOTE" in printed and "kl_candidate_reference 9 > 5" in printed  # and it says why
    assert registry.current_champion(uri, "policy")["version"] == 1
    assert [v["version"] for v in registry.list_versions(uri, "policy")] == [1]

    # And a passing second run promotes v2 over v1 (win rate vs the champion is now required and present).
    again = run_pipeline(gate_branch, {"registry_uri": uri, "kl": 1.0}, tmp_path / "runs")
    assert again["steps"]["promote"]["status"] == SUCCEEDED
    pointer = registry.current_champion(uri, "policy")
    assert pointer["version"] == 2 and pointer["metrics"]["win_rate_vs_champion"] == 0.75


def test_gate_and_promote_compile(tmp_path: Path) -> None:
    from kfp import compiler

    path = tmp_path / "gate_branch.yaml"
    compiler.Compiler().compile(gate_branch, str(path))
    text = path.read_text()
    assert "inputs.parameter_values['pipelinechannel--gate-Output'] == true" in text
