"""Each component run for real through kfp.local, loaded from its compiled component.yaml (the reuse path)."""

import json
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.components import load_component_from_file

from preftune.orchestration import compilation

ROOT = compilation.source_root()
EXAMPLES = ROOT / "examples"


def _component(name: str):  # noqa: ANN202 - a KFP component factory
    return load_component_from_file(str(ROOT / "components" / name / "component.yaml"))


def _slice(src: Path, dest: Path, rows: int) -> str:
    dest.write_text("\n".join(src.read_text().splitlines()[:rows]) + "\n")
    return str(dest)


def _outputs(task: dsl.PipelineTask, name: str) -> str:
    return task.outputs[name].path


@pytest.fixture
def local_runner(tmp_path: Path) -> Path:
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    return root


def test_data_components_run_locally(tmp_path: Path, local_runner: Path) -> None:
    sft_data = _slice(EXAMPLES / "data" / "sft.jsonl", tmp_path / "sft.jsonl", 40)
    prefs = _slice(EXAMPLES / "data" / "preferences.jsonl", tmp_path / "prefs.jsonl", 40)
    ingest = _component("ingest")(source=sft_data, eval_fraction=0.25, seed=1)
    pairs = _component("preference_import")(source=prefs, eval_fraction=0.25, seed=1)

    train = [json.loads(x) for x in Path(_outputs(ingest, "train_data")).read_text().splitlines()]
    evals = Path(_outputs(ingest, "eval_data")).read_text().splitlines()
    assert len(train) + len(evals) == 40 and len(evals) > 0
    assert train[0]["prompt"][-1]["role"] == "user" and train[0]["completion"]
    assert "<html" in Path(_outputs(ingest, "report")).read_text().lower()
    pair_rows = [json.loads(x) for x in Path(_outputs(pairs, "train_pairs")).read_text().splitlines()]
    assert pair_rows and {"prompt", "chosen", "rejected"} <= set(pair_rows[0])


SFT_OP = _component("sft")
DPO_OP = _component("dpo")
EVALUATE_OP = _component("evaluate")
INGEST_OP = _component("ingest")
IMPORT_OP = _component("preference_import")


@dsl.pipeline(name="components-from-yaml")
def training_components(sft_data: str, preference_data: str, eval_prompts: str, base_model: str):
    ingest = INGEST_OP(source=sft_data, eval_fraction=0.25)
    pairs = IMPORT_OP(source=preference_data, eval_fraction=0.25)
    sft = SFT_OP(
        base_model=base_model,
        train_data=ingest.outputs["train_data"],
        eval_data=ingest.outputs["eval_data"],
        max_steps=3,
    )
    policy = DPO_OP(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        max_steps=3,
    )
    EVALUATE_OP(
        candidate=policy.outputs["model"],
        reference=sft.outputs["model"],
        eval_prompts=eval_prompts,
        eval_pairs=pairs.outputs["eval_pairs"],
        max_prompts=3,
        max_new_tokens=8,
    )


@pytest.mark.slow
def test_training_components_run_locally_inside_a_pipeline(tmp_path: Path) -> None:
    from preftune.orchestration.runner import run_pipeline

    params = {
        "sft_data": _slice(EXAMPLES / "data" / "sft.jsonl", tmp_path / "sft.jsonl", 64),
        "preference_data": _slice(EXAMPLES / "data" / "preferences.jsonl", tmp_path / "prefs.jsonl", 64),
        "eval_prompts": _slice(EXAMPLES / "data" / "eval_prompts.jsonl", tmp_path / "prompts.jsonl", 3),
        "base_model": str(EXAMPLES / "tiny-llama"),
    }
    summary = run_pipeline(training_components, params, tmp_path / "runs")
    steps = summary["steps"]
    assert summary["status"] == "SUCCEEDED", {k: v["status"] for k, v in steps.items()}
    assert (Path(steps["sft"]["artifacts"]["model"]) / "lineage.json").is_file()
    assert abs(steps["dpo"]["metrics"]["first_step_loss"] - 0.693147) < 1e-4
    rows = Path(steps["evaluate"]["artifacts"]["generations"]).read_text().splitlines()
    assert len(rows) == 3
    assert "kl_candidate_reference" in steps["evaluate"]["metrics"]
