"""What PPO keeps across iterations besides the engine's own loop state (step, data order, tokens, history)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from preftune.train.engine import Resumable
from preftune.train.kl_control import KLController
from preftune.train.ppo.prompts import PromptCycler
from preftune.train.ppo.scores import RunningMoments


@dataclass
class PPOState(Resumable):
    """PPO's resumable state, saved whole in every checkpoint.

    ``controller`` holds the KL coefficient, ``cycler`` the prompt order, ``scores`` the running moments of the
    reward model's scores (their normalisation); then the counts and logs its metrics
    and report are made of: iterations whose updates stopped early, KL blow-ups (and the report's note about
    one), seconds and tokens of generation, every update step's clip fraction, and the sample responses shown
    (by iteration, as a string key).
    """

    controller: KLController
    cycler: PromptCycler
    scores: RunningMoments = field(default_factory=RunningMoments)
    early_stops: int = 0
    blowups: int = 0
    blowup_note: str = ""
    rollout_seconds: float = 0.0
    rollout_tokens: int = 0
    all_clip: list[float] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
