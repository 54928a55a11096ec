"""The GRPO / RLOO, KTO and online DPO components, the import's unpaired set that feeds KTO, and the pipelines'
choice of policy step.

Like tests/test_component_wiring.py: each component's Python function is called with every defaulted parameter
changed, and the stage it would start is checked; the pipelines are checked in their compiled form (the evaluate
step reads the chosen branch's model through ``dsl.OneOf``). `preftune run` of each method is in
tests/test_e2e_methods.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_component_wiring import assert_fields_reach, call, capture

import preftune.launch.distributed
from components.grpo.component import grpo
from components.kto.component import kto
from components.online_dpo.component import online_dpo
from components.refuse_choice.component import refuse_choice
from preftune.data.preferences import RejectedFractionError, import_preferences
from preftune.launch.stages import STAGES
from preftune.orchestration import compilation
from preftune.train.kto import merge_unpaired

REWARDS = {"reward_functions": "my_rewards.length:score", "reward_weights": "0.5"}


@pytest.mark.parametrize(
    ("component", "stage", "overrides", "models"),
    [
        (grpo, "grpo", REWARDS, ("sft_model", "reward_model", "prompts")),
        (online_dpo, "online_dpo", REWARDS, ("sft_model", "reward_model", "prompts")),
        (kto, "kto", {}, ("sft_model", "train_data", "eval_data", "unpaired_data")),
    ],
    ids=["grpo", "online_dpo", "kto"],
)
def test_every_parameter_reaches_the_stage(
    component, stage, overrides, models, tmp_path, monkeypatch
) -> None:
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    arguments = call(component, tmp_path, **overrides)
    assert seen["args"][0] == stage
    config, scale, kwargs = seen["args"][1], seen["kwargs"]["scale"], seen["kwargs"]
    assert type(config).__name__ == STAGES[stage].config_class
    assert_fields_reach(stage, arguments, config)
    assert (scale.num_gpus, scale.num_nodes, scale.strategy) == (
        arguments["num_gpus"],
        arguments["num_nodes"],
        arguments["distributed_strategy"],
    )
    assert set(models) <= set(kwargs)
    # snapshots for the evaluate step's reward-vs-KL chart, checkpoints next to the model by default
    assert kwargs["snapshot_dir"] is arguments["checkpoints"]
    assert config.checkpoint_uri == arguments["checkpoint_uri"]


def test_the_reward_model_is_optional_and_checkpoints_default_next_to_the_model(
    tmp_path, monkeypatch
) -> None:
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    arguments = call(grpo, tmp_path, checkpoint_uri="", **REWARDS)
    assert seen["kwargs"]["reward_model"] is None
    assert seen["args"][1].checkpoint_uri == arguments["model"].uri + "-checkpoints"


def test_a_bad_reward_function_path_stops_the_component_before_its_stage(tmp_path, monkeypatch) -> None:
    capture(monkeypatch, preftune.launch.distributed, "run_stage")
    with pytest.raises(ValueError, match="not an import path"):
        call(grpo, tmp_path, reward_functions="not a path")


# ------------------------------------------------------------------------------------------ the unpaired set


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _import(tmp_path: Path, rows: list[dict], **options: object) -> tuple[dict, dict[str, list[dict]]]:
    source = _write(tmp_path / "feedback.jsonl", rows)
    out = {n: tmp_path / f"{n}.jsonl" for n in ("train", "eval", "rejected", "utrain", "ueval")}
    metrics = import_preferences(
        source,
        str(out["train"]),
        str(out["eval"]),
        str(out["rejected"]),
        str(tmp_path / "report.html"),
        unpaired_train_path=str(out["utrain"]),
        unpaired_eval_path=str(out["ueval"]),
        **options,
    )
    return metrics, {n: _read(p) for n, p in out.items()}


def test_thumbs_become_unpaired_examples_split_by_prompt_like_the_pairs(tmp_path: Path) -> None:
    rows = []
    for i in range(20):
        rows.append({"prompt": f"Question {i}?", "response": f"A helpful answer {i}.", "label": True})
        rows.append({"prompt": f"Question {i}?", "response": f"No. {i}", "label": False})
    # no pair, still a judgement
    rows.append({"prompt": "Only liked?", "response": "Yes, gladly.", "label": True})
    metrics, out = _import(tmp_path, rows, eval_fraction=0.25, seed=3)

    unpaired = out["utrain"] + out["ueval"]
    assert len(unpaired) == len(rows) == metrics["unpaired_train"] + metrics["unpaired_eval"]
    by_text = {r["completion"]: r["label"] for r in unpaired}
    assert by_text["A helpful answer 7."] is True and by_text["No. 7"] is False and by_text["Yes, gladly."]
    assert metrics["unpaired_desirable_fraction"] == pytest.approx(21 / 41)

    def prompts(rows: list[dict]) -> set[str]:
        return {json.dumps(r["prompt"], sort_keys=True) for r in rows}

    # no held-out prompt is trained on, by either set, and the held-out prompts are the same
    assert prompts(out["eval"]) == prompts(out["ueval"])
    assert not prompts(out["utrain"]) & prompts(out["eval"])
    assert prompts(out["train"]) <= prompts(out["utrain"])


def test_thumbs_without_a_pair_kept_for_kto_do_not_count_as_rejected(tmp_path: Path) -> None:
    """Most prompts of thumbs feedback have one judgement: KTO trains on it, so it does not fail the import."""
    rows = []
    for i in range(10):
        rows.append({"prompt": f"Q{i}?", "response": f"A good answer {i}.", "label": True})
        rows.append({"prompt": f"Q{i}?", "response": f"Bad {i}", "label": False})
    rows += [{"prompt": f"Q{i}?", "response": f"One answer {i}.", "label": i % 2 == 0} for i in range(10, 40)]
    metrics, out = _import(tmp_path, rows)
    assert metrics["rows_rejected"] == metrics["rejected_unpaired"] == metrics["rows_unpaired_kept"] == 30
    assert len(out["utrain"]) + len(out["ueval"]) == 50
    assert "30 rows made no pair" in (tmp_path / "report.html").read_text(encoding="utf-8")
    # without an unpaired set nothing uses them: 60% rejected fails the import, as before
    source = _write(tmp_path / "again.jsonl", rows)
    paths = [str(tmp_path / f"x-{n}") for n in ("train.jsonl", "eval.jsonl", "rejected.jsonl", "report.html")]
    with pytest.raises(RejectedFractionError, match=r"30 of 50 rows \(60%\) were rejected"):
        import_preferences(source, *paths)
    # an invalid row still counts
    rows.append({"prompt": "", "response": "x", "label": True})
    with pytest.raises(RejectedFractionError, match=r"1 of 51 rows .* besides 30 unpaired rows kept for KTO"):
        _import(tmp_path, rows, max_rejected_fraction=0.01)


def test_ratings_are_desirable_above_their_raters_mean(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Q{i}", "response": text, "score": score, "rater": rater}
        for i in range(6)
        for text, score, rater in (
            (f"great {i}", 9, "a"),
            (f"fine {i}", 5, "a"),  # rater a's mean is 5: says neither, left out
            (f"poor {i}", 1, "a"),
            (f"harsh but good {i}", 4, "b"),
            (f"harsh and bad {i}", 2, "b"),
        )
    ]
    metrics, out = _import(tmp_path, rows, eval_fraction=0.0, min_score_gap=0.1)
    labels = {r["completion"]: r["label"] for r in out["utrain"]}
    assert labels["great 0"] is True and labels["poor 0"] is False
    assert labels["harsh but good 0"] is True and labels["harsh and bad 0"] is False  # per rater
    assert "fine 0" not in labels and len(labels) == 24 and not out["ueval"]


def test_pairwise_feedback_gives_an_empty_unpaired_set(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    metrics, out = _import(tmp_path, rows, eval_fraction=0.25)
    assert out["utrain"] == out["ueval"] == [] and metrics["unpaired_train"] == 0


def test_kto_learns_a_prompt_from_its_unpaired_rows_and_other_prompts_from_their_pairs() -> None:
    def example(prompt: int, answer: int, label: bool, pair: int) -> dict:
        return {"prompt_ids": [prompt], "completion_ids": [answer], "label": label, "pair": pair, "index": 0}

    pairs = [
        example(1, 10, True, 0),
        example(1, 11, False, 0),
        example(2, 20, True, 1),
        example(2, 21, False, 1),
    ]
    unpaired = [example(1, 10, True, -1), example(1, 11, False, -1), example(1, 12, True, -1)]
    merged = merge_unpaired(pairs, unpaired)
    assert [(f["prompt_ids"][0], f["completion_ids"][0]) for f in merged] == [
        (1, 10),
        (1, 11),
        (1, 12),
        (2, 20),
        (2, 21),
    ]
    assert [f["index"] for f in merged] == list(range(5))
    assert [f["pair"] for f in merged] == [-1, -1, -1, 1, 1]  # prompt 2's halves still one pair


# ------------------------------------------------------------------------------------------ the pipelines


def _spec(name: str) -> dict:
    text = (compilation.source_root() / "pipelines" / f"{name}.yaml").read_text(encoding="utf-8")
    return next(yaml.safe_load_all(text))


@pytest.mark.parametrize(
    ("pipeline", "parameter", "branches"),
    [
        ("rlhf", "policy_optimizer", {"ppo": "ppo", "grpo": "grpo", "rloo": "grpo-2"}),
        ("dpo", "dpo_method", {"dpo": "dpo", "kto": "kto", "online_dpo": "online-dpo"}),
    ],
)
def test_each_method_is_a_branch_whose_evaluate_step_reads_its_model_and_snapshots(
    pipeline, parameter, branches
) -> None:
    """One branch per value of the parameter, each holding its policy step and the evaluate / gate / promote
    tail fed by that step's model and snapshots (kfp.local does not pass artifacts through dsl.OneOf)."""
    spec = _spec(pipeline)
    components = spec["components"]
    (group,) = [t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("condition-branches")]
    branches_dag = components[group["componentRef"]["name"]]["dag"]
    conditions = [
        t for t in branches_dag["tasks"].values() if not t["taskInfo"]["name"].startswith("unknown")
    ]
    assert len(conditions) == len(branches)
    for condition, (value, step) in zip(conditions, branches.items(), strict=True):
        rule = condition["triggerPolicy"]["condition"]
        assert rule.endswith(f"parameter_values['pipelinechannel--{parameter}'] == '{value}'"), rule
        tasks = components[condition["componentRef"]["name"]]["dag"]["tasks"]
        assert step in tasks
        (evaluate,) = [t for n, t in tasks.items() if n.split("-")[0] == "evaluate"]
        artifacts = evaluate["inputs"]["artifacts"]
        for name, port in (("candidate", "model"), ("checkpoints", "checkpoints")):
            source = artifacts[name]["taskOutputArtifact"]
            assert (source["producerTask"], source["outputArtifactKey"]) == (step, port)
        assert any(n.split("-")[0] == "gate" for n in tasks)


