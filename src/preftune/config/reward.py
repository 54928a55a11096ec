"""Settings of reward-model training."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param

OBJECTIVES: tuple[str, ...] = ("pairwise", "regression")
PAIR_SUBSETS: tuple[str, ...] = ("all", "policy", "judge")


@dataclass
class RewardConfig:
    """Hyper-parameters of reward-model training.

    The defaults train to convergence without training past it: up to ``epochs`` passes, evaluated on the
    held-out pairs every ``eval_steps`` and at each epoch's end, stopping once ``early_stopping_patience``
    evaluations in a row brought no better accuracy, and keeping the weights of the best evaluation (ties: the
    lower loss). Reward models overfit within an epoch or two -- InstructGPT (Ouyang et al. 2022) trains one
    epoch, "Secrets of RLHF" (Zheng et al. 2023) selects reward models on held-out accuracy -- so the epoch
    count is a ceiling, not a schedule. On the bundled data this takes a few minutes on 2 CPU cores. For
    billion-parameter models lower ``learning_rate`` (LoRA: about 1e-4; full fine-tuning: about 1e-5).
    """

    epochs: int = shared.epochs(4, "training pairs; early stopping usually ends sooner")
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
    early_stopping_patience: int = param(
        4,
        "Stop once this many held-out evaluations in a row brought no better accuracy (0 = never stop early); "
        "the weights of the best evaluation are kept either way.",
        low=0,
    )
    pair_subset: str = param(
        "all",
        "Which training pairs: all; policy (all but the judge_fraction share of prompts, for the reward model "
        "PPO optimises); judge (only that share, for a held-out judge that checks PPO's gains). The split is by "
        "prompt and seed, so the two never share a prompt.",
        choices=PAIR_SUBSETS,
    )
    judge_fraction: float = param(
        0.25,
        "Share of training prompts held out from the policy's reward model to train the held-out judge "
        "(pair_subset policy or judge).",
        low=0,
        high=1,
        low_inclusive=False,
        high_inclusive=False,
    )
    eval_batch_size: int = shared.eval_batch_size("Pairs")
    disable_dropout: bool = param(True, "Turn off dropout so both answers of a pair are scored alike.")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
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
