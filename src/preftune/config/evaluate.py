"""Settings of the evaluate step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    """Settings of one evaluation run (the evaluate component exposes each field as a parameter)."""

    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens generated per response."})
    temperature: float = field(
        default=0.7,
        metadata={
            "help": "Sampling temperature of the displayed generations (0 = greedy). Same for both models."
        },
    )
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling threshold of the displayed generations (1 = off)."}
    )
    seed: int = field(
        default=0,
        metadata={"help": "Random seed; both models sample with it, so differences come from the models."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO beta scaling the implicit rewards on the held-out preference pairs."},
    )
    max_prompts: int = field(default=64, metadata={"help": "Evaluate on at most this many held-out prompts."})
    batch_size: int = field(
        default=16, metadata={"help": "Prompts (or sequences) per forward/generate batch."}
    )

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.beta <= 0:
            problems.append("beta must be > 0")
        if self.max_prompts < 1:
            problems.append("max_prompts must be >= 1")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.seed < 0:
            problems.append("seed must be >= 0")
        for name in ("temperature", "top_p", "beta"):
            if not abs(getattr(self, name)) < float("inf"):  # NaN passes every comparison above
                problems.append(f"{name} must be a finite number")
        if problems:
            raise ValueError("EvalConfig: " + "; ".join(problems))