@pytest.mark.parametrize(
    ("pipeline", "parameter", "allowed"),
    [("rlhf", "policy_optimizer", "ppo,grpo,rloo"), ("dpo", "dpo_method", "dpo,kto,online_dpo")],
)
def test_a_value_no_branch_takes_fails_the_run_in_the_else_branch(pipeline, parameter, allowed) -> None:
    """A run from the Kubeflow UI is not checked before it starts: the dsl.Else runs refuse_choice, which fails."""
    spec = _spec(pipeline)
    components = spec["components"]
    (group,) = [t for n, t in spec["root"]["dag"]["tasks"].items() if n.startswith("condition-branches")]
    (other,) = [
        t
        for t in components[group["componentRef"]["name"]]["dag"]["tasks"].values()
        if t["taskInfo"]["name"].startswith("unknown")
    ]
    rule = other["triggerPolicy"]["condition"]
    for value in allowed.split(","):
        assert f"!(inputs.parameter_values['pipelinechannel--{parameter}'] == '{value}')" in rule
    (refuse,) = components[other["componentRef"]["name"]]["dag"]["tasks"].values()
    assert refuse["componentRef"]["name"] == "comp-refuse-choice"
    inputs = refuse["inputs"]["parameters"]
    assert inputs["allowed"]["runtimeValue"]["constant"] == allowed
    assert inputs["parameter"]["runtimeValue"]["constant"] == parameter
    assert inputs["value"]["componentInputParameter"] == f"pipelinechannel--{parameter}"
    with pytest.raises(
        ValueError, match=rf"{parameter}='grpoo' names no method .*use one of: {allowed.replace(',', ', ')}"
    ):
        refuse_choice.python_func(parameter=parameter, value="grpoo", allowed=allowed)


def test_run_refuses_a_method_no_branch_takes() -> None:
    from preftune.orchestration.parameters import ParameterError, check_arguments
    from preftune.pipelines import PIPELINES

    for pipeline, parameter, good in (("rlhf", "policy_optimizer", "rloo"), ("dpo", "dpo_method", "kto")):
        check_arguments(PIPELINES[pipeline], {parameter: good})
        with pytest.raises(ParameterError, match=rf"parameter '{parameter}' must be one of .*got 'grpoo'"):
            check_arguments(PIPELINES[pipeline], {parameter: "grpoo"})
