"""Reward-model scores as PPO's reward: normalised by their running moments, then clipped.

A reward model's scale is arbitrary (its Bradley-Terry loss fixes only differences), so a fixed KL coefficient
means something different for every reward model. PPO-max ("Secrets of RLHF in Large Language Models Part I",
Zheng et al. 2023) normalises the scores by the running mean and standard deviation of every score seen so far
and clips the result; the KL penalty per token then weighs against scores of unit spread whatever the reward
model. The moments are global (every process's scores) and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from preftune.train.engine import Resumable


@dataclass
class RunningMoments(Resumable):
    """Count, mean and sum of squared deviations of every value seen (Chan et al.'s parallel update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of values."""
        values = values.detach().double().flatten().cpu()
        n = int(values.numel())
        if n == 0:
            return
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """The standard deviation of every value so far (1 before two values: nothing to scale by yet)."""
        if self.count < 2 or self.m2 <= 0:
            return 1.0
        return math.sqrt(self.m2 / self.count)

    def normalise(self, values: torch.Tensor, clip: float) -> torch.Tensor:
        """``(values - mean) / std`` with the moments as they are now, clipped to +- ``clip``."""
        scaled = (values - self.mean) / self.std
        return scaled.clamp(-clip, clip).to(values.dtype)
