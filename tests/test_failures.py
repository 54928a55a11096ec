"""A deterministic failure on a cluster is recorded beside the step's output and a retried attempt of the same
task fails at once with the original reason; transient failures and local runs are untouched."""

from __future__ import annotations

import json

import pytest

from preftune.launch import failures
from preftune.launch.distributed import run_stage
from preftune.launch.stages import Scale


def _body(error: BaseException | None, calls: list[int]):
    calls.append(1)
    if error is not None:
        raise error


def test_a_deterministic_error_is_recorded_and_a_retry_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.delenv(failures.LOCAL_RUN_ENV, raising=False)
    output = str(tmp_path / "model")
    calls: list[int] = []
    with pytest.raises(ValueError, match="lora_r"), failures.not_retried(output):
        _body(ValueError("SFTConfig.lora_r must be >= 1, got 0"), calls)
    record = json.loads((tmp_path / "model-failure.json").read_text())
    assert record == {"type": "ValueError", "message": "SFTConfig.lora_r must be >= 1, got 0"}
    # the retried attempt of the same task (same output URI) does not run its body again
    repeated = pytest.raises(failures.RepeatedFailure, match="ValueError: SFTConfig.lora_r must be >= 1")
    with repeated, failures.not_retried(output):
        _body(None, calls)
    assert calls == [1]
    assert failures.is_deterministic(failures.RepeatedFailure("x"))


def test_a_transient_error_leaves_no_record_so_the_retry_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(failures.LOCAL_RUN_ENV, raising=False)
    output = str(tmp_path / "model")
    calls: list[int] = []
    with pytest.raises(ConnectionError), failures.not_retried(output):
        _body(ConnectionError("endpoint reset"), calls)
    assert not (tmp_path / "model-failure.json").exists()
    with failures.not_retried(output):
        _body(None, calls)
    assert calls == [1, 1]


def test_local_runs_leave_retries_to_the_runner(tmp_path, monkeypatch):
    monkeypatch.setenv(failures.LOCAL_RUN_ENV, str(tmp_path / "failure.json"))
    with pytest.raises(ValueError), failures.not_retried(str(tmp_path / "model")):
        _body(ValueError("bad"), [])
    assert not (tmp_path / "model-failure.json").exists()


def test_run_stage_records_a_configuration_error_of_its_stage(tmp_path, monkeypatch):
    from preftune.config.sft import SFTConfig

    monkeypatch.delenv(failures.LOCAL_RUN_ENV, raising=False)
    kwargs = {
        "base_model": "examples/tiny-llama",
        "train_data": str(tmp_path / "missing.jsonl"),
        "eval_data": str(tmp_path / "missing.jsonl"),
        "model_dir": str(tmp_path / "model"),
        "report_path": str(tmp_path / "report.html"),
    }
    with pytest.raises(Exception) as first:
        run_stage("sft", SFTConfig(max_steps=1), scale=Scale(), **kwargs)
    assert failures.is_deterministic(first.value)
    assert (tmp_path / "model-failure.json").is_file()
    with pytest.raises(failures.RepeatedFailure, match=type(first.value).__name__):
        run_stage("sft", SFTConfig(max_steps=1), scale=Scale(), **kwargs)
