"""The alignment methods a comparison can hold: their names, labels and training stages (no imports, so the
pipeline definitions read them at compile time)."""

from __future__ import annotations

#: Every method the compare pipeline can train, in report order, with its short label.
LABELS = {
    "dpo": "DPO",
    "rlhf": "RLHF",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "kto": "KTO",
    "online_dpo": "Online DPO",
}
METHODS = tuple(LABELS)
#: Where a label alone would not say what a method trains (verdicts, table headers).
_LONG_LABELS = {"rlhf": "RLHF (reward model + PPO)"}


def long_label(method: str) -> str:
    """The method's label, spelled out where the short one hides what it trains."""
    return _LONG_LABELS.get(method, LABELS[method])


#: Training stages of each method after the shared SFT step. Methods that learn from a reward model pay for it:
#: each would train one if it ran alone.
STAGES = {
    "dpo": ("dpo",),
    "rlhf": ("reward", "ppo"),
    "grpo": ("reward", "grpo"),
    "rloo": ("reward", "rloo"),
    "kto": ("kto",),
    "online_dpo": ("reward", "online_dpo"),
}
#: Methods optimised against the pipeline's reward model: a judge that is that reward model favours them.
REWARD_MODEL_METHODS = tuple(m for m in METHODS if "reward" in STAGES[m])
