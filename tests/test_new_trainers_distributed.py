"""GRPO, online DPO and KTO on 2 CPU processes (torchrun, gloo, DDP), through the production worker
(``preftune.launch.distributed.main``) with the launch stage entries proposed for them (``NEW_STAGES``; the lead
adds them to ``preftune.launch.stages.STAGES``).

What multi-process training must keep for these methods:

- GRPO: each process samples its own share of the prompts from its own random stream, and a prompt's K answers
  stay on one process (its advantages need no other process); both processes take the same number of steps and
  their policies stay identical (DDP); a Python reward function runs in every worker.
- Online DPO: the pairs of both processes are shared, so both train on the same list in the same order, each
  taking half of every step's pairs.
- KTO: the reference point is the mean of the processes' estimates, the same on both; at step 0 (policy =
  reference) the run matches one process exactly. Later steps differ from one process by design: each process
  pairs the prompts and answers of its own half of the batch (the paper's "mismatched pairs in the batch").

Run by torchrun, this file installs the stage entries and recorders in each process, then hands over to the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, when torchrun runs this file as a script

from tiny_models import make_counting_reward, make_policy_dir, pair_rows, write_jsonl  # noqa: E402

WORKERS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def ends_with_eos(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """A reward function run in every worker: a little for short answers."""
    return [0.1 * (len(c) < 20) for c in completions]


def new_stages() -> dict[str, Any]:
    """The launch entries of the new stages, as proposed for preftune.launch.stages.STAGES."""
    from preftune.launch.stages import Stage

    return {
        "grpo": Stage(
            "preftune.train.group_rl",
            "train_grpo",
            "GRPOConfig",
            models=("sft_model", "reward_model"),
            optional_outputs={"snapshot_dir": "dir"},
            split_batches=(),
            divisible=("prompts_per_iteration", "mini_batch_size"),
        ),
        "online_dpo": Stage(
            "preftune.train.online_dpo",
            "train_online_dpo",
            "OnlineDPOConfig",
            models=("sft_model", "reward_model"),
            optional_outputs={"snapshot_dir": "dir"},
            split_batches=(),
            divisible=("prompts_per_round", "batch_size"),
        ),
        "kto": Stage(
            "preftune.train.kto",
            "train_kto",
            "KTOConfig",
            models=("sft_model",),
            optional_outputs={"snapshot_dir": "dir"},
        ),
    }


# ------------------------------------------------------------------------------- recording, in every process


def _digest(values: Any) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _policy_digest(trainer: Any) -> str:
    import torch

    policy = trainer.accelerator.unwrap_model(trainer.policy)
    flat = torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def _install_recorders(trace: dict[str, list]) -> None:
    import torch

    from preftune.model import policy_losses
    from preftune.train import kto, online_dpo
    from preftune.train.group_rl import trainer as group_trainer

    for cls, name in ((group_trainer.GroupRLTrainer, "grpo"), (online_dpo.OnlineDPOTrainer, "online_dpo")):
        collect, update = cls.collect, cls.update

        def record_collect(self, iteration, _collect=collect, _name=name):
            rng = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
            experience = _collect(self, iteration)
            row = {"stage": _name, "iteration": iteration, "rng": rng}
            if _name == "grpo":
                k = self.config.num_generations
                row["prompts"] = [p[0]["content"] for p in experience.rollout.prompts]
                row["group_sums"] = experience.advantages.view(-1, k).sum(dim=1).tolist()
            else:
                row["pairs"] = len(experience.pairs)
                row["pairs_digest"] = _digest(
                    [[p["chosen_ids"], p["rejected_ids"]] for p in experience.pairs]
                )
            trace["collect"].append(row)
            return experience

        def record_update(self, experience, _update=update, _name=name):
            halt = _update(self, experience)
            trace["update"].append(
                {"stage": _name, "steps": experience.logged["steps"], "policy": _policy_digest(self)}
            )
            return halt

        cls.collect, cls.update = record_collect, record_update

    best_worst = policy_losses.best_worst_pairs

    def record_pairs(scores, group_size, *, min_gap=0.0):
        pairs = best_worst(scores, group_size, min_gap=min_gap)
        trace["local_pairs"].append(len(pairs))
        return pairs

    online_dpo.best_worst_pairs = record_pairs
    reference_point = kto.kto_reference_point

    def record_reference_point(kl_logps, ref_kl_logps, reduce=None):
        z0 = reference_point(kl_logps, ref_kl_logps, reduce=reduce)
        # this process's own estimate, before the mean over processes and the clamp
        local = (kl_logps.detach().float() - ref_kl_logps.detach().float()).mean()
        trace["z0"].append({"global": float(z0), "local": float(local)})
        return z0

    kto.kto_reference_point = record_reference_point


def _worker_main(argv: list[str]) -> int:
    """What torchrun runs in each process: the production worker once per ``SPEC:RESULT`` pair, recorded."""
    from preftune.launch import distributed, stages

    stages.STAGES.update(new_stages())
    rank = os.environ.get("RANK", "0")
    for pair in argv:
        spec, result = pair.split(":")
        trace: dict[str, list] = {"collect": [], "update": [], "local_pairs": [], "z0": []}
        _install_recorders(trace)
        distributed.main(["worker", "--spec", spec, "--result", result])
        Path(result).with_suffix(f".rank{rank}.trace.json").write_text(json.dumps(trace), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))


# ----------------------------------------------------------------------------------------------- the runs


def _calls(root: Path, tag: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    from preftune.config.grpo import GRPOConfig
    from preftune.config.kto import KTOConfig
    from preftune.config.online_dpo import OnlineDPOConfig

    data = root / "data"
    if not data.exists():
        data.mkdir()
        make_counting_reward(make_policy_dir(data / "policy"), data / "reward", target=5)
        write_jsonl(data / "pairs-train.jsonl", pair_rows(16))
        write_jsonl(data / "pairs-eval.jsonl", pair_rows(22)[16:])
        write_jsonl(data / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(16)])

    def outputs(stage: str) -> dict[str, str]:
        return {
            "model_dir": str(root / tag / stage / "model"),
            "report_path": str(root / tag / stage / "report.html"),
        }

    sampling = dict(
        max_new_tokens=8, max_prompt_length=24, forward_batch_size=16, kl_blowup=0.0, learning_rate=3e-3
    )
    grpo = GRPOConfig(
        iterations=3,
        prompts_per_iteration=8,
        num_generations=4,
        mini_batch_size=16,
        reward_functions="test_new_trainers_distributed:ends_with_eos",
        **sampling,
    )
    online = OnlineDPOConfig(rounds=3, prompts_per_round=8, num_generations=4, batch_size=4, **sampling)
    kto = KTOConfig(
        epochs=2, batch_size=8, eval_batch_size=4, learning_rate=5e-3, max_length=48, logging_steps=1,
        eval_steps=1, warmup_ratio=0.0,
    )  # fmt: skip
    policy, reward, prompts = str(data / "policy"), str(data / "reward"), str(data / "prompts.jsonl")
    sampled = {"sft_model": policy, "reward_model": reward, "prompts": prompts}
    return {
        "grpo": (grpo, {**sampled, **outputs("grpo")}),
        "online_dpo": (online, {**sampled, **outputs("online_dpo")}),
        "kto": (
            kto,
            {
                "sft_model": policy,
                "train_data": str(data / "pairs-train.jsonl"),
                "eval_data": str(data / "pairs-eval.jsonl"),
                **outputs("kto"),
            },
        ),
    }


def _run_workers(calls: dict[str, tuple[Any, dict[str, Any]]], tmp: Path) -> dict[str, tuple[dict, list]]:
    """One torchrun launch of 2 CPU processes running each stage call in turn; per stage (metrics, traces of
    every rank)."""
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"workers failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    out = {}
    for stage in calls:
        result = tmp / f"{stage}.metrics.json"
        traces = [json.loads(result.with_suffix(f".rank{r}.trace.json").read_text()) for r in range(WORKERS)]
        out[stage] = (json.loads(result.read_text()), traces)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distributed-new")
    _calls(path, "one")
    return path


@pytest.fixture(scope="module")
def two(root: Path) -> dict[str, tuple[dict, list]]:
    from preftune.launch import stages

    saved = dict(stages.STAGES)
    stages.STAGES.update(new_stages())
    try:
        (root / "two").mkdir()
        yield _run_workers(_calls(root, "two"), root / "two")
    finally:
        stages.STAGES.clear()
        stages.STAGES.update(saved)


def test_grpo_keeps_groups_on_one_process_and_the_replicas_in_step(root: Path, two: dict) -> None:
    metrics, traces = two["grpo"]
    assert metrics["iterations"] == 3 and metrics["kl_blowups"] == 0
    collects = [[r for r in t["collect"] if r["stage"] == "grpo"] for t in traces]
    for rank in collects:
        assert len(rank) == 3
        for row in rank:  # 4 prompts x 4 answers on each process, each prompt's answers together
            assert len(row["prompts"]) == 16
            assert all(len(set(row["prompts"][g : g + 4])) == 1 for g in range(0, 16, 4))
            assert max(abs(s) for s in row["group_sums"]) < 1e-4  # GRPO's advantages centre within a group
    for first, second in zip(*collects, strict=True):
        assert not set(first["prompts"]) & set(second["prompts"])  # each process its own prompts
        assert first["rng"] != second["rng"]  # and its own random stream
    updates = [[r for r in t["update"] if r["stage"] == "grpo"] for t in traces]
    assert [u["steps"] for u in updates[0]] == [u["steps"] for u in updates[1]] == [2.0, 2.0, 2.0]
    assert [u["policy"] for u in updates[0]] == [u["policy"] for u in updates[1]]  # DDP kept them equal
    assert len({u["policy"] for u in updates[0]}) == 3  # and they did learn
    lineage = json.loads((root / "two" / "grpo" / "model" / "lineage.json").read_text())
    assert lineage["stage"] == "grpo"
    assert lineage["parameters"]["prompts_per_iteration"] == 8  # the global batch, as asked


def test_online_dpo_processes_share_their_pairs(root: Path, two: dict) -> None:
    metrics, traces = two["online_dpo"]
    assert metrics["iterations"] == 3
    collects = [[r for r in t["collect"] if r["stage"] == "online_dpo"] for t in traces]
    local = [t["local_pairs"] for t in traces]
    for r in range(3):
        shared = collects[0][r]
        assert shared["pairs"] == collects[1][r]["pairs"] == local[0][r] + local[1][r]
        assert shared["pairs_digest"] == collects[1][r]["pairs_digest"]  # the same list, in the same order
    assert metrics["pairs"] == sum(local[0]) + sum(local[1])
    updates = [[r for r in t["update"] if r["stage"] == "online_dpo"] for t in traces]
    assert [u["steps"] for u in updates[0]] == [u["steps"] for u in updates[1]]
    assert [u["policy"] for u in updates[0]] == [u["policy"] for u in updates[1]]
    assert metrics["first_step_loss"] == pytest.approx(0.6931472, abs=1e-5)


def test_kto_reference_point_is_shared_and_step_0_matches_one_process(
    root: Path, two: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from preftune.launch import stages
    from preftune.launch.distributed import Scale, run_stage

    monkeypatch.setattr(stages, "STAGES", {**stages.STAGES, **new_stages()})
    config, kwargs = _calls(root, "one")["kto"]
    one = run_stage("kto", config, scale=Scale(num_gpus=1), **kwargs)
    metrics, traces = two["kto"]

    assert metrics["steps"] == one["steps"] == 8  # 32 examples (16 pairs) / 8, 2 epochs
    z0 = [t["z0"] for t in traces]
    assert len(z0[0]) == len(z0[1]) > 0
    for a, b in zip(*z0, strict=True):
        assert a["global"] == pytest.approx(b["global"], abs=1e-6)  # every process uses the same z0
        assert a["global"] == pytest.approx(max(0.0, (a["local"] + b["local"]) / 2), abs=1e-5)  # their mean
    assert any(abs(a["local"] - b["local"]) > 1e-4 for a, b in zip(*z0, strict=True))  # from different halves
    assert metrics["first_step_loss"] == pytest.approx(one["first_step_loss"], abs=1e-6)
    assert metrics["first_eval_logp_accuracy"] == one["first_eval_logp_accuracy"]
    assert metrics["eval_reward_accuracy"] > 0.5 and one["eval_reward_accuracy"] > 0.5
    assert (root / "two" / "kto" / "model" / "lineage.json").is_file()
