"""Against a real `mlflow server` (tests/mlflow_server.py: SQLite, local artifacts, 127.0.0.1): a stage's live
metrics, parameters, lineage and KFP tags; then two DPO pipeline runs that track every step there, promote into
its model registry, and where the second run takes its champion from that registry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e import bundled_slice, run_cli
from mlflow_server import mlflow_server
from tiny_models import make_model_dir, make_tokenizer, write_jsonl

from preftune.launch.distributed import Scale, run_stage
from preftune.train.sft import SFTConfig

ANSWERS = ["the answer is yes", "the answer is no"]


@dataclass
class Artifact:
    path: str
    uri: str


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture
def client(mlflow_url: str, monkeypatch: pytest.MonkeyPatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    return MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url)


def runs_of(client, experiment: str, **tags: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([found.experiment_id], filter_string=query)


def test_a_stage_tracks_live_metrics_params_lineage_and_its_kfp_run(
    client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stage-test")
    monkeypatch.setenv("KFP_RUN_ID", "run-4242")
    monkeypatch.setenv("KFP_TASK_NAME", "sft")
    base = make_model_dir(tmp_path / "base", make_tokenizer([*ANSWERS, "<|user|> <|assistant|> question"]))
    rows = [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"q {i % 2}"}],
            "completion": ANSWERS[i % 2],
        }
        for i in range(16)
    ]
    model = Artifact(str(tmp_path / "model"), "s3://bucket/run-4242/sft/model")
    config = SFTConfig(
        max_steps=5, batch_size=4, eval_batch_size=4, max_length=32, logging_steps=1, eval_steps=2
    )
    config.report_to = "mlflow"
    metrics = run_stage(
        "sft",
        config,
        scale=Scale(num_gpus=1),
        base_model=base,
        train_data=write_jsonl(tmp_path / "train.jsonl", rows),
        eval_data=write_jsonl(tmp_path / "eval.jsonl", rows[:4]),
        model_dir=model,
        report_path=str(tmp_path / "report.html"),
        model_uri=model.uri,
    )
    (run,) = runs_of(client, "stage-test", **{"kfp.run_id": "run-4242"})
    assert run.info.status == "FINISHED" and run.info.run_name == "sft"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/lr")] == [1, 2, 3, 4, 5]
    assert run.data.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert run.data.params["learning_rate"] == "0.002" and run.data.params["report_to"] == "mlflow"
    assert run.data.tags["lineage.output.model_dir"] == model.uri
    assert run.data.tags["lineage.input.base_model"] == base
    assert run.data.tags["preftune.stage"] == "sft"


def test_a_retried_kfp_task_continues_its_unfinished_run(client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preempted pod leaves its run RUNNING, a failed one FAILED; KFP's retry (same run, task and output URIs)
    continues that run, with a changed setting as a tag. A loop iteration (other outputs) and a finished task
    get runs of their own."""
    from preftune.report import tracking

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "retry-test")
    monkeypatch.setenv("KFP_RUN_ID", "run-7")
    monkeypatch.setenv("KFP_TASK_NAME", "dpo")
    lineage = {"output.model_dir": "s3://bucket/run-7/dpo/model"}

    def attempt(pod: str, steps: range, fail: bool = False, lr: str = "0.001", **lineage_of: str) -> None:
        monkeypatch.setenv("KFP_POD_NAME", pod)
        params = {"learning_rate": lr, "beta": "0.1"}
        outputs = lineage_of or lineage
        with (
            contextlib.suppress(RuntimeError),
            tracking.tracked("mlflow", stage="dpo", params=params, lineage=outputs),
        ):
            for step in steps:
                tracking.log_metrics(step, {"loss": 1.0 / step}, prefix="train/")
            if fail:
                raise RuntimeError("the pod failed")

    # first attempt: preempted (SIGKILL: the run is never closed)
    first = tracking.MlflowTracker("dpo")
    first.start(
        {"learning_rate": "0.001", "beta": "0.1"},
        {**tracking.kfp_tags(), "lineage.output.model_dir": lineage["output.model_dir"]},
    )
    for step in (1, 2):
        first.metrics(step, {"train/loss": 1.0 / step})
    attempt("dpo-pod-2", range(2, 4), fail=True)  # resumes at its checkpoint, then fails
    attempt("dpo-pod-3", range(3, 6), lr="0.0005")  # resumed with a lower learning rate, finishes

    (run,) = runs_of(client, "retry-test", **{"kfp.run_id": "run-7", "kfp.task_name": "dpo"})
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4, 5]
    assert run.data.tags[tracking.ATTEMPT_TAG] == "3" and run.data.tags["kfp.pod_name"] == "dpo-pod-3"
    assert run.data.params["learning_rate"] == "0.001"
    assert run.data.tags[f"{tracking.RETRY_PARAM_TAG}learning_rate"] == "0.0005"

    # the same task finished: a later run of it (cache off, rerun by hand) gets a new MLflow run
    attempt("dpo-pod-4", range(1, 3))
    # another loop iteration: same task name, its own outputs
    attempt("dpo-pod-5", range(1, 3), fail=True, **{"output.model_dir": "s3://bucket/run-7/dpo-2/model"})
    runs = runs_of(client, "retry-test", **{"kfp.run_id": "run-7", "kfp.task_name": "dpo"})
    assert len(runs) == 3
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "FINISHED"]


