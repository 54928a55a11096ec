"""The component-reuse example in examples/ runs locally and uses the components as documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from preftune.model.modeling import read_lineage

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("reuse_components", EXAMPLES / "reuse_components.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slice(src: Path, dest: Path, rows: int) -> str:
    dest.write_text("\n".join(src.read_text().splitlines()[:rows]) + "\n")
    return str(dest)


def test_example_compiles(tmp_path: Path) -> None:
    example = _load_example()
    from kfp import compiler

    compiler.Compiler().compile(example.judge_pipeline, str(tmp_path / "judge.yaml"))
    text = (tmp_path / "judge.yaml").read_text()
    assert "comp-reward-model" in text and "comp-evaluate" in text


@pytest.mark.slow
def test_example_compares_two_different_models_and_prints_its_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = _load_example()
    summary = example.main(
        [
            "--pipeline-root", str(tmp_path / "runs"),
            "--sft-data", _slice(EXAMPLES / "data" / "sft.jsonl", tmp_path / "sft.jsonl", 480),
            "--candidate-steps", "60",
            "--feedback", _slice(EXAMPLES / "data" / "preferences.jsonl", tmp_path / "prefs.jsonl", 320),
            "--eval-prompts", _slice(EXAMPLES / "data" / "eval_prompts.jsonl", tmp_path / "prompts.jsonl", 12),
            "--reward-max-steps", "16",
            "--eval-max-prompts", "12",
        ]
    )  # fmt: skip
    steps = summary["steps"]
    assert summary["status"] == "SUCCEEDED", {k: v["status"] for k, v in steps.items()}
    evaluation = steps["evaluate"]["metrics"]
    # two different models (not the tiny model against itself: KL 0 and every prompt a tie)
    rows = [
        json.loads(x) for x in Path(steps["evaluate"]["artifacts"]["generations"]).read_text().splitlines()
    ]
    differ = sum(r["candidate"] != r["reference"] for r in rows)
    assert len(rows) == 12 and differ >= 1
    assert evaluation["judge_ties_vs_reference"] <= 12 - differ
    assert evaluation["kl_candidate_reference"] > 0.05  # measured 0.36 on these settings
    assert read_lineage(summary["parameters"]["candidate_model"])["parent"] == str(EXAMPLES / "tiny-llama")
    printed = capsys.readouterr().out
    assert example.verdict(evaluation) in printed
    # the evaluation's and the judge's headline metrics
    assert "win_rate_vs_reference = " in printed and "eval_accuracy = " in printed
