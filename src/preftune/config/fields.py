"""The parameter surface shared by every stage's config: allowed ranges and the checks that enforce them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")


#: Allowed ranges of numeric config fields, by field name, for every config that has the field:
#: ``(low, low_inclusive, high, high_inclusive)``, None for no bound. Every numeric value must also be finite.
_AT_LEAST_ONE = (1, True, None, False)


_NON_NEGATIVE = (0, True, None, False)


_POSITIVE = (0, False, None, False)


CONFIG_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    **dict.fromkeys(
        (
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "logging_steps",
            "lora_r",
            "head_chunk_size",
            "iterations",
            "rollout_batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_prompt_length",
            "max_new_tokens",
            "forward_batch_size",
            "kl_horizon",
            "max_prompts",
        ),
        _AT_LEAST_ONE,
    ),
    **dict.fromkeys(
        ("learning_rate", "critic_learning_rate", "lora_alpha", "beta", "clip_range", "clip_range_value"),
        _POSITIVE,
    ),
    **dict.fromkeys(
        (
            "weight_decay",
            "max_grad_norm",
            "eval_steps",
            "pack_length",
            "num_checkpoints",
            "checkpoint_every",
            "samples_shown",
            "margin_scale",
            "kl_coef",
            "vf_coef",
            "max_approx_kl",
            "kl_blowup",
            "missing_eos_penalty",
            "temperature",
            "seed",
        ),
        _NON_NEGATIVE,
    ),
    "target_kl": _POSITIVE,
    "score_clip": _POSITIVE,
    "lora_dropout": (0, True, 1, False),
    "warmup_ratio": (0, True, 1, False),
    "label_smoothing": (0, True, 0.5, False),
    "top_p": (0, False, 1, True),
    "gamma": (0, True, 1, True),
    "lam": (0, True, 1, True),
}


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def check_config(config: Any) -> None:
    """Reject out-of-range settings before any model is loaded, naming the field (``SFTConfig.lora_r must be
    >= 1, got 0``): the ranges in :data:`CONFIG_RANGES` for every field the config has, finite numbers only,
    and ``epochs >= 1`` unless ``max_steps`` sets the length. Stage-specific rules stay in each stage's check."""
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # flags, text, and None (an optional bound that is off)
        rule = CONFIG_RANGES.get(field.name)
        if not math.isfinite(value):
            raise ValueError(f"{name}.{field.name} must be a finite number, got {value!r}")
        if rule is None:
            continue
        low, low_in, high, high_in = rule
        if (low is not None and (value < low or (value == low and not low_in))) or (
            high is not None and (value > high or (value == high and not high_in))
        ):
            raise ValueError(f"{name}.{field.name} must be {_range_text(*rule)}, got {value!r}")
    if hasattr(config, "epochs") and getattr(config, "max_steps", -1) <= 0 and config.epochs < 1:
        raise ValueError(f"{name}.epochs must be >= 1 when max_steps is not set, got {config.epochs!r}")
