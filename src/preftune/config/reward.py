"""Settings of reward-model training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from preftune.config.fields import check_config

OBJECTIVES: tuple[str, ...] = ("pairwise", "regression")


@dataclass
class RewardConfig:
    """Hyper-parameters of reward-model training.

    The defaults train the bundled tiny model's reward head on the bundled pairs in about a minute on 2 CPU
    cores. For billion-parameter models lower ``learning_rate`` (LoRA: about 1e-4; full fine-tuning: about
    1e-5) and keep ``epochs`` at 1: reward models overfit quickly.
    """

    epochs: int = field(
        default=1, metadata={"help": "Passes over the training pairs (ignored when max_steps > 0)."}
    )
    learning_rate: float = field(
        default=1e-3, metadata={"help": "Peak learning rate (warm-up, then linear decay)."}
    )
    objective: str = field(
        default="pairwise",
        metadata={
            "help": "pairwise (Bradley-Terry on chosen vs rejected) or regression (MSE on pair scores)."
        },
    )
    use_margin: bool = field(
        default=True,
        metadata={
            "help": "Pairwise: subtract each pair's margin inside the sigmoid (Llama 2's margin loss)."
        },
    )
    margin_scale: float = field(
        default=1.0, metadata={"help": "Multiplier applied to the data's margins before they enter the loss."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Pairs per forward pass on each device (2x sequences)."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward passes per optimisation step (effective batch = batch x this)."}
    )
    max_length: int = field(
        default=256, metadata={"help": "Longest prompt + answer in tokens; prompts keep their end."}
    )
    use_lora: bool = field(
        default=True,
        metadata={"help": "Train a LoRA adapter (plus the full score head) on the merged SFT model."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="", metadata={"help": "Comma-separated module names for LoRA; empty = all linear layers."}
    )
    warmup_ratio: float = field(default=0.1, metadata={"help": "Share of steps spent warming up the rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed for the score head, initialisation and data order."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimisation steps (-1 = epochs)."}
    )
    logging_steps: int = field(default=5, metadata={"help": "Log training metrics every this many steps."})
    eval_steps: int = field(
        default=25, metadata={"help": "Also evaluate every this many steps (0 = only after each epoch)."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Pairs per forward pass when evaluating."})
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn off dropout so both answers of a pair are scored alike."}
    )
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on capable GPUs, else fp32), no, fp16 or bf16."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save GPU memory."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    checkpoint_uri: str = field(
        default="",
        metadata={
            "help": "Where to keep resumable checkpoints (s3:// or a local path); a rerun resumes from the "
            "newest complete one there (empty = none)."
        },
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "Checkpoint every this many optimisation steps (0 = never)."}
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Run each prompt once for both answers (one prompt+chosen+rejected sequence, masked)."
        },
    )
    pack_length: int = field(
        default=256,
        metadata={
            "help": "Pack pairs into rows of up to this many tokens, no padding (0 = one pair per row)."
        },
    )


def validate(config: RewardConfig) -> None:
    check_config(config)
    if config.objective not in OBJECTIVES:
        raise ValueError(
            f"RewardConfig.objective must be one of {', '.join(OBJECTIVES)}, got {config.objective!r}"
        )
    if config.pack_length < 0:
        raise ValueError(
            f"RewardConfig.pack_length must be >= 0 (0 = one pair per row), got {config.pack_length}"
        )
    if not (math.isfinite(config.margin_scale) and config.margin_scale >= 0):
        raise ValueError(
            f"RewardConfig.margin_scale must be a finite number >= 0, got {config.margin_scale!r}"
        )
