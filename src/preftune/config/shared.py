"""Fields several stages share, declared once so a name means the same thing in every config and component.

Batch sizes are global: the examples of one batch summed over all worker processes, each of N workers taking
``batch_size / N`` (launch.distributed splits them), and an optimisation step takes
``gradient_accumulation_steps`` batches. On one process with no accumulation that is simply the examples per
optimisation step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from preftune.config.fields import ATTENTION_CHOICES, MIXED_PRECISION_CHOICES, PRECISION_CHOICES, param

#: How much lower full fine-tuning's default learning rate is than LoRA's. LoRA's best learning rate is about
#: ten times full fine-tuning's (Schulman et al., "LoRA Without Regret", 2025; the LoRA paper's own settings
#: agree). Measured here: PPO with all weights of the readability benchmark's model at LoRA's 1e-3 passed the
#: 8-nat KL stop in 3 iterations; at 1e-4 it made the same reward gain in 10 iterations at 3.9 nats.
LORA_TO_FULL_LEARNING_RATE = 10.0


def epochs(default: int, data: str) -> Any:
    return param(default, f"Passes over the {data} (ignored when max_steps > 0).", low=1)


def learning_rate(default: float) -> Any:
    return param(
        default, "Peak learning rate (linear warm-up, then linear decay).", low=0, low_inclusive=False
    )


def lora_scaled_learning_rate(lora: float, what: str) -> Any:
    """A policy learning rate whose default follows ``use_lora``: -1 = ``lora`` with LoRA, a tenth of it with
    full weights (:data:`LORA_TO_FULL_LEARNING_RATE`); read it with :func:`learning_rate_of`."""
    full = lora / LORA_TO_FULL_LEARNING_RATE
    declared = param(
        -1.0,
        f"{what}; -1 = {lora:g} with LoRA, {full:g} with full weights.",
        accepts="> 0, or -1 (by use_lora)",
    )
    return dataclasses.field(default=-1.0, metadata={**declared.metadata, "by_lora": (lora, full)})


def learning_rate_of(config: Any, name: str = "learning_rate") -> float:
    """The learning rate a stage trains with: the field's value, or for -1 its default for ``config.use_lora``."""
    value = getattr(config, name)
    by_lora = next(f for f in dataclasses.fields(config) if f.name == name).metadata.get("by_lora")
    if value != -1 or not by_lora:
        return value
    return by_lora[0] if config.use_lora else by_lora[1]


def batch_size(unit: str, default: int = 16) -> Any:
    return param(
        default,
        f"{unit} per batch, summed over all worker processes (each of N workers takes batch_size / N); an "
        "optimisation step takes gradient_accumulation_steps batches.",
        low=1,
    )


def eval_batch_size(unit: str, default: int = 32) -> Any:
    return param(default, f"{unit} per batch when evaluating, summed over all worker processes.", low=1)


def gradient_accumulation_steps() -> Any:
    return param(1, "Batches per optimisation step (a step sees batch_size x this examples).", low=1)


def max_length(answer: str) -> Any:
    return param(256, f"Longest prompt + {answer} in tokens; longer prompts keep their end.", low=1)


def lora_r(help: str = "LoRA rank.") -> Any:  # noqa: A002
    return param(16, help, low=1)


def lora_alpha() -> Any:
    return param(32, "LoRA scaling numerator (scale = lora_alpha / lora_r).", low=0, low_inclusive=False)


def lora_dropout() -> Any:
    return param(0.0, "Dropout on the LoRA branch.", low=0, high=1, high_inclusive=False)


def lora_target_modules() -> Any:
    return param("", "Comma-separated module names for LoRA; empty = all linear layers.")


def warmup_ratio(default: float) -> Any:
    return param(
        default, "Share of steps spent warming up the learning rate.", low=0, high=1, high_inclusive=False
    )


def weight_decay() -> Any:
    return param(0.0, "AdamW weight decay (not on biases and norms).", low=0)


def max_grad_norm(help: str = "Gradient clipping norm (0 = no clipping).") -> Any:  # noqa: A002
    return param(1.0, help, low=0)


