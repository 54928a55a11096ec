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
