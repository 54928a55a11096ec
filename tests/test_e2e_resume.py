"""End to end: `preftune run dpo` killed with SIGKILL in the middle of its DPO step, then `--resume`: the steps that
finished are reused, DPO continues from its checkpoint, and the policy equals an uninterrupted run's (1e-6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from e2e import PREFTUNE, bundled_slice

SETTINGS = {
    "eval_fraction": 0.2,
    "sft_max_steps": 10,
    "dpo_max_steps": 32,
    "checkpoint_every": 8,
    "num_checkpoints": 1,
    "eval_max_prompts": 4,
    "eval_max_new_tokens": 8,
}


def _argv(root: Path, params: dict) -> list[str]:
    argv = [PREFTUNE, "run", "dpo", "--pipeline-root", str(root)]
    for name, value in params.items():
        argv += ["--param", f"{name}={value}"]
    return argv


def _wait_for(condition, seconds: float = 1200.0) -> None:  # noqa: ANN001 - a callable
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(str(Path(summary["steps"]["dpo"]["artifacts"]["model"]) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("resume-data")
    return {
        **SETTINGS,
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 200),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 320),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 6),
    }


@pytest.mark.slow
def test_sigkill_in_the_dpo_step_then_resume_gives_the_uninterrupted_weights(
    tmp_path: Path, data: dict
) -> None:
    whole = subprocess.run(_argv(tmp_path / "whole", data), capture_output=True, text=True, timeout=3600)
    assert whole.returncode == 0, whole.stdout[-3000:]
    (whole_dir,) = (tmp_path / "whole").glob("preftune-dpo-*")

    root = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runner = subprocess.Popen(_argv(root, data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    _wait_for(lambda: len(list(root.glob("preftune-dpo-*/dpo/model-checkpoints/step-*/_COMPLETE.json"))) > 0)
    (run_dir,) = root.glob("preftune-dpo-*")
    step = json.loads((run_dir / "run.json").read_text())["attempts"][-1]["step"]
    assert step["task"] == "dpo"
    runner.send_signal(signal.SIGKILL)
    runner.communicate(timeout=60)
    # it was killed mid-training
    assert not (run_dir / "dpo" / "model" / "adapter_model.safetensors").exists()
    _wait_for(lambda: not _alive(step["pid"]), seconds=30)  # the DPO step went with its runner

    listed = subprocess.run([PREFTUNE, "runs", "--pipeline-root", str(root)], capture_output=True, text=True)
    assert "INTERRUPTED" in listed.stdout and f"--resume {run_dir}" in listed.stdout

    resumed = subprocess.run(
        [PREFTUNE, "run", "dpo", "--pipeline-root", str(root), "--resume", run_dir.name],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "SUCCEEDED" and summary["attempt"] == 2
    for name in ("ingest", "sft", "preference-import"):
        assert summary["steps"][name]["cached"], name  # finished before the kill: not run again
    assert not summary["steps"]["dpo"]["cached"]
    assert summary["steps"]["dpo"]["metrics"]["resumed_from_step"] in (8, 16, 24)  # from its checkpoint
    ours, reference = _adapter(run_dir), _adapter(whole_dir)
    assert ours.keys() == reference.keys() and ours
    for key in ours:
        assert (ours[key] - reference[key]).abs().max().item() <= 1e-6, key
