"""Settings of PPO training."""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.config.fields import MIXED_PRECISION_CHOICES, check_config

KL_CONTROLLERS = ("fixed", "adaptive")


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO.

    The defaults run the bundled tiny model against a reward model trained on the bundled preferences in one to
    two minutes on 2 CPU cores. For billion-parameter models lower both learning rates (LoRA: about 1e-5 to
    5e-5), use ``rollout_batch_size`` 64 to 512 with ``mini_batch_size`` 8 to 32 per device, ``max_new_tokens``
    of a real answer (128 to 512), and consider the adaptive controller with ``target_kl`` around 6.
    """

    iterations: int = field(default=16, metadata={"help": "Rollout + update rounds."})
    rollout_batch_size: int = field(
        default=32, metadata={"help": "Prompts sampled (one response each) per iteration."}
    )
    mini_batch_size: int = field(default=8, metadata={"help": "Sequences per PPO optimisation step."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each iteration's rollouts."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Policy learning rate (constant)."})
    critic_learning_rate: float = field(
        default=1e-3, metadata={"help": "Critic (value model) learning rate."}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm, per model (0 = no clipping)."}
    )
    max_prompt_length: int = field(
        default=128, metadata={"help": "Longest rendered prompt in tokens; longer prompts keep their end."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Most tokens sampled per response."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature (> 0); log-probs use the same temperature."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling threshold (1 = off, the exact choice)."}
    )
    kl_coef: float = field(
        default=0.05, metadata={"help": "KL penalty per token (initial value for the adaptive controller)."}
    )
    kl_controller: str = field(
        default="fixed", metadata={"help": "fixed, or adaptive (Ziegler et al. 2019: track target_kl)."}
    )
    target_kl: float = field(
        default=6.0, metadata={"help": "Adaptive controller: wanted KL per response (nats)."}
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Adaptive controller: sequences over which the error is corrected."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor over response tokens."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (bias / variance trade-off)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip: 1 +- this."})
    clip_range_value: float = field(
        default=0.2, metadata={"help": "Value clip: new values stay within +- this of the rollout values."}
    )
    vf_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the value loss in the summed loss (scales the critic's gradient)."},
    )
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Normalise advantages to mean 0, variance 1 over each rollout batch."}
    )
    score_clip: float | None = field(
        default=None, metadata={"help": "Clip reward-model scores to +- this (None = no clipping)."}
    )
    missing_eos_penalty: float = field(
        default=0.0,
        metadata={"help": "Subtracted from the score of responses cut at max_new_tokens without eos."},
    )
    max_approx_kl: float = field(
        default=0.1,
        metadata={
            "help": "Stop an iteration's PPO updates once the approx. KL to the rollout policy passes this "
            "(per token; 0 = never)."
        },
    )
    kl_blowup: float = field(
        default=20.0,
        metadata={"help": "Stop training when the rollout KL per response passes this (nats; 0 = never)."},
    )
    use_lora: bool = field(
        default=True, metadata={"help": "LoRA adapters on the policy and the critic (else full fine-tuning)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (policy and critic)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA branch (off by default)."}
    )
    lora_target_modules: str = field(
        default="", metadata={"help": "Comma-separated module names for LoRA; empty = all linear layers."}
    )
    forward_batch_size: int = field(
        default=32, metadata={"help": "Sequences per no-grad forward / generate batch during rollouts."}
    )
    pack_length: int = field(
        default=256,
        metadata={
            "help": "Scoring and updates pack prompt + response sequences into rows of up to this many tokens, "
            "no padding, each isolated by the attention mask (0 = one sequence per row)."
        },
    )
    num_checkpoints: int = field(
        default=4,
        metadata={
            "help": "Intermediate policy snapshots kept, evenly spaced over the iterations, for evaluation's "
            "reward-vs-KL path (0 = none)."
        },
    )
    samples_shown: int = field(
        default=8, metadata={"help": "Responses of the first and last iterations shown in the report."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, prompt order and sampling."})
    mixed_precision: str = field(
        default="auto", metadata={"help": "auto (bf16 on capable GPUs, else fp32), no, fp16 or bf16."}
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
        default=0, metadata={"help": "Checkpoint every this many iterations (0 = never)."}
    )


def validate(config: PPOConfig) -> None:
    name = type(config).__name__
    positive = (
        "iterations",
        "rollout_batch_size",
        "mini_batch_size",
        "ppo_epochs",
        "learning_rate",
        "critic_learning_rate",
        "max_prompt_length",
        "max_new_tokens",
        "temperature",
        "clip_range",
        "clip_range_value",
        "forward_batch_size",
        "lora_r",
    )
    for key in positive:
        if not getattr(config, key) > 0:
            raise ValueError(f"{name}.{key} must be positive, got {getattr(config, key)!r}")
    non_negative = (
        "kl_coef",
        "vf_coef",
        "max_approx_kl",
        "kl_blowup",
        "missing_eos_penalty",
        "samples_shown",
        "num_checkpoints",
    )
    for key in non_negative:
        if getattr(config, key) < 0:
            raise ValueError(f"{name}.{key} must be >= 0, got {getattr(config, key)!r}")
    if not 0 < config.top_p <= 1:
        raise ValueError(f"{name}.top_p must be in (0, 1], got {config.top_p!r}")
    if not 0 <= config.gamma <= 1 or not 0 <= config.lam <= 1:
        raise ValueError(f"{name}.gamma and .lam must be in [0, 1], got {config.gamma!r}, {config.lam!r}")
    if config.kl_controller not in KL_CONTROLLERS:
        raise ValueError(
            f"{name}.kl_controller must be one of {', '.join(KL_CONTROLLERS)}, got {config.kl_controller!r}"
        )
    if config.score_clip is not None and config.score_clip <= 0:
        raise ValueError(f"{name}.score_clip must be positive or None, got {config.score_clip!r}")
    if config.mini_batch_size > config.rollout_batch_size:
        raise ValueError(
            f"{name}.mini_batch_size ({config.mini_batch_size}) is larger than rollout_batch_size "
            f"({config.rollout_batch_size})"
        )
    if config.mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"{name}.mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, got {config.mixed_precision!r}"
        )
    check_config(config)  # the ranges every config shares: finite numbers, LoRA, weight decay, ...