@pytest.fixture(scope="module")
def two_runs(mlflow_url: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Two small DPO pipeline runs, both tracked in MLflow and promoting into its registry."""
    tmp = tmp_path_factory.mktemp("e2e-mlflow")
    params = {
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 64),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 64),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 4),
        "eval_fraction": 0.2,
        "sft_max_steps": 10,  # the steps log every logging_steps (5): steps 5 and 10
        "dpo_max_steps": 10,
        "sft_batch_size": 8,
        "dpo_batch_size": 8,
        "eval_max_prompts": 4,
        "eval_max_new_tokens": 8,
        "num_checkpoints": 0,
        "registry_uri": "mlflow+" + mlflow_url,
        "model_name": "tracked-policy",
        "report_to": "mlflow",
        # no judge here: the gate passes on the candidate's own bounds, and the champion is looked up
        "gate_min_win_rate_vs_champion": -1,
        "gate_max_kl": -1,
        "gate_min_diversity_ratio": -1,
    }
    env = {"MLFLOW_TRACKING_URI": mlflow_url, "MLFLOW_EXPERIMENT_NAME": "e2e-dpo"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return [run_cli("dpo", params, tmp / f"runs-{i}", timeout=1200) for i in range(2)]
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.slow
def test_dpo_runs_log_live_metrics_of_every_training_step(two_runs: list[dict], client) -> None:
    assert all(run["status"] == "SUCCEEDED" for run in two_runs)
    runs = runs_of(client, "e2e-dpo")
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["preftune.stage"], []).append(run)
    assert {s: len(r) for s, r in by_stage.items()} == {"sft": 2, "dpo": 2, "evaluate": 2}
    for stage in ("sft", "dpo"):
        for run in by_stage[stage]:
            assert run.info.status == "FINISHED"
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
            assert sorted(steps) == [5, 10], (stage, steps)
    dpo_run = by_stage["dpo"][0]
    for name in ("train/reward_accuracy", "train/reward_margin", "train/lr"):
        assert len(client.get_metric_history(dpo_run.info.run_id, name)) == 2, name
    assert "input.sft_model" in {k.removeprefix("lineage.") for k in dpo_run.data.tags}
    evaluation = by_stage["evaluate"][0]
    assert "kl" in " ".join(evaluation.data.metrics), evaluation.data.metrics


@pytest.mark.slow
def test_promotions_land_in_the_mlflow_registry_and_the_second_run_reads_the_champion(
    two_runs: list[dict], client
) -> None:
    versions = client.search_model_versions("name='tracked-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client.get_model_version_by_alias("tracked-policy", "champion")
    assert champion.version == "2", "the second run's promotion moved the alias"
    first, second = two_runs
    assert not first["steps"]["champion"]["outputs"].get("Output"), "no champion before the first promotion"
    looked_up = second["steps"]["champion"]["outputs"]["Output"]
    assert looked_up, "the second run found the champion in MLflow"
    assert second["steps"]["evaluate"]["status"] == "SUCCEEDED"
    generations = Path(second["steps"]["evaluate"]["artifacts"]["generations"]).read_text(encoding="utf-8")
    assert '"champion"' in generations, "the champion answered the same prompts"
