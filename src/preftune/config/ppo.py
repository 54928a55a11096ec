"""Settings of PPO training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.config import shared
from preftune.config.fields import check, param, refuse

KL_CONTROLLERS = ("fixed", "adaptive")


def _positive(default: float | None, help: str) -> Any:  # noqa: A002
    return param(default, help, low=0, low_inclusive=False)


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO.

    The defaults run the bundled tiny model against a reward model trained on the bundled preferences in one to
    two minutes on 2 CPU cores. For billion-parameter models lower both learning rates (LoRA: about 1e-5 to
    5e-5), use ``rollout_batch_size`` 64 to 512 with ``mini_batch_size`` 8 to 32 per device, ``max_new_tokens``
    of a real answer (128 to 512), and consider the adaptive controller with ``target_kl`` around 6.
    """

    iterations: int = param(16, "Rollout and update rounds.", low=1)
    rollout_batch_size: int = param(
        32, "Prompts sampled (one response each) per iteration, summed over all worker processes.", low=1
    )
    mini_batch_size: int = param(
        8, "Sequences per PPO optimisation step, summed over all worker processes.", low=1
    )
    ppo_epochs: int = param(2, "Passes over each iteration's rollouts.", low=1)
    learning_rate: float = _positive(1e-3, "Policy learning rate (constant).")
    critic_learning_rate: float = _positive(1e-3, "Critic (value model) learning rate (constant).")
    weight_decay: float = shared.weight_decay()
    max_grad_norm: float = shared.max_grad_norm("Gradient clipping norm, per model (0 = no clipping).")
    max_prompt_length: int = param(
        128, "Longest rendered prompt in tokens; longer prompts keep their end.", low=1
    )
    max_new_tokens: int = param(32, "Most tokens sampled per response.", low=1)
    temperature: float = _positive(1.0, "Sampling temperature; log-probabilities use the same temperature.")
    top_p: float = param(
        1.0,
        "Nucleus sampling threshold (1 = off, which keeps the PPO ratio exact).",
        low=0,
        high=1,
        low_inclusive=False,
    )
    kl_coef: float = param(
        0.05, "KL penalty per token against the reference (the starting value when adaptive).", low=0
    )
    kl_controller: str = param(
        "fixed",
        "fixed, or adaptive (moves kl_coef so the KL per response tracks target_kl; Ziegler et al. 2019).",
        choices=KL_CONTROLLERS,
    )
    target_kl: float = _positive(
        6.0, "Adaptive controller: wanted KL to the reference per response, in nats."
    )
    kl_horizon: int = param(
        10000, "Adaptive controller: sequences over which the KL error is corrected.", low=1
    )
    gamma: float = param(1.0, "Discount factor over response tokens.", low=0, high=1)
    lam: float = param(0.95, "GAE lambda (bias / variance trade-off).", low=0, high=1)
    clip_range: float = _positive(0.2, "PPO ratio clip: 1 +- this.")
    clip_range_value: float = _positive(
        0.2, "Value clip: new values stay within +- this of the rollout values."
    )
    vf_coef: float = param(
        0.1, "Weight of the value loss in the summed loss (scales the critic's gradient).", low=0
    )
    whiten_advantages: bool = param(
        True, "Normalise advantages to mean 0, variance 1 over each rollout batch."
    )
    score_clip: float | None = _positive(None, "Clip reward-model scores to +- this (None = no clipping).")
    missing_eos_penalty: float = param(
        0.0, "Subtracted from the score of responses cut at max_new_tokens without eos.", low=0
    )
    max_approx_kl: float = param(
        0.1,
        "Stop an iteration's PPO updates once the policy has moved this far (approximate KL per token) from the "
        "one that sampled the rollouts (0 = never).",
        low=0,
    )
    kl_blowup: float = param(
        20.0,
        "The KL bound: when the rollouts' KL to the reference (per response, in nats) passes it, training stops "
        "before that iteration's update and keeps the last good policy, saying so in the report (0 = never).",
        low=0,
    )
    use_lora: bool = param(
        True,
        "Train LoRA adapters (policy and critic) instead of all weights; full fine-tuning holds frozen copies "
        "of the SFT and reward models besides the trained ones.",
    )
    lora_r: int = shared.lora_r("LoRA rank (policy and critic).")
    lora_alpha: int = shared.lora_alpha()
    lora_dropout: float = shared.lora_dropout()
    lora_target_modules: str = shared.lora_target_modules()
    forward_batch_size: int = param(
        32, "Sequences per no-grad forward / generate batch during rollouts.", low=1
    )
    pack_length: int = param(
        256,
        "Scoring and updates pack prompt + response sequences into rows of up to this many tokens, no padding, "
        "each isolated by the attention mask (0 = one sequence per row).",
        low=0,
    )
    num_checkpoints: int = shared.num_checkpoints()
    samples_shown: int = param(8, "Responses of the first and last iterations shown in the report.", low=0)
    seed: int = shared.seed("Seed for initialisation, prompt order and sampling.")
    precision: str = shared.precision()
    attn_implementation: str = shared.attn_implementation()
    trust_remote_code: bool = shared.trust_remote_code()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every(4, "iterations")


def validate(config: PPOConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    if config.mini_batch_size > config.rollout_batch_size:
        raise refuse(
            config,
            ("mini_batch_size", "rollout_batch_size"),
            f"mini_batch_size ({config.mini_batch_size}) is larger than rollout_batch_size "
            f"({config.rollout_batch_size})",
        )
