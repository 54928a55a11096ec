"""Multi-process training is the same training: SFT, DPO and the reward model on 2 CPU processes (torchrun, gloo,
DDP) follow the loss trajectory of 1 process with the same global batch; PPO on 2 processes completes, whitening advantages with
the moments of the whole rollout batch.

The 2-process runs go through the production worker (``preftune.launch.distributed.main``) under torchrun with the
command ``distributed.torchrun_command`` builds; the only difference is that torchrun starts this file, which
records every logged training row and evaluation (and, for PPO, the whitened advantages of every rank) before
handing over to that worker. The 1-process reference runs in the test process through ``run_stage``.

Tolerance: per-step losses and evaluations agree within ``ATOL`` = 1e-5 (absolute; the losses are ~1-7 nats).
In exact arithmetic they are equal; the gap is float32 summation order (a gradient all-reduce of two halves vs one
pass over the batch), about 1e-7 per step, which Adam carries over a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, when torchrun runs this file as a script

from tiny_models import make_config, make_model_dir, make_policy_dir, make_tokenizer, pair_rows, write_jsonl  # noqa: E402

ATOL = 1e-5
WORKERS = 2
pytestmark = pytest.mark.usefixtures("one_thread")
ANSWERS = [
    "the sky is blue.",
    "two plus two is four, as everyone knows.",
    "paris.",
    "cats like to sleep all day.",
]


# ------------------------------------------------------------------------------- recording, in every process


def _install_recorders(trace: dict[str, list]) -> None:
    """Record History rows (all trainers log through it) and, for PPO, every rank's whitened advantages."""
    import torch

    from preftune.train import loop
    from preftune.train.ppo import advantages, trainer

    log_train, log_eval = loop.History.log_train, loop.History.log_eval

    def record_train(self, step, values, live=None):  # live: throughput, machine-dependent, not compared
        trace["train"].append({"step": step, **{k: float(v) for k, v in values.items()}})
        return log_train(self, step, values, live)

    def record_eval(self, step, epoch, values):
        trace["eval"].append({"step": step, **{k: float(v) for k, v in values.items()}})
        return log_eval(self, step, epoch, values)

    loop.History.log_train, loop.History.log_eval = record_train, record_eval
    whiten = advantages.whiten

    def record_whiten(x, mask, *args, **kwargs):
        out = whiten(x, mask, *args, **kwargs)
        m = mask.double()
        local = [float((out.double() * m).sum()), float(m.sum()), float(((out.double() * m) ** 2).sum())]
        every = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, local)
        trace["whiten"].append({"cross_rank": kwargs.get("reduce") is not None, "ranks": every})
        return out

    advantages.whiten = record_whiten
    generate_rollout = trainer.generate_rollout

    def record_rollout(*args, **kwargs):
        import hashlib

        state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
        every = [state]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, state)
        trace["sampler"].append(every)
        return generate_rollout(*args, **kwargs)

    trainer.generate_rollout = record_rollout


def _worker_main(argv: list[str]) -> int:
    """What torchrun runs in each process: the production worker once per ``SPEC:RESULT`` pair, recorded."""
    from preftune.launch import distributed

    for pair in argv:
        spec, result = pair.split(":")
        trace: dict[str, list] = {"train": [], "eval": [], "whiten": [], "sampler": []}
        _install_recorders(trace)
        distributed.main(["worker", "--spec", spec, "--result", result])
        if os.environ.get("RANK", "0") == "0":
            Path(result).with_suffix(".trace.json").write_text(json.dumps(trace), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))


# ----------------------------------------------------------------------------------------------- the runs


def run_in_process(
    stage: str, config: Any, monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> tuple[dict, dict]:
    """1 process, through run_stage, with the recorders; returns (metrics, trace)."""
    from preftune.launch.distributed import Scale, run_stage
    from preftune.train import loop
    from preftune.train.ppo import advantages, trainer

    trace: dict[str, list] = {"train": [], "eval": [], "whiten": [], "sampler": []}
    monkeypatch.setattr(loop.History, "log_train", loop.History.log_train)
    monkeypatch.setattr(loop.History, "log_eval", loop.History.log_eval)
    monkeypatch.setattr(advantages, "whiten", advantages.whiten)
    monkeypatch.setattr(trainer, "generate_rollout", trainer.generate_rollout)
    _install_recorders(trace)
    metrics = run_stage(stage, config, scale=Scale(num_gpus=1), **kwargs)
    return metrics, trace


def run_workers(calls: dict[str, tuple[Any, dict[str, Any]]], tmp: Path) -> dict[str, tuple[dict, dict]]:
    """One torchrun launch of ``WORKERS`` CPU processes (gloo) running each stage call in turn through the
    production worker (one launch, so the workers import torch and transformers once); per stage returns
    (metrics, trace)."""
    from preftune.launch import distributed

    pairs = []
    for stage, (config, kwargs) in calls.items():
        values = distributed.per_worker_config(stage, distributed.config_dict(config), WORKERS)
        spec = tmp / f"{stage}.call.json"
        spec.write_text(distributed.call_json(stage, values, kwargs), encoding="utf-8")
        pairs.append(f"{spec}:{tmp / f'{stage}.metrics.json'}")
    cmd = distributed.torchrun_command(WORKERS, pairs)
    at = cmd.index("--module")
    cmd[at : at + 3] = [__file__]  # this file instead of `--module preftune.launch.distributed worker`
    env = {**os.environ, **distributed.worker_env("ddp", cpu=True), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return {
        stage: (
            json.loads((tmp / f"{stage}.metrics.json").read_text()),
            json.loads((tmp / f"{stage}.metrics.trace.json").read_text()),
        )
        for stage in calls
    }


def assert_same_trajectory(one: list[dict], two: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], abs=ATOL), f"step {a['step']}: {key} {a[key]} vs {b[key]}"
    gap = max(abs(a[k] - b[k]) for a, b in zip(one, two, strict=True) for k in keys)
    print(
        f"{len(one)} rows, {', '.join(keys)}: first {one[0][keys[0]]:.6f}, last {one[-1][keys[0]]:.6f}, max gap {gap:.2e}"
    )


def sft_rows(n: int) -> list[dict]:
    # answers of different lengths: the two ranks see different token counts in every step
    return [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"question {i % 4}"}],
            "completion": ANSWERS[i % 4],
        }
        for i in range(n)
    ]


