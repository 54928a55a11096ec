"""The stage launcher (preftune.launch.distributed): how wide a step runs, and what every worker is told.

Runs on CPU. One test starts real torchrun workers (2 gloo processes) on bad data to check that a worker's error
reaches the step as its message; the multi-process training equivalence tests are in test_distributed_training.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import make_model_dir, make_tokenizer, write_jsonl

from preftune.launch import distributed, stages
from preftune.launch.distributed import Scale, StageFailed, run_stage
from preftune.train.ppo import PPOConfig
from preftune.train.sft import SFTConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = ["the sky is blue.", "two plus two is four."]


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


def test_global_batches_are_split_among_workers_or_refused() -> None:
    config = stages.config_dict(SFTConfig(batch_size=16, eval_batch_size=32))
    assert stages.per_worker_config("sft", config, 1) == config
    split = stages.per_worker_config("sft", config, 8)
    assert (split["batch_size"], split["eval_batch_size"]) == (2, 4)
    assert {k: v for k, v in split.items() if "batch_size" not in k} == {
        k: v for k, v in config.items() if "batch_size" not in k
    }
    with pytest.raises(ValueError, match=r"batch_size=16 does not divide among 3 worker processes"):
        stages.per_worker_config("sft", config, 3)
    # PPO divides its rollout and minibatches itself: checked, not changed
    ppo = stages.config_dict(PPOConfig(rollout_batch_size=32, mini_batch_size=8))
    assert stages.per_worker_config("ppo", ppo, 4) == ppo
    with pytest.raises(ValueError, match="mini_batch_size=8 does not divide among 16"):
        stages.per_worker_config("ppo", ppo, 16)


def test_processes_per_node() -> None:
    assert distributed.processes_per_node(Scale(), gpus=0) == 1
    assert distributed.processes_per_node(Scale(), gpus=8) == 8
    assert distributed.processes_per_node(Scale(num_gpus=2), gpus=8) == 2
    assert distributed.processes_per_node(Scale(num_gpus=2), gpus=0) == 2  # CPU workers (gloo)
    with pytest.raises(ValueError, match="sees only 4 GPU"):
        distributed.processes_per_node(Scale(num_gpus=8), gpus=4)


def test_worker_env_is_accelerates_own_configuration() -> None:
    assert stages.worker_env("ddp", cpu=False) == {}
    assert stages.worker_env("ddp", cpu=True) == {"ACCELERATE_USE_CPU": "true"}
    fsdp = stages.worker_env("fsdp", cpu=False)
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    # what accelerate's FSDP plugin makes of it
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.MonkeyPatch.context() as mp:
        for key, value in fsdp.items():
            mp.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_torchrun_command_runs_this_module_as_worker() -> None:
    cmd = distributed.torchrun_command(4, ["--spec", "s.json"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd
    assert cmd[cmd.index("--module") + 1 :] == ["preftune.launch.distributed", "worker", "--spec", "s.json"]


@pytest.mark.parametrize(
    ("scale", "message"),
    [
        (Scale(num_gpus=-1), "num_gpus must be >= 0"),
        (Scale(num_nodes=0), "num_nodes must be >= 1"),
        (Scale(strategy="zero3"), "distributed_strategy must be one of ddp, fsdp"),
        (Scale(num_nodes=2, trainjob_runtime=" "), "trainjob_runtime"),
    ],
)
def test_bad_scale_is_refused(scale: Scale, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run_stage("sft", SFTConfig(), scale=scale, model_dir=str(tmp_path), report_path=str(tmp_path / "r"))


def test_fsdp_is_refused_until_the_trainers_gather_weights_to_save(tmp_path: Path) -> None:
    kwargs = {"model_dir": str(tmp_path / "m"), "report_path": str(tmp_path / "r")}
    for stage in stages.STAGES:
        with pytest.raises(ValueError, match=f"'fsdp' is not supported by the {stage} trainer yet"):
            run_stage(stage, SFTConfig(), scale=Scale(num_gpus=2, strategy="fsdp"), **kwargs)


def test_unknown_stage_and_missing_outputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown stage 'rlhf'"):
        run_stage("rlhf", SFTConfig(), model_dir="m", report_path="r")
    with pytest.raises(ValueError, match="missing output argument"):
        run_stage("sft", SFTConfig(), model_dir=str(tmp_path))


def test_one_process_runs_in_this_process_with_artifact_paths(base: str, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(8))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", rows(4))
    model = Artifact(str(tmp_path / "model"), "s3://bucket/run/sft/model")
    report = Artifact(str(tmp_path / "report.html"), "s3://bucket/run/sft/report")
    config = SFTConfig(epochs=1, batch_size=4, eval_batch_size=4, max_length=32)
    metrics = run_stage(
        "sft",
        config,
        scale=Scale(num_gpus=1),
        base_model=base,
        train_data=Artifact(train, "s3://bucket/run/ingest/train"),
        eval_data=eval_,
        model_dir=model,
        report_path=report,
        model_uri=model.uri,
    )
    assert metrics["steps"] == 2.0
    lineage = json.loads((tmp_path / "model" / "lineage.json").read_text())
    assert lineage["chain"][-1]["uri"] == "s3://bucket/run/sft/model"
    assert (tmp_path / "report.html").is_file()


def test_a_worker_error_reaches_the_step_with_its_message(base: str, tmp_path: Path) -> None:
    """Two torchrun workers (gloo) on data with a bad row: the step fails with the row and field, not a code."""
    bad = rows(8)
    bad[5] = {"id": "x", "completion": "no prompt here"}
    train = write_jsonl(tmp_path / "train.jsonl", bad)
    eval_ = write_jsonl(tmp_path / "eval.jsonl", rows(4))
    with pytest.raises(
        StageFailed, match=r"sft failed on rank 0: DataError: .*train\.jsonl: row 6: field 'prompt'"
    ):
        run_stage(
            "sft",
            SFTConfig(epochs=1, batch_size=4, eval_batch_size=4, max_length=32),
            scale=Scale(num_gpus=2, timeout_seconds=300),
            base_model=base,
            train_data=train,
            eval_data=eval_,
            model_dir=str(tmp_path / "model"),
            report_path=str(tmp_path / "report.html"),
        )
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------ how torchrun is started


def test_torchrun_is_started_as_a_module_everywhere() -> None:
    """Never the ``torchrun`` console script: on a PATH it can belong to another Python (the CUDA base image's
    conda) without preftune, and every worker would fail with ModuleNotFoundError."""
    import ast
    import sys

    from preftune.launch import trainjob

    local = distributed.torchrun_command(2, ["--spec", "s.json"])
    assert local[:3] == [sys.executable, "-m", "torch.distributed.run"]
    settings = trainjob.JobSettings(namespace="ns", image="registry.example.com/preftune:1", gpus_per_node=1)
    job = trainjob.render_trainjob(
        name="preftune-sft-x",
        stage="sft",
        call="{}",
        output_uri="s3://b/p",
        settings=settings,
        num_nodes=2,
        procs_per_node=1,
        strategy="ddp",
        runtime="torch-distributed",
        deadline_seconds=60,
    )
    command = job["spec"]["trainer"]["command"]
    assert command == ["python", "-m", "torch.distributed.run", "--module", "preftune.launch.distributed"]
    # and no launcher module names the console script anywhere a command could be built from
    launch = Path(distributed.__file__).parent
    for path in sorted(launch.glob("*.py")):
        strings = [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)]
        assert "torchrun" not in strings, f"{path.name} uses the torchrun console script"


# -------------------------------------------------------------------------------- after and before a stage


def _sft(base: str, tmp_path: Path) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return dict(
        base_model=base,
        train_data=write_jsonl(tmp_path / "train.jsonl", rows(8)),
        eval_data=write_jsonl(tmp_path / "eval.jsonl", rows(4)),
        model_dir=str(tmp_path / "model"),
        report_path=str(tmp_path / "report.html"),
    )


def test_checkpoints_are_removed_after_success_unless_kept(base: str, tmp_path: Path) -> None:
    config = SFTConfig(epochs=1, batch_size=4, eval_batch_size=4, max_length=32, checkpoint_every=1)
    removed = tmp_path / "removed"
    removed.mkdir()
    (removed / "notes.txt").write_text("not a checkpoint")
    config.checkpoint_uri = str(removed)
    run_stage("sft", config, scale=Scale(num_gpus=1), **_sft(base, tmp_path / "a"))
    assert sorted(p.name for p in removed.iterdir()) == ["notes.txt"], "checkpoints gone, nothing else"
    kept = tmp_path / "kept"
    config.checkpoint_uri = str(kept)
    run_stage("sft", config, scale=Scale(num_gpus=1, keep_checkpoints=True), **_sft(base, tmp_path / "b"))
    assert sorted(p.name for p in kept.iterdir()) == ["step-00000001"]  # the last step is the model itself


def test_minio_checkpoints_go_to_the_s3_endpoint_and_are_removed(base: str, tmp_path: Path, s3) -> None:
    """A minio:// URI (what KFP writes under multi-user Kubeflow's pipeline root) is S3 at the endpoint."""
    uri = f"minio://{s3.bucket}/v2/artifacts/run-1/sft/model-checkpoints"
    config = SFTConfig(epochs=1, batch_size=4, eval_batch_size=4, max_length=32, checkpoint_every=1)
    config.checkpoint_uri = uri
    run_stage("sft", config, scale=Scale(num_gpus=1, keep_checkpoints=True), **_sft(base, tmp_path / "a"))
    prefix = "v2/artifacts/run-1/sft/model-checkpoints/"
    assert {k.split("/")[5] for k in s3.list_keys(prefix)} == {"step-00000001"}
    run_stage("sft", config, scale=Scale(num_gpus=1), **_sft(base, tmp_path / "b"))
    assert s3.list_keys(prefix) == []


