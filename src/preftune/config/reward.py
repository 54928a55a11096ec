"""Settings of reward-model training."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param

OBJECTIVES: tuple[str, ...] = ("pairwise", "regression")


@dataclass
class RewardConfig:
    """Hyper-parameters of reward-model training.

    The defaults train the bundled tiny model's reward head on the bundled pairs in about a minute on 2 CPU
    cores. For billion-parameter models lower ``learning_rate`` (LoRA: about 1e-4; full fine-tuning: about
    1e-5) and keep ``epochs`` at 1: reward models overfit quickly.
    """

    epochs: int = shared.epochs(1, "training pairs")
    learning_rate: float = shared.learning_rate(1e-3)
    objective: str = param(
        "pairwise",
        "pairwise (Bradley-Terry on chosen vs rejected) or regression (MSE on the pairs' normalised scores, for "
        "pairs made from scalar ratings).",
        choices=OBJECTIVES,
    )
    use_margin: bool = param(
        True,
        "Pairwise: require the chosen answer to win by each pair's margin (rank gap, score difference) when the "
        "data gives one (Llama 2's margin loss).",
    )
    margin_scale: float = param(
        1.0, "Multiplier applied to the data's margins before they enter the loss.", low=0
    )
    batch_size: int = shared.batch_size("Pairs (2 sequences each)")
    gradient_accumulation_steps: int = shared.gradient_accumulation_steps()
    max_length: int = shared.max_length("answer")
    use_lora: bool = param(True, "Train a LoRA adapter (plus the full score head) instead of all weights.")
    lora_r: int = shared.lora_r()
    lora_alpha: int = shared.lora_alpha()
    lora_dropout: float = shared.lora_dropout()
    lora_target_modules: str = shared.lora_target_modules()
    warmup_ratio: float = shared.warmup_ratio(0.1)
    weight_decay: float = shared.weight_decay()
    max_grad_norm: float = shared.max_grad_norm()
    seed: int = shared.seed("Seed for the score head's initialisation and data order.")
    max_steps: int = shared.max_steps()
    logging_steps: int = shared.logging_steps()
    eval_steps: int = shared.eval_steps(25)
    eval_batch_size: int = shared.eval_batch_size("Pairs")
    disable_dropout: bool = param(True, "Turn off dropout so both answers of a pair are scored alike.")
    precision: str = shared.precision()
    attn_implementation: str = shared.attn_implementation()
    gradient_checkpointing: bool = shared.gradient_checkpointing()
    trust_remote_code: bool = shared.trust_remote_code()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every()
    prefix_sharing: bool = shared.prefix_sharing()
    pack_length: int = param(
        256, "Pack pairs into rows of up to this many tokens, no padding (0 = one pair per row).", low=0
    )


def validate(config: RewardConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
