"""The component-reuse example in examples/ runs locally and uses the components as documented."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from preftune.orchestration.runner import run_pipeline

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
def test_example_runs_locally(tmp_path: Path) -> None:
    example = _load_example()
    model = str(EXAMPLES / "tiny-llama")
    summary = run_pipeline(
        example.judge_pipeline,
        {
            "reference_model": model,
            "candidate_model": model,
            "feedback": _slice(EXAMPLES / "data" / "preferences.jsonl", tmp_path / "prefs.jsonl", 160),
            "eval_prompts": _slice(EXAMPLES / "data" / "eval_prompts.jsonl", tmp_path / "prompts.jsonl", 4),
            "reward_max_steps": 4,
            "eval_max_prompts": 4,
        },
        tmp_path / "runs",
    )
    steps = summary["steps"]
    assert summary["status"] == "SUCCEEDED", {k: v["status"] for k, v in steps.items()}
    evaluation = steps["evaluate"]["metrics"]
    # the same model on both sides: the judge sees identical generations, so every prompt is a tie
    assert evaluation["win_rate_vs_reference"] == pytest.approx(0.5)
    rows = [
        json.loads(x) for x in Path(steps["evaluate"]["artifacts"]["generations"]).read_text().splitlines()
    ]
    assert len(rows) == 4 and "candidate_reward" in rows[0]
