"""The comparison of alignment methods: head-to-head win rates, each method's figures, the verdict, its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.eval.comparison import (
    compare,
    compare_artifacts,
    head_to_head,
    mark_skipped,
    parse_methods,
    verdict,
)

TRAINING = {
    "sft": {"stage_seconds": 30.0, "train_tokens": 1000.0, "peak_memory_mb": 500.0},
    "dpo": {"stage_seconds": 40.0, "train_tokens": 2000.0, "peak_memory_mb": 600.0},
    "reward": {"stage_seconds": 20.0, "train_tokens": 3000.0, "peak_memory_mb": 550.0},
    "ppo": {"stage_seconds": 100.0, "train_tokens": 5000.0, "peak_memory_mb": 800.0},
}


def _evaluation(reward: float, win: float, kl: float) -> dict[str, float]:
    return {
        "judge_reward_candidate": reward,
        "win_rate_vs_reference": win,
        "lc_win_rate_vs_reference": win - 0.05,
        "kl_candidate_reference": kl,
        "distinct_2_candidate": 0.5,
        "diversity_ratio_vs_reference": 0.9,
        "mean_length_candidate": 12.0,
    }


def _rows(rewards: list[float], answers: list[str]) -> list[dict]:
    return [
        {
            "prompt": f"q{i}",
            "candidate": a,
            "reference": "ref",
            "candidate_reward": r,
            "reference_reward": 0.0,
        }
        for i, (r, a) in enumerate(zip(rewards, answers, strict=True))
    ]


def test_head_to_head_by_hand() -> None:
    # prompt 0: DPO wins; 1: tie; 2: RLHF wins; 3: RLHF wins. DPO 1 + 0.5 = 1.5 of 4; RLHF 2.5 of 4.
    dpo = _rows([1.0, 2.0, 0.0, 0.0], ["a b", "c d", "e f", "g h"])
    rlhf = _rows([0.0, 2.0, 1.0, 3.0], ["a b", "c d", "e f", "g h"])
    result = head_to_head({"dpo": dpo, "rlhf": rlhf})
    assert result["dpo_win_rate_vs_rlhf"] == pytest.approx(0.375)
    assert result["rlhf_win_rate_vs_dpo"] == pytest.approx(0.625)
    assert result["dpo_win_rate_vs_rlhf"] + result["rlhf_win_rate_vs_dpo"] == pytest.approx(1.0)
    assert result["dpo_lc_win_rate_vs_rlhf"] == pytest.approx(0.375)  # equal lengths: nothing to control
    assert result["head_to_head_ties"] == 1 and result["head_to_head_prompts"] == 4
    with pytest.raises(ValueError, match="same prompts"):
        head_to_head({"dpo": dpo, "rlhf": list(reversed(rlhf))})


def test_compare_writes_every_figure_for_both_methods(tmp_path: Path) -> None:
    files = {}
    for method, rewards in (("dpo", [1.0, 0.0, 0.0, 2.0]), ("rlhf", [2.0, 1.0, 1.0, 1.0])):
        path = tmp_path / f"{method}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(rewards, ["x y"] * 4)))
        files[method] = str(path)
    frontier = tmp_path / "frontier.jsonl"
    points = [
        {"label": "reference", "step": 0, "kl": 0.0, "reward": 0.1},
        {"label": "final", "step": 10, "kl": 1.5, "reward": 0.9},
    ]
    frontier.write_text("".join(json.dumps(p) + "\n" for p in points))
    report = tmp_path / "report.html"
    metrics = compare(
        training=TRAINING,
        evaluations={"dpo": _evaluation(0.75, 0.6, 0.4), "rlhf": _evaluation(1.25, 0.8, 2.5)},
        generations=files,
        frontiers={"dpo": str(frontier), "rlhf": str(frontier)},
        report_path=str(report),
        gpus_per_step=2,
    )
    assert metrics["dpo_wall_seconds"] == 40 and metrics["rlhf_wall_seconds"] == 120  # reward + PPO
    assert metrics["rlhf_gpu_hours"] == pytest.approx(120 * 2 / 3600)
    assert metrics["rlhf_train_tokens"] == 8000 and metrics["rlhf_peak_memory_mb"] == 800
    assert metrics["sft_wall_seconds"] == 30
    assert metrics["rlhf_win_rate_vs_dpo"] == pytest.approx(0.75)  # 3 wins of 4
    for key in ("judge_reward", "win_rate_vs_sft", "kl_to_sft", "distinct_2", "mean_length", "gpu_hours"):
        assert f"dpo_{key}" in metrics and f"rlhf_{key}" in metrics
    html = report.read_text()
    assert "RLHF (reward model + PPO) gave the better answers" in html
    assert "favours RLHF" in html  # the judge is the RLHF reward model: the verdict says so
    assert html.count("data:image/png;base64,") == 3  # head to head, cost, both reward-vs-KL paths


def test_verdict_calls_a_draw_and_drops_the_caveat_with_an_independent_judge() -> None:
    m = {
        "rlhf_head_to_head": 0.52,
        "dpo_head_to_head": 0.48,
        "rlhf_lc_win_rate_vs_dpo": 0.52,
        "rlhf_win_rate_vs_dpo": 0.5,
        "dpo_win_rate_vs_rlhf": 0.5,
        **{f"{x}_{k}": 1.0 for x in ("dpo", "rlhf") for k in (
            "judge_reward", "wall_seconds", "gpu_hours", "peak_memory_mb", "kl_to_sft", "win_rate_vs_sft",
            "distinct_2", "mean_length",
        )},
    }  # fmt: skip
    sentences = verdict(m, judge_is_reward_model=False)
    assert sentences[0].startswith("Neither method is clearly better")
    assert not any("favours RLHF" in s for s in sentences)


def test_generations_without_judge_rewards_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"prompt": "q", "candidate": "a", "reference": "b"}) + "\n")
    with pytest.raises(ValueError, match="row 1 has no candidate_reward"):
        compare(
            training=TRAINING,
            evaluations={"dpo": _evaluation(1, 1, 1), "rlhf": _evaluation(1, 1, 1)},
            generations={"dpo": str(path), "rlhf": str(path)},
            frontiers={},
            report_path=str(tmp_path / "r.html"),
        )


def test_head_to_head_of_three_methods_by_hand() -> None:
    # per prompt rewards: DPO 1 0 2, GRPO 2 0 1, KTO 0 0 3 (equal lengths: LC = raw)
    rows = {
        "dpo": _rows([1.0, 0.0, 2.0], ["a"] * 3),
        "grpo": _rows([2.0, 0.0, 1.0], ["a"] * 3),
        "kto": _rows([0.0, 0.0, 3.0], ["a"] * 3),
    }
    result = head_to_head(rows)
    # DPO vs GRPO: loss, tie, win = 1.5 / 3; DPO vs KTO: win, tie, loss = 1.5 / 3; GRPO vs KTO: same = 1.5 / 3
    assert result["dpo_win_rate_vs_grpo"] == pytest.approx(0.5)
    assert result["grpo_win_rate_vs_kto"] + result["kto_win_rate_vs_grpo"] == pytest.approx(1.0)
    assert result["head_to_head_ties"] == 3  # prompt 1 ties in each of the three pairs
    assert result["head_to_head_prompts"] == 3
    for method in rows:
        assert result[f"{method}_head_to_head"] == pytest.approx(0.5)
    rows["kto"] = _rows([3.0, 3.0, 3.0], ["a"] * 3)  # KTO now wins every prompt against both
    result = head_to_head(rows)
    assert result["kto_head_to_head"] == pytest.approx(1.0)
    assert result["dpo_head_to_head"] == pytest.approx((0.5 + 0.0) / 2)


def test_methods_are_parsed_and_checked() -> None:
    assert parse_methods("all") == ["dpo", "rlhf", "grpo", "rloo", "kto", "online_dpo"]
    assert parse_methods(" KTO, dpo ,") == ["dpo", "kto"]  # report order, case and spaces forgiven
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['ppo'\]"):
        parse_methods("dpo,ppo")
    with pytest.raises(ValueError, match="at least two methods"):
        parse_methods("grpo")


def _write_rows(path: Path, rewards: list[float]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(rewards, ["x y"] * len(rewards))))
    return str(path)


def test_a_subset_of_three_methods_is_compared_and_ranked(tmp_path: Path) -> None:
    training = {
        **TRAINING,
        "grpo": {"stage_seconds": 60.0, "train_tokens": 4000.0, "peak_memory_mb": 700.0},
        "kto": {"stage_seconds": 30.0, "train_tokens": 1500.0, "peak_memory_mb": 650.0},
        "online_dpo": {"stage_seconds": 90.0, "train_tokens": 6000.0, "peak_memory_mb": 900.0},
    }
    rewards = {"grpo": [3.0, 3.0, 3.0, 3.0], "kto": [1.0, 2.0, 0.0, 0.0], "online_dpo": [2.0, 1.0, 1.0, 1.0]}
    report = tmp_path / "report.html"
    metrics = compare(
        training=training,
        evaluations={m: _evaluation(sum(r) / 4, 0.7, 1.0) for m, r in rewards.items()},
        generations={m: _write_rows(tmp_path / f"{m}.jsonl", r) for m, r in rewards.items()},
        frontiers={},
        report_path=str(report),
    )
    assert metrics["grpo_wall_seconds"] == 80  # its own step plus the reward model it needs
    assert metrics["kto_wall_seconds"] == 30 and metrics["online_dpo_wall_seconds"] == 110
    assert not any(k.startswith(("dpo_", "rlhf_", "rloo_")) for k in metrics)
    assert metrics["grpo_head_to_head"] == pytest.approx(1.0)
    html = report.read_text()
    assert "GRPO gave the best answers" in html and "Online DPO&#x27;s (the runner-up)" in html
    assert "favours GRPO and Online DPO" in html and "favours KTO" not in html
    assert "KTO, GRPO and Online DPO" not in html and "GRPO, KTO and Online DPO: the comparison" in html


def test_compare_artifacts_leaves_out_the_skipped_methods(tmp_path: Path) -> None:
    class Artifact:
        def __init__(self, path: Path, metadata: dict | None = None) -> None:
            self.path, self.metadata = str(path), dict(metadata or {})

    def skipped(method: str) -> tuple:
        arts = tuple(Artifact(tmp_path / f"skip-{method}-{k}") for k in range(3))
        for art in arts:
            mark_skipped(art, method)
        return arts

    evaluated = {
        "dpo": (
            Artifact(tmp_path, _evaluation(0.5, 0.6, 0.4)),
            Artifact(_write_rows(tmp_path / "d.jsonl", [1.0, 0.0])),
            None,
        ),
        "rlhf": (
            Artifact(tmp_path, _evaluation(1.5, 0.8, 2.0)),
            Artifact(_write_rows(tmp_path / "r.jsonl", [2.0, 1.0])),
            None,
        ),
        "kto": skipped("kto"),
        "grpo": (None, None, None),  # not wired at all
    }
    stages = {name: Artifact(tmp_path, m) for name, m in TRAINING.items()}
    stages["kto"] = skipped("kto")[0]
    metrics = compare_artifacts(stages, evaluated, report_path=str(tmp_path / "r.html"))
    assert metrics["rlhf_win_rate_vs_dpo"] == pytest.approx(1.0)
    assert not any(k.startswith(("kto_", "grpo_")) for k in metrics)
    assert (tmp_path / "skip-kto-0").read_text() == ""
    with pytest.raises(ValueError, match="at least two methods"):
        compare_artifacts(
            stages, {**evaluated, "rlhf": skipped("rlhf")}, report_path=str(tmp_path / "x.html")
        )
