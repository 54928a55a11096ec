"""Settings of supervised fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param


@dataclass
class SFTConfig:
    """Hyper-parameters of supervised fine-tuning.

    The defaults train the bundled tiny model on the bundled data in about a minute on 2 CPU cores. For
    billion-parameter models lower ``learning_rate`` (LoRA: about 1e-4 to 2e-4; full fine-tuning: about 1e-5).
    """

    epochs: int = shared.epochs(2, "training data")
    learning_rate: float = shared.learning_rate(2e-3)
    batch_size: int = shared.batch_size("Examples")
    gradient_accumulation_steps: int = shared.gradient_accumulation_steps()
    max_length: int = shared.max_length("completion")
    pack_length: int = param(
        256,
        "Pack examples into rows of up to this many tokens, no padding, each example isolated by the attention "
        "mask (0 = one right-padded example per row).",
        low=0,
    )
    fused_head: bool = param(
        True,
        "Packed batches: apply the LM head to completion positions only, in chunks, never the full-vocab logits.",
    )
    use_lora: bool = param(True, "Train a LoRA adapter instead of all weights.")
    lora_r: int = shared.lora_r()
    lora_alpha: int = shared.lora_alpha()
    lora_dropout: float = shared.lora_dropout()
    lora_target_modules: str = shared.lora_target_modules()
    warmup_ratio: float = shared.warmup_ratio(0.05)
    weight_decay: float = shared.weight_decay()
    max_grad_norm: float = shared.max_grad_norm()
    seed: int = shared.seed("Seed for initialisation and data order.")
    max_steps: int = shared.max_steps()
    logging_steps: int = shared.logging_steps()
    eval_steps: int = shared.eval_steps(50)
    eval_batch_size: int = shared.eval_batch_size("Examples")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    gradient_checkpointing: bool = shared.gradient_checkpointing()
    trust_remote_code: bool = shared.trust_remote_code()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every()


def validate(config: SFTConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
