"""Preemption of GRPO, RLOO, online DPO and KTO: a run killed with SIGKILL right after its first checkpoint, run
again with the same checkpoint_uri, resumes there and ends with the same weights, data order and logged metrics as
a run that was never interrupted (as tests/test_resume.py shows for DPO and PPO).

Run as a script (``python test_new_trainers_resume.py '<json>'``) this file is the worker that trains one stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEADLINE = 300  # seconds any one run may take on a loaded 2-core machine
CONFIGS = {
    "grpo": dict(
        estimator="grpo", iterations=10, prompts_per_iteration=6, num_generations=4, mini_batch_size=12,
        learning_rate=3e-3, max_prompt_length=32, max_new_tokens=10, kl_blowup=0.0, checkpoint_every=2,
    ),
    "rloo": dict(
        estimator="rloo", iterations=10, prompts_per_iteration=6, num_generations=4, mini_batch_size=12,
        update_epochs=2, kl_penalty="reward", learning_rate=3e-3, max_prompt_length=32, max_new_tokens=10,
        kl_blowup=0.0, checkpoint_every=2,
    ),
    "online_dpo": dict(
        rounds=8, prompts_per_round=8, num_generations=4, batch_size=4, learning_rate=3e-3, max_prompt_length=32,
        max_new_tokens=10, kl_blowup=0.0, checkpoint_every=2,
    ),
    # 48 examples in batches of 8: 6 steps an epoch; the first checkpoint (step 8) lies in the second epoch
    "kto": dict(epochs=4, batch_size=8, learning_rate=1e-2, max_length=48, eval_steps=0, checkpoint_every=8),
}  # fmt: skip


def main(spec: dict) -> None:
    """The worker: train one stage and print its metrics."""
    import torch

    torch.set_num_threads(1)
    stage, out, report = spec["stage"], spec["out"], spec["report"]
    if stage == "kto":
        from preftune.train.kto import KTOConfig, train_kto

        metrics = train_kto(
            spec["sft"], spec["pairs"], spec["pairs"], out, report, KTOConfig(**spec["config"])
        )
    elif stage == "online_dpo":
        from preftune.train.online_dpo import OnlineDPOConfig, train_online_dpo

        config = OnlineDPOConfig(**spec["config"])
        metrics = train_online_dpo(spec["sft"], spec["reward"], spec["prompts"], out, report, config)
    else:
        from preftune.train.group_rl import GRPOConfig, train_grpo

        config = GRPOConfig(**spec["config"])
        metrics = train_grpo(spec["sft"], spec["reward"], spec["prompts"], out, report, config)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))


# --------------------------------------------------------------------------------------------------- the tests


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _command(spec: dict) -> list[str]:
    return [sys.executable, __file__, json.dumps(spec)]


def _run(spec: dict) -> dict:
    done = subprocess.run(_command(spec), capture_output=True, text=True, env=_env(), timeout=DEADLINE)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kill_after_first_checkpoint(spec: dict) -> None:
    """Start the run, SIGKILL it as soon as one checkpoint is complete, and check it really died mid-run."""
    from preftune.io import storage

    checkpoints = Path(spec["config"]["checkpoint_uri"])
    proc = subprocess.Popen(_command(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    deadline = time.monotonic() + DEADLINE
    try:
        while not list(checkpoints.glob(f"step-*/{storage.MANIFEST}")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not Path(spec["out"]).exists(), "the run finished before the kill: nothing was interrupted"


def _weights(model_dir: str) -> dict:
    from safetensors.torch import load_file

    (file,) = Path(model_dir).glob("*.safetensors")
    return load_file(file)


def _data_order(model_dir: str) -> str:
    return json.loads((Path(model_dir) / "lineage.json").read_text(encoding="utf-8"))["data"]["data_order"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tiny_models import make_counting_reward, make_policy_dir, pair_rows, write_jsonl

    root = tmp_path_factory.mktemp("resume-new")
    sft = make_policy_dir(root / "sft")
    return {
        "root": str(root),
        "sft": sft,
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(24)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(20)]),
        "reward": make_counting_reward(sft, root / "reward", target=5),
    }


def _spec(world: dict, stage: str, name: str) -> dict:
    root = Path(world["root"]) / name
    config = {**CONFIGS[stage], "checkpoint_uri": str(root / "checkpoints")}
    return {
        **world,
        "stage": stage,
        "out": str(root / "model"),
        "report": str(root / "report.html"),
        "config": config,
    }


SAME = {
    "kto": ("steps", "first_step_loss", "train_loss", "eval_loss", "eval_reward_accuracy"),
    "online_dpo": ("iterations", "pairs", "first_step_loss", "reward_first", "reward_last", "kl_max"),
}


@pytest.mark.parametrize("stage", ["grpo", "rloo", "online_dpo", "kto"])
def test_killed_run_resumes_to_the_same_weights_and_data_order(world: dict, stage: str) -> None:
    whole_spec = _spec(world, stage, f"{stage}-whole")
    whole = _run(whole_spec)
    spec = _spec(world, stage, f"{stage}-killed")
    _kill_after_first_checkpoint(spec)
    resumed = _run(spec)  # the retry: same command, same checkpoint_uri

    position = "resumed_from_step" if stage == "kto" else "resumed_from_iteration"
    assert whole[position] == 0
    assert resumed[position] >= CONFIGS[stage]["checkpoint_every"]  # it continued, it did not start over
    a, b = _weights(whole_spec["out"]), _weights(spec["out"])
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap <= 1e-6, f"final weights differ by {gap}"
    assert _data_order(whole_spec["out"]) and _data_order(whole_spec["out"]) == _data_order(spec["out"])
    # what the metrics are made of (the logs of the steps before the kill) came back with the checkpoint
    for name in SAME.get(
        stage, ("iterations", "reward_first", "reward_last", "kl_max", "clip_fraction_mean")
    ):
        assert resumed[name] == pytest.approx(whole[name], abs=1e-6), name
