"""How wide a training step runs: the parameters every training component shares with launch.distributed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.config.fields import check, param, refuse

STRATEGIES = ("ddp", "fsdp")


@dataclass
class ScaleConfig:
    """GPUs, nodes and strategy of one training step (launch.distributed.Scale runs it)."""

    num_gpus: int = param(
        0,
        "Worker processes (one per GPU) in this step, started with torchrun; 0 = every GPU the pod has.",
        low=0,
    )
    num_nodes: int = param(
        1, "Nodes to train on; more than 1 runs the step as a Kubeflow Trainer TrainJob.", low=1
    )
    distributed_strategy: str = param(
        "ddp",
        "ddp (a full replica per GPU) or fsdp (sharded; refused by stages that do not support it yet).",
        choices=STRATEGIES,
    )
    trainjob_runtime: str = param(
        "torch-distributed", "The Kubeflow Trainer runtime a multi-node TrainJob uses."
    )
    keep_checkpoints: bool = param(
        False,
        "Keep the resumable checkpoints (optimizer state included) after the step succeeds; by default they "
        "are deleted then, since only a retried pod needs them.",
    )

    def launch_arguments(self) -> dict[str, Any]:
        """The keyword arguments of launch.distributed.Scale."""
        return {
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "strategy": self.distributed_strategy,
            "trainjob_runtime": self.trainjob_runtime,
            "keep_checkpoints": self.keep_checkpoints,
        }


def validate(config: ScaleConfig) -> None:
    """Refuse a scale no launcher could run, before anything starts."""
    check(config)
    if config.num_nodes > 1 and not config.trainjob_runtime.strip():
        raise refuse(
            config,
            ("trainjob_runtime", "num_nodes"),
            "trainjob_runtime must name a ClusterTrainingRuntime when num_nodes > 1",
        )
