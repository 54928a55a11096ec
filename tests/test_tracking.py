"""Live tracking (report_to): TensorBoard event files of a real stage, read back with tensorboard's own reader;
the tracker's rules (rank 0 only, an outage costs a warning, clear errors, no mlflow import unless asked); and
how a cluster's pods get the MLflow Secret and their KFP run. The MLflow server tests are in test_e2e_mlflow.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import make_model_dir, make_tokenizer, write_jsonl

from preftune.config import dpo, evaluate, grpo, kto, online_dpo, ppo, reward, sft
from preftune.config.fields import ConfigError, check
from preftune.launch.distributed import Scale, run_stage, tracking_context
from preftune.report import tracking
from preftune.train.loop import History

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = ["the answer is yes", "the answer is no"]
CONFIGS = [
    sft.SFTConfig,
    reward.RewardConfig,
    dpo.DPOConfig,
    ppo.PPOConfig,
    grpo.GRPOConfig,
    kto.KTOConfig,
    online_dpo.OnlineDPOConfig,
    evaluate.EvalConfig,
]


@dataclass
class Artifact:
    path: str
    uri: str


def rows(n: int) -> list[dict]:
    return [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"question {i % 2}"}],
            "completion": ANSWERS[i % 2],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_model_dir(
        tmp_path_factory.mktemp("base"), make_tokenizer([*ANSWERS, "<|user|> <|assistant|> question"])
    )


def sft_call(base: str, tmp_path: Path) -> dict:
    model = Artifact(str(tmp_path / "model"), "s3://bucket/run/sft/model")
    return dict(
        base_model=base,
        train_data=Artifact(write_jsonl(tmp_path / "train.jsonl", rows(16)), "s3://bucket/run/ingest/train"),
        eval_data=write_jsonl(tmp_path / "eval.jsonl", rows(4)),
        model_dir=model,
        report_path=str(tmp_path / "report.html"),
        model_uri=model.uri,
    )


TINY_SFT = dict(max_steps=5, batch_size=4, eval_batch_size=4, max_length=32, logging_steps=1, eval_steps=2)


# ----------------------------------------------------------------------------------------------- the surface


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_training_and_evaluate_config_takes_report_to_with_its_choices(config: type) -> None:
    field = {f.name: f for f in dataclasses.fields(config)}["report_to"]
    assert field.default == "none"
    assert field.metadata["choices"] == ("none", "mlflow", "tensorboard")
    with pytest.raises(ConfigError, match="report_to"):
        check(dataclasses.replace(config(), report_to="wandb"))


@pytest.mark.parametrize("name", ["sft", "reward_model", "dpo", "ppo", "evaluate"])
def test_every_training_and_evaluate_component_exposes_report_to(name: str) -> None:
    spec = yaml.safe_load((ROOT / "components" / name / "component.yaml").read_text(encoding="utf-8"))
    (component,) = spec["components"].values()
    parameter = component["inputDefinitions"]["parameters"]["report_to"]
    assert parameter["defaultValue"] == "none" and "mlflow" in parameter["description"]


@pytest.mark.parametrize("pipeline", ["dpo", "rlhf", "compare"])
def test_pipelines_pass_report_to_to_every_training_and_evaluate_step(pipeline: str) -> None:
    spec = yaml.safe_load(
        (ROOT / "pipelines" / f"{pipeline}.yaml").read_text(encoding="utf-8").split("\n---\n")[0]
    )
    assert spec["root"]["inputDefinitions"]["parameters"]["report_to"]["defaultValue"] == "none"
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    fed, tracked_kinds = set(), {"sft", "dpo", "kto", "online-dpo", "reward-model", "ppo", "grpo", "evaluate"}
    for dag in dags:  # the methods' branches are sub-DAGs (dsl.If)
        for task_name, task in dag["tasks"].items():
            kind = re.sub(r"-\d+$", "", task["componentRef"]["name"]).removeprefix("comp-")
            given = task.get("inputs", {}).get("parameters", {}).get("report_to")
            if kind in tracked_kinds:
                assert given is not None, f"{pipeline}: {task_name} does not get report_to"
                assert given.get("componentInputParameter", "").endswith("report_to"), (task_name, given)
                fed.add(kind)
    expected = {"sft", "dpo", "evaluate"} if pipeline == "dpo" else {"sft", "reward-model", "ppo", "evaluate"}
    assert expected <= fed, fed


# ------------------------------------------------------------------------------------------------ TensorBoard


def test_a_stage_with_report_to_tensorboard_writes_events_tensorboard_reads(
    base: str, tmp_path: Path
) -> None:
    config = sft.SFTConfig(**TINY_SFT, report_to="tensorboard")
    call = sft_call(base, tmp_path)
    metrics = run_stage("sft", config, scale=Scale(num_gpus=1), **call)

    logs = tmp_path / "model" / "tensorboard" / "sft"
    assert list(logs.glob("events.out.tfevents.*")), "event files under the model output"
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5], "every logged step, live"
    assert all(e.value > 0 for e in loss)
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4, 5]
    # throughput and gradient norm are live only: the report's curves (History) stay machine-independent
    assert [e.step for e in events.Scalars("train/tokens_per_second")] == [1, 2, 3, 4, 5]
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_second"))
    norms = [e.value for e in events.Scalars("train/grad_norm")]
    assert len(norms) == 5 and all(0 < n < float("inf") for n in norms)
    assert {e.step for e in events.Scalars("eval/loss")} >= {2, 4}
    final = events.Scalars("eval_loss")  # the stage's final metrics, at its last step
    assert final[-1].step == 5 and final[-1].value == pytest.approx(metrics["eval_loss"], rel=1e-6)
    texts = {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in ("parameters/text_summary", "lineage/text_summary")
    }
    assert "| learning_rate | 0.002 |" in texts["parameters/text_summary"]
    assert "lineage.input.train_data: s3://bucket/run/ingest/train" in texts["lineage/text_summary"]
    assert "lineage.output.model_dir: s3://bucket/run/sft/model" in texts["lineage/text_summary"]


def test_no_tracker_without_report_to(base: str, tmp_path: Path) -> None:
    run_stage("sft", sft.SFTConfig(**TINY_SFT), scale=Scale(num_gpus=1), **sft_call(base, tmp_path))
    assert not (tmp_path / "model" / "tensorboard").exists()
    assert not tracking.active()


def test_only_rank_0_reports(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    config = sft.SFTConfig(**TINY_SFT, report_to="tensorboard")
    run_stage("sft", config, scale=Scale(num_gpus=1), **sft_call(base, tmp_path))
    assert not (tmp_path / "model" / "tensorboard").exists()


# ------------------------------------------------------------------------------------------- the tracker rules


class Recorder:
    def __init__(self, fail_after: int | None = None) -> None:
        self.started: tuple[dict, dict] | None = None
        self.steps: list[tuple[int, dict]] = []
        self.closed: bool | None = None
        self.fail_after = fail_after

    def start(self, params, tags) -> None:
        self.started = (dict(params), dict(tags))

    def metrics(self, step, values) -> None:
        if self.fail_after is not None and len(self.steps) >= self.fail_after:
            raise ConnectionError("tracking server went away")
        self.steps.append((step, dict(values)))

    def close(self, failed: bool) -> None:
        self.closed = failed


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    made = Recorder()
    monkeypatch.setattr(tracking, "make_tracker", lambda report_to, **kw: made)
    return made


def test_history_forwards_train_and_eval_logs_with_finite_numbers_only(recorder: Recorder) -> None:
    history = History()
    with tracking.tracked("mlflow", stage="dpo", params={"beta": 0.1}, lineage={"input.sft_model": "s3://m"}):
        history.log_train(1, {"loss": 0.69, "rewards/margin": 0.0, "grad_norm": float("nan")})
        history.log_eval(2, 0.5, {"loss": 0.6})
    history.log_train(3, {"loss": 0.5})  # after the stage: nothing open any more
    assert recorder.steps == [
        (1, {"train/loss": 0.69, "train/rewards/margin": 0.0}),
        (2, {"eval/epoch": 0.5, "eval/loss": 0.6}),
    ]
    assert recorder.started == (
        {"beta": "0.1"},
        {"preftune.stage": "dpo", "lineage.input.sft_model": "s3://m"},
    )
    assert recorder.closed is False
    assert len(history.train) == 2, "the report's own history is unchanged"


def test_a_failing_stage_closes_its_run_as_failed(recorder: Recorder) -> None:
    with pytest.raises(RuntimeError), tracking.tracked("mlflow", stage="sft", params={}):
        raise RuntimeError("boom")
    assert recorder.closed is True
    assert not tracking.active()


def test_a_tracking_outage_costs_a_warning_not_the_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = Recorder(fail_after=1)
    monkeypatch.setattr(tracking, "make_tracker", lambda report_to, **kw: flaky)
    history = History()
    with caplog.at_level(logging.WARNING), tracking.tracked("mlflow", stage="sft", params={}):
        for step in range(1, 5):
            history.log_train(step, {"loss": 1.0 / step})
    assert [s for s, _ in flaky.steps] == [1]
    assert len(history.train) == 4
    assert sum("live tracking failed" in r.message for r in caplog.records) == 1


def test_the_kfp_run_becomes_tags(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"KFP_RUN_ID": "7f1c", "KFP_RUN_NAME": "nightly", "KFP_TASK_NAME": "dpo", "KFP_POD_NAME": "p-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with tracking.tracked("mlflow", stage="dpo", params={}):
        pass
    assert recorder.started is not None
    tags = recorder.started[1]
    assert (
        tags["kfp.run_id"] == "7f1c" and tags["kfp.task_name"] == "dpo" and tags["kfp.run_name"] == "nightly"
    )


def test_lineage_names_inputs_and_outputs_by_uri() -> None:
    model = Artifact("/tmp/x/model", "s3://b/run/dpo/model")
    context = tracking_context(
        "dpo", {"beta": 0.1}, {"sft_model": "s3://b/run/sft/model", "model_dir": model, "max_rows": 3}
    )
    assert context == {
        "params": {"beta": 0.1},
        "lineage": {"input.sft_model": "s3://b/run/sft/model", "output.model_dir": "s3://b/run/dpo/model"},
    }


def test_mlflow_without_a_server_is_refused_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with (
        pytest.raises(ValueError, match="MLFLOW_TRACKING_URI.*preftune-mlflow Secret"),
        tracking.tracked("mlflow", stage="sft", params={}),
    ):
        pass


def test_missing_mlflow_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ImportError, match=r"preftune\[mlflow\]"):
        tracking.make_tracker("mlflow", run_name="sft", log_dir=None)


def test_tracking_imports_mlflow_only_when_asked(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from preftune.report import tracking\n"
        "from preftune.train.loop import History\n"
        f"with tracking.tracked('tensorboard', stage='sft', params={{}}, log_dir={str(tmp_path)!r}):\n"
        "    History().log_train(1, {'loss': 1.0})\n"
        "with tracking.tracked('none', stage='sft', params={}):\n"
        "    History().log_train(1, {'loss': 1.0})\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------------------- the cluster


def test_pods_get_the_optional_mlflow_secret_and_their_kfp_run() -> None:
    from preftune.pipelines import cluster

    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "dpo.yaml").read_text(encoding="utf-8")))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    dpo_pod = executors["exec-dpo"]
    (secret,) = [s for s in dpo_pod["secretAsEnv"] if s["secretName"] == cluster.MLFLOW_SECRET]
    assert secret["optional"] is True
    assert {k["envVar"] for k in secret["keyToEnv"]} == set(cluster.MLFLOW_KEYS)
    fields = {f["name"]: f["fieldPath"] for f in dpo_pod["fieldPathAsEnv"]}
    assert fields["KFP_RUN_ID"] == "metadata.labels['pipeline/runid']"
    container = docs[0]["deploymentSpec"]["executors"]["exec-dpo"]["container"]
    assert {"name": "KFP_TASK_NAME", "value": "dpo"} in container["env"]
    assert set(tracking.KFP_TAGS) >= {*cluster.KFP_RUN_FIELDS, "KFP_TASK_NAME", "KFP_POD_NAME"}


def test_the_mlflow_secret_template_names_what_the_pipelines_read() -> None:
    from preftune.pipelines import cluster

    (secret,) = yaml.safe_load_all((ROOT / "infra" / "k8s" / "mlflow-secret.template.yaml").read_text())
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == cluster.MLFLOW_SECRET
    assert set(secret["stringData"]) == set(cluster.MLFLOW_KEYS)
    assert all(re.fullmatch(r"<[a-z-]+>", v) for v in secret["stringData"].values())
