"""Settings of online (iterative) DPO: each round samples answers from the current policy, a judge ranks them into
pairs, and the policy takes DPO steps on those pairs against the frozen SFT model.

The article's RLHF is iterative (collect, train, collect again); online DPO runs that loop inside one step with the
reward model (and/or reward functions) as the annotator (Guo et al. 2024, "Direct Language Model Alignment from
Online AI Feedback"; Xiong et al. 2024, "Iterative Preference Learning from Human Feedback"; Dong et al. 2024, "RLHF
Workflow"), pairing each prompt's best sampled answer with its worst. ``beta`` 0.1 is the DPO paper's; the
reference stays the SFT model for every round (the implicit reward is always measured against it), and
``kl_blowup`` stops a run that drifts too far. ``learning_rate`` 5e-4 with LoRA and ``dpo_epochs`` 2: on the
bundled tiny model, 8 default rounds lift the reward model's score of held-out answers from 1.24 to 3.89 at 1.9
nats of KL and 0.87x the SFT model's distinct-2 (2e-4 and one pass barely moved it, 0.06 nats; 1e-3 and two passes
reached 5.3 nats and 0.81x). With full weights the default is a tenth of that, 5e-5, as for PPO: on the alignment
benchmark (benchmarks/alignment.py, 0.6M-parameter models fitted to each task) 5e-4 passed the KL stop within
3 to 4 rounds (78 nats on readability), while 5e-5 stayed at 0.6 nats. For billion-parameter models lower ``learning_rate`` as for DPO (LoRA: about 5e-5 to
1e-4; full fine-tuning: about 5e-7) and sample more prompts per round.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import generation, grpo, shared
from preftune.config.dpo import DPO_LOSS_TYPES
from preftune.config.fields import check, param, refuse


@dataclass
class OnlineDPOConfig:
    """Hyper-parameters of online DPO (see the module docstring for the defaults' sources)."""

    rounds: int = param(8, "Sample, rank and train rounds.", low=1)
    prompts_per_round: int = param(
        16, "Prompts sampled per round, summed over all worker processes (each takes its share).", low=1
    )
    num_generations: int = grpo.num_generations()
    batch_size: int = param(8, "Pairs per optimisation step, summed over all worker processes.", low=1)
    dpo_epochs: int = param(2, "Passes over each round's pairs.", low=1)
    learning_rate: float = shared.lora_scaled_learning_rate(5e-4, "Policy learning rate (constant)")
    beta: float = param(
        0.1, "Strength of the pull towards the SFT model (higher = stay closer).", low=0, low_inclusive=False
    )
    loss_type: str = param("sigmoid", "sigmoid (the DPO paper), ipo or hinge.", choices=DPO_LOSS_TYPES)
    min_score_gap: float = param(
        0.0,
        "A prompt gives a pair only when its best and worst answers' rewards differ by more than this.",
        low=0,
    )
    weight_decay: float = shared.weight_decay()
    max_grad_norm: float = shared.max_grad_norm()
    max_prompt_length: int = grpo.max_prompt_length()
    max_new_tokens: int = grpo.max_new_tokens()
    temperature: float = grpo.temperature()
    top_p: float = grpo.top_p()
    reward_model_weight: float = grpo.reward_model_weight()
    reward_functions: str = grpo.reward_functions()
    reward_weights: str = grpo.reward_weights()
    score_clip: float | None = grpo.score_clip()
    missing_eos_penalty: float = grpo.missing_eos_penalty()
    kl_blowup: float = grpo.kl_blowup()
    use_lora: bool = grpo.use_lora()
    lora_r: int = shared.lora_r()
    lora_alpha: int = shared.lora_alpha()
    lora_dropout: float = shared.lora_dropout()
    lora_target_modules: str = shared.lora_target_modules()
    forward_batch_size: int = grpo.forward_batch_size()
    pack_length: int = grpo.pack_length()
    generation_backend: str = generation.backend()
    kv_cache: str = generation.kv_cache()
    compile_decode: bool = generation.compile_decode()
    length_bucketing: bool = generation.length_bucketing()
    vllm_gpu_memory_utilization: float = generation.vllm_gpu_memory_utilization()
    prefix_sharing: bool = shared.prefix_sharing()
    num_checkpoints: int = shared.num_checkpoints()
    samples_shown: int = grpo.samples_shown()
    seed: int = shared.seed("Seed for initialisation, prompt order, sampling and pair order.")
    precision: str = shared.precision()
    report_to: str = shared.report_to()
    attn_implementation: str = shared.attn_implementation()
    trust_remote_code: bool = shared.trust_remote_code()
    checkpoint_uri: str = shared.checkpoint_uri()
    checkpoint_every: int = shared.checkpoint_every(2, "rounds")


def validate(config: OnlineDPOConfig) -> None:
    """Refuse out-of-range settings before any model is loaded."""
    check(config)
    generation.validate(config)
    grpo.check_rewards(config)
    if config.batch_size > config.prompts_per_round:
        raise refuse(
            config,
            ("batch_size", "prompts_per_round"),
            f"batch_size ({config.batch_size}) is larger than the pairs a round can give (one per prompt, "
            f"prompts_per_round = {config.prompts_per_round})",
        )