def test_a_gpu_pod_whose_torch_sees_no_gpu_fails_clearly(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled with a GPU, in a Kubernetes pod, torch (CPU-only here) sees none: refuse, say why."""
    from preftune.launch.devices import GPUUnavailable

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("PREFTUNE_STEP_GPUS", "1")
    with pytest.raises(GPUUnavailable, match=r"pod has 1 GPU\(s\) \(nvidia.com/gpu\) but torch .* sees none"):
        run_stage("sft", SFTConfig(), scale=Scale(), **_sft(base, tmp_path))
    assert not (tmp_path / "model").exists(), "refused before training"
    monkeypatch.setenv("PREFTUNE_STEP_GPUS", "0")  # a CPU step in the same cluster trains
    monkeypatch.setenv("PREFTUNE_TRAINJOB_LAUNCHERS", "1")  # ... unless compiled as a multi-node launcher
    with pytest.raises(ValueError, match="compiled as a TrainJob launcher .* num_nodes > 1"):
        run_stage("sft", SFTConfig(), scale=Scale(), **_sft(base, tmp_path))


class _Artifact:
    """What KFP's launcher hands a step: a local path and the URI under the pipeline root."""

    def __init__(self, path: Path, uri: str) -> None:
        self.path, self.uri, self.metadata = str(path), uri, {}

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


def test_the_sft_step_runs_under_a_minio_pipeline_root(
    base: str, tmp_path: Path, s3, caplog: pytest.LogCaptureFixture
) -> None:
    """Multi-user Kubeflow's default root is minio://mlpipeline/v2/artifacts: the step's URIs are minio://, its
    checkpoints go there through the S3 endpoint, and are removed once it succeeded."""
    import logging

    from preftune.components import COMPONENTS

    root = f"minio://{s3.bucket}/v2/artifacts/preftune-dpo/run-1"
    data = _sft(base, tmp_path / "in")
    outputs = {
        name: _Artifact(tmp_path / "out" / name, f"{root}/sft/{name}")
        for name in ("model", "metrics", "report")
    }
    with caplog.at_level(logging.INFO, logger="preftune.launch.cleanup"):
        COMPONENTS["sft"].python_func(
            base_model=base,
            train_data=_Artifact(Path(data["train_data"]), f"{root}/ingest/train_data"),
            eval_data=_Artifact(Path(data["eval_data"]), f"{root}/ingest/eval_data"),
            **outputs,
            epochs=1,
            batch_size=4,
            max_length=32,
            checkpoint_every=1,
        )
    assert outputs["metrics"].metadata["steps"] == 2.0
    lineage = json.loads((tmp_path / "out" / "model" / "lineage.json").read_text())
    assert lineage["chain"][-1]["uri"] == f"{root}/sft/model"
    assert f"removed 1 checkpoint(s) under {root}/sft/model-checkpoints" in caplog.text
    assert s3.list_keys("v2/artifacts/") == []  # written there, and gone once the step succeeded