def make_reward_dir(policy_dir: str, out: Path) -> str:
    """A random one-scalar reward model on the policy's tokenizer (PPO only needs scores here)."""
    import torch
    from transformers import LlamaForSequenceClassification

    from preftune.model import modeling

    tok = modeling.load_tokenizer(policy_dir)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(make_config(tok, num_labels=1))
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return str(out)


def stage_calls(root: Path, tag: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The three stage calls (config, arguments) on tiny models and data under ``root``; outputs under ``tag``."""
    from preftune.train.dpo import DPOConfig
    from preftune.train.ppo import PPOConfig
    from preftune.train.reward import RewardConfig
    from preftune.train.sft import SFTConfig

    data = root / "data"
    if not data.exists():
        data.mkdir()
        tok = make_tokenizer([*ANSWERS, "<|user|> <|assistant|> question what is tell me"])
        make_model_dir(data / "base", tok)
        write_jsonl(data / "sft-train.jsonl", sft_rows(24))
        write_jsonl(data / "sft-eval.jsonl", sft_rows(6))  # 6 rows: the last eval batch is uneven
        make_reward_dir(make_policy_dir(data / "policy"), data / "reward")
        write_jsonl(data / "pairs-train.jsonl", pair_rows(16))
        write_jsonl(data / "pairs-eval.jsonl", pair_rows(6))
        write_jsonl(data / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(16)])

    def outputs(stage: str) -> dict[str, str]:
        return {
            "model_dir": str(root / tag / stage / "model"),
            "report_path": str(root / tag / stage / "report.html"),
        }

    sft = SFTConfig(
        epochs=2,
        batch_size=8,
        eval_batch_size=4,
        learning_rate=3e-3,
        max_length=48,
        logging_steps=1,
        eval_steps=1,
    )
    dpo = DPOConfig(
        epochs=2,
        batch_size=8,
        eval_batch_size=4,
        learning_rate=5e-3,
        max_length=48,
        logging_steps=1,
        eval_steps=1,
        warmup_ratio=0.0,
    )
    reward = RewardConfig(
        epochs=2,
        batch_size=8,
        eval_batch_size=4,
        learning_rate=5e-3,
        max_length=48,
        logging_steps=1,
        eval_steps=1,
    )
    ppo = PPOConfig(
        iterations=3,
        rollout_batch_size=8,
        mini_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=8,
        max_prompt_length=24,
        forward_batch_size=8,
        samples_shown=2,
        max_approx_kl=0.0,
        kl_blowup=0.0,
    )
    policy = str(data / "policy")
    return {
        "sft": (
            sft,
            {
                "base_model": str(data / "base"),
                "train_data": str(data / "sft-train.jsonl"),
                "eval_data": str(data / "sft-eval.jsonl"),
                **outputs("sft"),
            },
        ),
        "dpo": (
            dpo,
            {
                "sft_model": policy,
                "train_pairs": str(data / "pairs-train.jsonl"),
                "eval_pairs": str(data / "pairs-eval.jsonl"),
                **outputs("dpo"),
            },
        ),
        "reward": (
            reward,
            {
                "sft_model": policy,
                "train_pairs": str(data / "pairs-train.jsonl"),
                "eval_pairs": str(data / "pairs-eval.jsonl"),
                **outputs("reward"),
            },
        ),
        "ppo": (
            ppo,
            {
                "sft_model": policy,
                "reward_model": str(data / "reward"),
                "prompts": str(data / "prompts.jsonl"),
                **outputs("ppo"),
            },
        ),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distributed")
    stage_calls(path, "one")
    return path


@pytest.fixture(scope="module")
def two(root: Path) -> dict[str, tuple[dict, dict]]:
    """The three stages on 2 processes, in one torchrun launch."""
    (root / "two").mkdir()
    return run_workers(stage_calls(root, "two"), root / "two")


def one(root: Path, stage: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    config, kwargs = stage_calls(root, "one")[stage]
    return run_in_process(stage, config, monkeypatch, **kwargs)


def test_sft_on_two_processes_follows_the_one_process_trajectory(root, two, monkeypatch) -> None:
    one_metrics, one_trace = one(root, "sft", monkeypatch)
    two_metrics, two_trace = two["sft"]

    assert one_metrics["steps"] == two_metrics["steps"] == 6  # 24 rows / global batch 8, 2 epochs
    assert len(one_trace["train"]) == 6 and len(one_trace["eval"]) == 7
    assert_same_trajectory(one_trace["train"], two_trace["train"], ("loss", "lr"))
    assert_same_trajectory(one_trace["eval"], two_trace["eval"], ("loss",))
    for key in ("train_loss", "eval_loss", "train_tokens", "train_examples"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=ATOL), key
    assert one_trace["train"][-1]["loss"] < one_trace["train"][0]["loss"] - 0.5  # it did learn something
    assert (root / "two" / "sft" / "model" / "lineage.json").is_file()  # rank 0 saved


def test_dpo_on_two_processes_follows_the_one_process_trajectory(root, two, monkeypatch) -> None:
    one_metrics, one_trace = one(root, "dpo", monkeypatch)
    two_metrics, two_trace = two["dpo"]

    assert one_metrics["steps"] == two_metrics["steps"] == 4
    keys = ("loss", "reward_margin", "chosen_reward", "rejected_reward")
    assert_same_trajectory(one_trace["train"], two_trace["train"], keys)
    assert_same_trajectory(one_trace["eval"], two_trace["eval"], keys)
    # In the first step the policy is the reference: every implicit reward is 0 up to float noise (~1e-8, from
    # batch shapes that differ), so whether chosen beats rejected is a coin toss there; compare it after.
    assert_same_trajectory(one_trace["train"][1:], two_trace["train"][1:], ("reward_accuracy",))
    assert_same_trajectory(one_trace["eval"][1:], two_trace["eval"][1:], ("reward_accuracy",))
    for key in ("first_step_loss", "train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=ATOL), key
    assert two_metrics["first_step_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert one_trace["train"][-1]["loss"] < one_trace["train"][0]["loss"]
    assert (root / "two" / "dpo" / "model" / "lineage.json").is_file()


def test_reward_model_on_two_processes_follows_the_one_process_trajectory(root, two, monkeypatch) -> None:
    one_metrics, one_trace = one(root, "reward", monkeypatch)
    two_metrics, two_trace = two["reward"]

    assert one_metrics["steps"] == two_metrics["steps"] == 4
    assert_same_trajectory(one_trace["train"], two_trace["train"], ("loss", "mean_margin", "accuracy"))
    assert_same_trajectory(one_trace["eval"], two_trace["eval"], ("loss", "mean_margin", "accuracy"))
    for key in ("eval_accuracy", "first_eval_accuracy", "eval_mean_margin"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=ATOL), key


def test_ppo_on_two_processes_whitens_across_ranks(root, two) -> None:
    metrics, trace = two["ppo"]

    assert metrics["iterations"] == 3.0 and metrics["kl_blowups"] == 0.0
    # 8 rollouts per iteration (4 per rank), minibatch 4 (2 per rank): 2 steps each
    assert [r["ppo_steps"] for r in trace["train"]] == [2.0, 2.0, 2.0]
    assert len(trace["whiten"]) == 3
    per_rank_means = []
    for call in trace["whiten"]:
        assert call["cross_rank"], "whitening got no cross-rank reduce"
        assert len(call["ranks"]) == WORKERS
        total, count, squares = (sum(r[i] for r in call["ranks"]) for i in range(3))
        # the whole batch (both ranks' tokens) has mean 0 and variance 1 ...
        assert total / count == pytest.approx(0.0, abs=1e-6)
        assert squares / (count - 1) == pytest.approx(1.0, abs=1e-4)
        per_rank_means += [r[0] / r[1] for r in call["ranks"]]
    # ... and the ranks' own shards do not (per-rank whitening would give each of them mean 0)
    assert max(abs(m) for m in per_rank_means) > 1e-3
    # the reference is the SFT model (adapter off), not the updated policy: KL moves off 0 once the policy did
    kls = [r["kl"] for r in trace["train"]]
    print(f"rollout KL per iteration {kls}, per-rank means of whitened advantages {per_rank_means}")
    assert abs(kls[0]) < 1e-5 and max(abs(k) for k in kls[1:]) > 1e-3
    lineage = json.loads((root / "two" / "ppo" / "model" / "lineage.json").read_text())
    assert lineage["stage"] == "ppo"
    # every rank samples from its own random stream, from the first rollout on (not the same draws on
    # different prompts)
    first = trace["sampler"][0]
    assert len(first) == WORKERS and len(set(first)) == WORKERS
