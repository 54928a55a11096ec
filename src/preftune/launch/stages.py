"""What a launcher needs to know about a training stage, shared by every way of running one.

The stage table (which function and config class each stage has, which arguments name models and outputs, which
batch fields are split among workers), how wide a step runs (:class:`Scale`), the JSON a worker reads, and the
environment that tells accelerate how to distribute. :mod:`preftune.launch.distributed` (one process or
torchrun on this node) and :mod:`preftune.launch.trainjob` (a Kubeflow Trainer TrainJob) both build on it
instead of on each other.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.config.scale import STRATEGIES
from preftune.launch import platform

#: How torchrun is started everywhere (the local launcher and a TrainJob's pods): as a module of the running
#: interpreter, never the ``torchrun`` console script, which on a PATH can belong to another Python (the CUDA
#: base image's conda) that has no preftune.
TORCHRUN_MODULE = ("-m", "torch.distributed.run")
#: The module every torchrun worker runs.
WORKER_MODULE = "preftune.launch.distributed"


@dataclass(frozen=True)
class Stage:
    """How to call one training stage and what its arguments mean to a launcher.

    ``models`` are the arguments naming models (downloaded once per node before the workers load them).
    ``outputs`` maps the names of output arguments to ``"dir"`` or ``"file"``; ``optional_outputs`` likewise for
    outputs a call may leave out (None), such as DPO's and PPO's training snapshots. ``split_batches`` are the config
    fields holding a global batch that each worker takes its share of; ``divisible`` are global batch fields
    the trainer already splits itself (PPO), which only need to divide evenly. ``fsdp`` says whether the trainer
    is ready for FSDP: under FSDP its rank-0-only save must first gather the sharded weights on every rank
    (``accelerator.get_state_dict``), which none of the trainers do yet.
    """

    module: str
    function: str
    config_class: str
    models: tuple[str, ...]
    outputs: Mapping[str, str] = field(default_factory=lambda: {"model_dir": "dir", "report_path": "file"})
    optional_outputs: Mapping[str, str] = field(default_factory=dict)
    split_batches: tuple[str, ...] = ("batch_size", "eval_batch_size")
    divisible: tuple[str, ...] = ()
    fsdp: bool = False

    def output_kinds(self, kwargs: Mapping[str, Any]) -> dict[str, str]:
        """The outputs of one call: the required ones, and the optional ones it was given (not None)."""
        given = {k: v for k, v in self.optional_outputs.items() if kwargs.get(k) is not None}
        return {**self.outputs, **given}

    def load(self) -> tuple[Any, type]:
        module = importlib.import_module(self.module)
        return getattr(module, self.function), getattr(module, self.config_class)


STAGES: dict[str, Stage] = {
    "sft": Stage("preftune.train.sft", "train_sft", "SFTConfig", models=("base_model",)),
    "reward": Stage("preftune.train.reward", "train_reward_model", "RewardConfig", models=("sft_model",)),
    "dpo": Stage(
        "preftune.train.dpo",
        "train_dpo",
        "DPOConfig",
        models=("sft_model",),
        optional_outputs={"snapshot_dir": "dir"},
    ),
    "ppo": Stage(
        "preftune.train.ppo",
        "train_ppo",
        "PPOConfig",
        models=("sft_model", "reward_model"),
        optional_outputs={"snapshot_dir": "dir"},
        split_batches=(),
        divisible=("rollout_batch_size", "mini_batch_size"),
    ),
    # GRPO, Dr. GRPO and RLOO (config.estimator picks); each process samples its own prompts' groups
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


@dataclass
class Scale:
    """How wide a training step runs. The defaults keep today's behaviour: one process on one device.

    Attributes:
        num_gpus: Worker processes per node, one per GPU. 0 = every GPU the step's pod sees (one process on a
            pod without GPUs). On a machine without CUDA, a positive value starts that many CPU processes
            (gloo), which is how the tests run DDP.
        num_nodes: Nodes; more than 1 submits the step as a Kubeflow Trainer TrainJob.
        strategy: ``ddp`` (a full replica per GPU) or ``fsdp`` (parameters, gradients and optimizer state
            sharded across GPUs, through accelerate's FSDP plugin).
        trainjob_runtime: The ClusterTrainingRuntime a TrainJob refers to (Kubeflow Trainer's torch runtime).
        timeout_seconds: Longest a multi-process run or a TrainJob may take (0 = the step's training timeout).
        poll_seconds: How often the TrainJob's status is read.
        keep_checkpoints: Keep the resumable checkpoints after the stage succeeds (they are removed otherwise).
    """

    num_gpus: int = 0
    num_nodes: int = 1
    strategy: str = "ddp"
    trainjob_runtime: str = "torch-distributed"
    timeout_seconds: int = 0
    poll_seconds: float = 15.0
    keep_checkpoints: bool = False

    def check(self) -> None:
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 (0 = all visible GPUs), got {self.num_gpus}")
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"distributed_strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.num_nodes > 1 and not self.trainjob_runtime.strip():
            raise ValueError("trainjob_runtime must name a ClusterTrainingRuntime when num_nodes > 1")
        if self.timeout_seconds < 0 or self.poll_seconds <= 0:
            raise ValueError("timeout_seconds must be >= 0 and poll_seconds > 0")

    def timeout(self) -> int:
        return self.timeout_seconds or platform.training_timeout()


class StageFailed(RuntimeError):
    """A stage's worker processes (or its TrainJob) failed; the message says where and why."""


def is_artifact(value: Any) -> bool:
    """A KFP artifact (anything with ``path`` and ``uri``), which is a local path here and a URI elsewhere."""
    return hasattr(value, "path") and hasattr(value, "uri") and not isinstance(value, str | Path)


def in_object_storage(value: Any) -> bool:
    """Whether ``value`` is a URI in object storage (``s3://``, or ``minio://`` which is S3 at its endpoint)."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in ("s3", "minio") and "://" in value


def stage_spec(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}") from None


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def per_worker_config(stage: str, config: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """The config each of ``world_size`` workers runs with: global batch fields divided among them.

    A batch that does not divide evenly is refused rather than rounded, so the global batch is exactly the
    one asked for.
    """
    spec = stage_spec(stage)
    out = dict(config)
    for name in (*spec.split_batches, *spec.divisible):
        value = out.get(name)
        if value is None:
            continue
        if value % world_size:
            raise ValueError(
                f"{stage}: {name}={value} does not divide among {world_size} worker processes; choose a "
                f"multiple of {world_size}"
            )
    for name in spec.split_batches:
        if out.get(name) is not None:
            out[name] = out[name] // world_size
    return out


def call_json(stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str:
    """The stage call as the JSON the workers read (``kwargs`` already plain strings / numbers / None)."""
    return json.dumps({"stage": stage, "config": dict(config), "kwargs": dict(kwargs)}, sort_keys=True)


def worker_env(strategy: str, *, cpu: bool) -> dict[str, str]:
    """Environment that tells accelerate, in every worker, how to distribute (its own settings, no code).

    ``ACCELERATE_USE_CPU`` makes accelerate treat a torchrun world without CUDA as multi-CPU (gloo) instead
    of ignoring it. FSDP goes through accelerate's FSDP plugin: FSDP2 (``fully_shard``) wrapping each
    transformer block (the model's ``_no_split_modules``), a full state dict for saving. accelerate shards on
    GPUs only; on CPU it runs these workers as DDP.
    """
    env = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    if strategy == "fsdp":
        env.update(
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            }
        )
    return env
