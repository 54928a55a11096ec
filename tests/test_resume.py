"""Preemption: a training step killed with SIGKILL mid-run, run again, resumes from its last checkpoint and
ends with the same weights and the same data order as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_counting_reward, make_policy_dir, pair_rows, write_jsonl

from preftune.io import storage

WORKER = str(Path(__file__).with_name("resume_worker.py"))
DEADLINE = 300  # seconds any one run may take on a loaded 2-core machine


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, WORKER, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kill_after_first_checkpoint(spec: dict, checkpoints: Path) -> None:
    """Start the run, SIGKILL it as soon as one checkpoint is complete, and check it really died mid-run."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env()
    )
    deadline = time.monotonic() + DEADLINE
    try:
        while not list(checkpoints.glob(f"step-*/{storage.MANIFEST}")):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not Path(spec["out"]).exists(), "the run finished before the kill: nothing was interrupted"


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    (file,) = Path(model_dir).glob("*.safetensors")
    return load_file(file)


def _lineage(model_dir: str) -> dict:
    return json.loads((Path(model_dir) / "lineage.json").read_text(encoding="utf-8"))


def _assert_same_result(uninterrupted: str, resumed: str) -> None:
    a, b = _weights(uninterrupted), _weights(resumed)
    assert a.keys() == b.keys()
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert gap <= 1e-6, f"final weights differ by {gap}"
    order_a, order_b = (_lineage(d)["data"]["data_order"] for d in (uninterrupted, resumed))
    assert order_a and order_a == order_b  # the same batches, in the same order


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("resume")
    sft = make_policy_dir(root / "sft")
    return {
        "root": str(root),
        "sft": sft,
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(48)),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(20)]),
        "reward": make_counting_reward(sft, root / "reward", target=5),
    }


def _spec(world: dict, stage: str, name: str, config: dict) -> dict:
    root = Path(world["root"]) / name
    return {
        **world,
        "stage": stage,
        "out": str(root / "model"),
        "report": str(root / "report.html"),
        "config": {**config, "checkpoint_uri": str(root / "checkpoints")},
    }


# checkpoints at steps 14, 28, 42: the first lies in the second epoch (12 steps each), so resuming there needs
# that epoch's data order back, not the seed's
DPO = dict(epochs=4, batch_size=4, learning_rate=1e-2, max_length=48, eval_steps=0, checkpoint_every=14)
PPO = dict(
    iterations=12,
    rollout_batch_size=16,
    mini_batch_size=8,
    learning_rate=3e-3,
    critic_learning_rate=1e-2,
    max_prompt_length=32,
    max_new_tokens=10,
    kl_blowup=0.0,
    checkpoint_every=2,
)


@pytest.mark.parametrize(("stage", "config"), [("dpo", DPO), ("ppo", PPO)])
def test_killed_run_resumes_to_the_same_weights_and_data_order(world: dict, stage: str, config: dict) -> None:
    whole_spec = _spec(world, stage, f"{stage}-whole", config)
    whole = _run(whole_spec)
    spec = _spec(world, stage, f"{stage}-killed", config)
    _kill_after_first_checkpoint(spec, Path(spec["config"]["checkpoint_uri"]))
    resumed = _run(spec)  # the retry: same command, same checkpoint_uri

    position = "resumed_from_step" if stage == "dpo" else "resumed_from_iteration"
    assert whole[position] == 0
    assert resumed[position] >= config["checkpoint_every"]  # it continued, it did not start over
    _assert_same_result(whole_spec["out"], spec["out"])
    # what the metrics are made of -- the logs of the steps before the kill -- came back with the checkpoint
    same = (
        ("steps", "first_step_loss", "train_loss", "eval_loss")
        if stage == "dpo"
        else ("iterations", "reward_first", "reward_last", "kl_max")
    )
    for name in same:
        assert resumed[name] == pytest.approx(whole[name], abs=1e-6), name


def test_a_nan_loss_stops_dpo_after_checkpointing_the_last_good_step(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preftune.train import dpo
    from preftune.train.checkpoint import Checkpointer
    from preftune.train.engine import NonFiniteLossError

    real, calls = dpo._losses, {"n": 0}

    def poisoned(*args, **kwargs):
        losses, chosen, rejected = real(*args, **kwargs)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] == 6 else losses), chosen, rejected

    monkeypatch.setattr(dpo, "_losses", poisoned)
    ckpt = tmp_path / "checkpoints"
    config = dpo.DPOConfig(**{**DPO, "checkpoint_every": 100, "checkpoint_uri": str(ckpt)})
    out = tmp_path / "model"
    with pytest.raises(
        NonFiniteLossError, match=r"the loss is nan at step \d+ \(epoch 1, batch \d+\)"
    ) as err:
        dpo.train_dpo(
            world["sft"], world["pairs"], world["pairs"], str(out), str(tmp_path / "r.html"), config
        )
    bad_step = int(re.search(r"at step (\d+)", str(err.value)).group(1))
    assert f"the last good state (step {bad_step - 1}) is saved in {ckpt}" in str(err.value)
    assert not out.exists()  # no model from a diverged run
    (saved,) = Checkpointer(str(ckpt), 1, _Single(), stage="dpo").complete()
    assert saved == bad_step - 1 > 0  # the last good step, although checkpoint_every is 100

    monkeypatch.setattr(dpo, "_losses", real)  # the retry (say with a fixed batch) resumes right there
    metrics = dpo.train_dpo(
        world["sft"], world["pairs"], world["pairs"], str(out), str(tmp_path / "r.html"), config
    )
    assert metrics["resumed_from_step"] == bad_step - 1 and metrics["steps"] == 48


def test_a_nan_loss_stops_ppo_without_applying_it(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preftune.train import ppo
    from preftune.train.checkpoint import Checkpointer
    from preftune.train.engine import NonFiniteLossError
    from preftune.train.ppo import update

    real, calls = update.ppo_policy_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        loss, clip, approx = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), clip, approx

    monkeypatch.setattr(update, "ppo_policy_loss", poisoned)
    ckpt = tmp_path / "checkpoints"
    config = ppo.PPOConfig(**{**PPO, "checkpoint_every": 100, "checkpoint_uri": str(ckpt)})
    # 16 rollouts / minibatch 8 x 4 PPO epochs = 4 updates an iteration: call 7 is iteration 2's third
    with pytest.raises(NonFiniteLossError, match="the loss is nan in iteration 2 after 2 updates"):
        ppo.train_ppo(
            world["sft"],
            world["reward"],
            world["prompts"],
            str(tmp_path / "m"),
            str(tmp_path / "r.html"),
            config,
        )
    assert Checkpointer(str(ckpt), 1, _Single(), stage="ppo").complete() == [2]
    policy = load_file(ckpt / "step-00000002" / "modules" / "policy.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in policy.values())  # the NaN update was never applied


class _Single:
    """The accelerator facts a Checkpointer reads, for listing checkpoints outside a training run."""

    distributed_type = "NO"
    num_processes = 1
    process_index = 0
    is_main_process = True