def seed(help: str) -> Any:  # noqa: A002
    return param(0, help, low=0)


def max_steps() -> Any:
    return param(-1, "Stop after this many optimisation steps (-1 = run all epochs).", low=-1)


def logging_steps() -> Any:
    return param(5, "Log training metrics every this many optimisation steps.", low=1)


def eval_steps(default: int) -> Any:
    return param(
        default, "Also evaluate every this many optimisation steps (0 = only after each epoch).", low=0
    )


def precision() -> Any:
    return param(
        "auto",
        "Compute precision: fp32, or bf16 / fp16 autocast (auto = bf16 on a GPU that supports it, else fp32). "
        "Trainable weights are fp32 whatever the checkpoint's dtype; frozen weights are held in the compute dtype.",
        choices=PRECISION_CHOICES,
    )


def mixed_precision() -> Any:
    """The older spelling of :func:`precision` (no = fp32); the engine reads either. New configs use precision."""
    return param(
        "auto", "auto (bf16 on capable GPUs, else fp32), no, fp16 or bf16.", choices=MIXED_PRECISION_CHOICES
    )


#: Where a step's live metrics go (preftune.report.tracking): nowhere, an MLflow server, or TensorBoard files.
REPORT_TO_CHOICES = ("none", "mlflow", "tensorboard")


def report_to() -> Any:
    return param(
        "none",
        "Live tracking of this step's per-step metrics, parameters and lineage: none, mlflow (the server named by "
        "MLFLOW_TRACKING_URI, with MLFLOW_TRACKING_TOKEN or USERNAME/PASSWORD, from the environment; on a "
        "cluster from the optional preftune-mlflow Secret) or tensorboard (event files under the model "
        "output's tensorboard/ folder).",
        choices=REPORT_TO_CHOICES,
    )


def attn_implementation() -> Any:
    return param(
        "auto",
        "Attention kernel: eager, sdpa, flash_attention_2 (packing through position ids; no shared prompts) or "
        "flex_attention (CUDA only); auto = the model's default. A combination that cannot be masked correctly "
        "is refused.",
        choices=ATTENTION_CHOICES,
    )


def gradient_checkpointing() -> Any:
    return param(False, "Recompute activations in backward to save GPU memory.")


def trust_remote_code() -> Any:
    return param(False, "Allow custom model code from the hub.")


def prefix_sharing() -> Any:
    return param(True, "Run each prompt once for both answers (one prompt+chosen+rejected sequence, masked).")


def num_checkpoints() -> Any:
    return param(
        -1,
        "Intermediate policy snapshots kept, denser early in training where the policy drifts fastest: points "
        "of the evaluate step's reward-vs-KL chart, among which it chooses the candidate inside the gate's "
        "bounds (0 = none; -1 = 8 with LoRA or a model of at most 100M parameters, 3 with the full weights of "
        "a larger one).",
        low=-1,
    )


def checkpoint_uri() -> Any:
    return param(
        "",
        "Where resumable checkpoints go (s3:// or a local path); a rerun resumes from the newest complete one "
        "there. Empty: none when the library is called directly; the training components then keep them next "
        "to their model output, so a retried pod resumes.",
    )


def checkpoint_every(default: int = 100, unit: str = "optimisation steps") -> Any:
    """One default for the library and the components: inert until a checkpoint_uri is set, and the components
    always set one."""
    return param(default, f"Write a resumable checkpoint every this many {unit} (0 = never).", low=0)


# The gate's bounds: the gate checks them, and the evaluate step chooses its candidate inside them.


def max_kl() -> Any:
    return param(
        10.0, "Highest acceptable KL(candidate || reference) per response, in nats; negative = do not check."
    )


def min_diversity_ratio() -> Any:
    return param(
        0.8,
        "Lowest acceptable distinct-2 of the candidate divided by that of the reference; negative = do not check.",
    )


def min_judge_confirmation() -> Any:
    return param(
        0.5,
        "Reward-hacking guard: with a held-out judge, the least share of the judge's gain over the reference (in "
        "its standard deviations) that the held-out judge must confirm in its own; negative = do not check.",
    )
