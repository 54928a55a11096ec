"""Settings of KTO training (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization").

KTO learns from unpaired feedback: each example is one answer to a prompt, marked desirable or undesirable (a
thumbs up or down, a rating above or below a threshold), so binary feedback need not be paired first. Pairs still
work: the chosen answer counts as desirable, the rejected one as undesirable.

``beta`` 0.1 and ``desirable_weight`` = ``undesirable_weight`` = 1 are the paper's defaults; with unbalanced data
keep ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` between 1 and 4/3 (the paper's Eq. 8;
the stage warns and says so in its report when the data is outside that range). ``learning_rate`` 2e-4 with LoRA
matches DPO's default, which keeps the bundled tiny model near its SFT model; the paper used 5e-6 for full
fine-tuning of 7B models.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param, refuse


@dataclass
class KTOConfig:
    """Hyper-parameters of KTO."""

    epochs: int = shared.epochs(1, "training examples")
    learning_rate: float = shared.learning_rate(2e-4)
    beta: float = param(
        0.1, "Strength of the pull towards the reference (higher = stay closer).", low=0, low_inclusive=False
    )
    desirable_weight: float = param(1.0, "Weight of the desirable examples' loss (lambda_D).", low=0)
    undesirable_weight: float = param(1.0, "Weight of the undesirable examples' loss (lambda_U).", low=0)
    batch_size: int = param(
        16,
        "Examples per batch, summed over all worker processes (each of N workers takes batch_size / N, at "
        "least 2: the reference point is estimated on the batch's mismatched prompt-answer pairs); an "
        "optimisation step takes gradient_accumulation_steps batches.",
        low=2,
    )
    gradient_accumulation_steps: int = shared.gradient_accumulation_steps()
    max_length: int = shared.max_length("answer")
    use_lora: bool = param(
        True,
        "Train a LoRA adapter on the merged SFT model instead of all weights (the reference is then the same "
        "weights with the adapter off; full fine-tuning holds a frozen copy of the SFT model).",
    )
    lora_r: int = shared.lora_r()
    lora_alpha: int = shared.lora_alpha()
    lora_dropout: float = shared.lora_dropout()
    lora_target_modules: str = shared.lora_target_modules()
    warmup_ratio: float = shared.warmup_ratio(0.1)
    weight_decay: float = shared.weight_decay()
    max_grad_norm: float = shared.max_grad_norm()
    seed: int = shared.seed("Seed for initialisation and data order.")
    max_steps: int = shared.max_steps()
    logging_steps: int = shared.logging_steps()
    eval_steps: int = shared.eval_steps(50)
    eval_batch_size: int = param(
        32, "Examples per batch when evaluating, summed over all worker processes (at least 2 each).", low=2
    )
    disable_dropout: bool = param(True, "Turn off dropout so policy and reference are scored alike.")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    gradient_checkpointing: bool = shared.gradient_checkpointing()
    trust_remote_code: bool = shared.trust_remote_code()
    pack_length: int = param(
        256,
        "Pack examples (each prompt once, with its answer and its mismatched answer) into rows of up to this "
        "many tokens, no padding (0 = one example per row).",
        low=0,
    )
    fused_head: bool = param(
        True, "Apply the LM head to scored positions only, in chunks, never the full-vocab logits."
    )
    head_chunk_size: int = param(1024, "Positions per LM-head chunk (fused_head).", low=1)
    num_checkpoints: int = shared.num_checkpoints()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every()


def validate(config: KTOConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    if config.desirable_weight == 0 and config.undesirable_weight == 0:
        raise refuse(
            config,
            ("desirable_weight", "undesirable_weight"),
            "desirable_weight and undesirable_weight are both 0: nothing would be learned",
        )
