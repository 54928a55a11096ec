"""Settings of DPO training."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param, refuse

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig:
    """Hyper-parameters of DPO.

    The defaults keep the policy near its reference and diverse on data they were not tuned on. DPO's loss keeps
    falling after held-out accuracy has stopped rising: the implicit-reward margins grow without bound (the
    point of the IPO paper, Azar et al. 2023), and that growth is drift from the reference and lost diversity,
    not better preferences. So training stops early on held-out implicit-reward accuracy (Rafailov et al. 2023
    report it as DPO's own yardstick) and keeps the weights of the earliest best evaluation; ``epochs`` is a
    ceiling. The evaluate step then chooses, among the final policy and the snapshots, the best one inside the
    gate's KL and diversity bounds. beta 0.1 and a LoRA learning rate of 2e-4 are the DPO paper's and TRL's
    usual order of magnitude, with full weights too: a tenth of it (as PPO's) barely moved the policy on the
    sentiment benchmark task (scorer lift +0.10 against +0.71, both promoted). The defaults train the bundled tiny model on the bundled pairs in one to two minutes on 2 CPU cores. For
    billion-parameter models lower ``learning_rate`` (LoRA: about 5e-5 to 1e-4; full fine-tuning: about 5e-7).
    """

    epochs: int = shared.epochs(3, "training pairs; early stopping usually ends sooner")
    # 1e-3 reached the same held-out reward accuracy on the bundled data but drifted ~94 nats from the SFT model
    # and produced garbage wrapped in polite phrases; 2e-4 keeps it generative (KL ~0.35).
    learning_rate: float = shared.learning_rate(2e-4)
    beta: float = param(
        0.1, "Strength of the pull towards the reference (higher = stay closer).", low=0, low_inclusive=False
    )
    loss_type: str = param("sigmoid", "sigmoid (the DPO paper), ipo or hinge.", choices=DPO_LOSS_TYPES)
    label_smoothing: float = param(
        0.0,
        "Assumed share of flipped preference labels (conservative DPO; sigmoid loss only).",
        low=0,
        high=0.5,
        high_inclusive=False,
    )
    batch_size: int = shared.batch_size("Pairs (2 sequences each)")
    gradient_accumulation_steps: int = shared.gradient_accumulation_steps()
    max_length: int = shared.max_length("answer")
    use_lora: bool = param(True, "Train a LoRA adapter on the merged SFT model instead of all weights.")
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
    early_stopping_patience: int = param(
        3,
        "Stop once this many held-out evaluations in a row brought no better implicit-reward accuracy (0 = never "
        "stop early); the weights of the earliest best evaluation are kept either way.",
        low=0,
    )
    eval_batch_size: int = shared.eval_batch_size("Pairs")
    disable_dropout: bool = param(True, "Turn off dropout so policy and reference are scored alike.")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    gradient_checkpointing: bool = shared.gradient_checkpointing()
    trust_remote_code: bool = shared.trust_remote_code()
    prefix_sharing: bool = shared.prefix_sharing()
    pack_length: int = param(
        256, "Pack pairs into rows of up to this many tokens, no padding (0 = one pair per row).", low=0
    )
    fused_head: bool = param(
        True, "Apply the LM head to scored positions only, in chunks, never the full-vocab logits."
    )
    head_chunk_size: int = param(1024, "Positions per LM-head chunk (fused_head).", low=1)
    num_checkpoints: int = shared.num_checkpoints()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every()
    reference_cache_dir: str = param(
        "",
        "Directory caching reference log-probs keyed by model and data hashes, so reruns and beta sweeps skip "
        "the reference pass (empty = no cache).",
    )


def validate(config: DPOConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    if config.label_smoothing and config.loss_type != "sigmoid":
        raise refuse(
            config,
            ("label_smoothing", "loss_type"),
            f"label_smoothing applies to loss_type 'sigmoid' only, got loss_type {config.loss_type!r}",
        )
