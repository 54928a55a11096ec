"""Settings of supervised fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.config.fields import check_config


@dataclass
class SFTConfig:
    """Hyper-parameters of supervised fine-tuning.

    The defaults train the bundled tiny model on the bundled data in about a minute on 2 CPU cores. For
    billion-parameter models lower ``learning_rate`` (LoRA: about 1e-4 to 2e-4; full fine-tuning: about 1e-5).
    """

    epochs: int = field(
        default=2, metadata={"help": "Passes over the training data (ignored when max_steps > 0)."}
    )
    learning_rate: float = field(
        default=2e-3, metadata={"help": "Peak learning rate (warm-up, then linear decay)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Examples per forward pass on each device."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Forward passes per optimisation step (effective batch = batch x this)."}
    )
    max_length: int = field(
        default=256, metadata={"help": "Longest prompt + completion in tokens; prompts keep their end."}
    )
    pack_length: int = field(
        default=256,
        metadata={
            "help": "Pack examples into rows of up to this many tokens, no padding, each example isolated by the "
            "attention mask (0 = one right-padded example per row)."
        },
    )
    fused_head: bool = field(
        default=True,
        metadata={
            "help": "Packed batches: apply the LM head to completion positions only, in chunks, never the "
            "full-vocab logits."
        },
    )
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: str = field(
        default="", metadata={"help": "Comma-separated module names for LoRA; empty = all linear layers."}
    )
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up the rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = no clipping)."})
    seed: int = field(default=0, metadata={"help": "Seed for initialisation and data order."})
    max_steps: int = field(
        default=-1, metadata={"help": "Stop after this many optimisation steps (-1 = epochs)."}
    )
    logging_steps: int = field(default=5, metadata={"help": "Log the training loss every this many steps."})
    eval_steps: int = field(
        default=50, metadata={"help": "Also evaluate every this many steps (0 = only after each epoch)."}
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Examples per forward pass when evaluating."})
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


def validate(config: SFTConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check_config(config)
