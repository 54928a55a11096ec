"""Runs one training stage in its own process for the resume tests: ``python resume_worker.py '<json>'``."""

from __future__ import annotations

import json
import sys

import torch


def main(spec: dict) -> None:
    torch.set_num_threads(1)
    if spec["stage"] == "dpo":
        from preftune.train.dpo import DPOConfig, train_dpo

        config = DPOConfig(**spec["config"])
        metrics = train_dpo(spec["sft"], spec["pairs"], spec["pairs"], spec["out"], spec["report"], config)
    else:
        from preftune.train.ppo import PPOConfig, train_ppo

        config = PPOConfig(**spec["config"])
        metrics = train_ppo(spec["sft"], spec["reward"], spec["prompts"], spec["out"], spec["report"], config)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
