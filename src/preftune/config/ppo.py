"""Settings of PPO training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.config import generation, shared
from preftune.config.fields import check, param, refuse

KL_CONTROLLERS = ("fixed", "adaptive")


def _positive(default: float | None, help: str) -> Any:  # noqa: A002
    return param(default, help, low=0, low_inclusive=False)


@dataclass
class PPOConfig:
    """Hyper-parameters of PPO.

    The defaults aim to land inside the promotion gate's bounds (KL to the SFT model at most 10 nats per
    response by default) on data they were not tuned on:

    - the adaptive KL controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"),
      targeting ``target_kl`` = 3 nats, well under the gate's bound, with a per-token KL penalty in the reward as
      in InstructGPT (Ouyang et al. 2022);
    - advantages whitened per batch, the advantage normalisation of PPO-max ("Secrets of RLHF in Large Language
      Models Part I", Zheng et al. 2023); its reward normalisation and clipping (``normalize_scores``, so the
      KL coefficient means the same for any reward model's scale) is there but off by default, as on the
      bundled demo it cost diversity at the gate's bound;
    - as many iterations as one pass over the prompts takes (between 8 and 64), with both learning rates
      decaying linearly to a tenth over them: a larger dataset trains longer, not harder;
    - a stop before the gate's bound: when the rollouts' KL passes ``kl_blowup`` = 8 nats, training ends with
      the last good policy, and the evaluate step still chooses among the snapshots;
    - learning rates of 1e-3 with LoRA and a tenth of that with full weights (-1; see
      ``shared.LORA_TO_FULL_LEARNING_RATE``): at LoRA's rate all weights passed the KL stop in 3 iterations
      on the readability benchmark task.

    They run the bundled tiny model in one to two minutes on 2 CPU cores. For billion-parameter models lower
    both learning rates (LoRA: about 1e-5 to 5e-5), use ``rollout_batch_size`` 64 to 512 with
    ``mini_batch_size`` 8 to 32 per device and ``max_new_tokens`` of a real answer (128 to 512).
    """

    iterations: int = param(
        -1,
        "Rollout and update rounds; -1 = one pass over the unique prompts (prompts / rollout_batch_size), at "
        "least 8 and at most 64.",
        low=-1,
    )
    rollout_batch_size: int = param(
        32, "Prompts sampled (one response each) per iteration, summed over all worker processes.", low=1
    )
    mini_batch_size: int = param(
        8, "Sequences per PPO optimisation step, summed over all worker processes.", low=1
    )
    ppo_epochs: int = param(2, "Passes over each iteration's rollouts.", low=1)
    learning_rate: float = shared.lora_scaled_learning_rate(
        1e-3, "Policy learning rate at the first iteration, decaying linearly to a tenth of it at the last"
    )
    critic_learning_rate: float = shared.lora_scaled_learning_rate(
        1e-3, "Critic (value model) learning rate, on the same schedule as the policy's"
    )
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
        "adaptive",
        "fixed, or adaptive (moves kl_coef so the KL per response tracks target_kl; Ziegler et al. 2019).",
        choices=KL_CONTROLLERS,
    )
    target_kl: float = _positive(
        3.0,
        "Adaptive controller: wanted KL to the reference per response, in nats (well under the gate's max_kl).",
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
    normalize_scores: bool = param(
        False,
        "Normalise reward-model scores by the running mean and standard deviation of every score so far, then "
        "clip them to +- normalized_score_clip (PPO-max), before the KL penalty is subtracted. Off by default: "
        "on the bundled demo it cost the policy diversity (distinct-2 ratio 0.78 against 0.81 without).",
    )
    normalized_score_clip: float = _positive(5.0, "Clip of the normalised scores, in standard deviations.")
    score_clip: float | None = _positive(
        None, "Clip raw reward-model scores to +- this, before any normalisation (None = no clipping)."
    )
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
        8.0,
        "The KL bound: when the rollouts' KL to the reference (per response, in nats) passes it, training stops "
        "before that iteration's update and keeps the last good policy, saying so in the report; below the "
        "gate's max_kl so that training stops before the gate would refuse (0 = never).",
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
    generation_backend: str = generation.backend()
    kv_cache: str = generation.kv_cache()
    compile_decode: bool = generation.compile_decode()
    length_bucketing: bool = generation.length_bucketing()
    vllm_gpu_memory_utilization: float = generation.vllm_gpu_memory_utilization()
    num_checkpoints: int = shared.num_checkpoints()
    samples_shown: int = param(8, "Responses of the first and last iterations shown in the report.", low=0)
    seed: int = shared.seed("Seed for initialisation, prompt order and sampling.")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    trust_remote_code: bool = shared.trust_remote_code()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every(4, "iterations")


def validate(config: PPOConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    generation.validate(config)
    if config.mini_batch_size > config.rollout_batch_size:
        raise refuse(
            config,
            ("mini_batch_size", "rollout_batch_size"),
            f"mini_batch_size ({config.mini_batch_size}) is larger than rollout_batch_size "
            f"({config.rollout_batch_size})",
        )
