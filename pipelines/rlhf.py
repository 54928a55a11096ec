"""The RLHF pipeline: ingest -> SFT -> preference import -> reward model -> PPO -> evaluate -> gate -> promote."""

from kfp import dsl

from preftune.pipelines.alignment import grpo_step, ppo_step, refuse_other_choice, reward_model_step
from preftune.pipelines.data import import_pairs, ingest_data
from preftune.pipelines.promotion import evaluate_and_promote
from preftune.pipelines.sft_stage import supervised_fine_tuning

PIPELINE_NAME = "preftune-rlhf"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Align a language model with human feedback by RLHF: ingest SFT data, fine-tune, import "
    "feedback, train a reward model that imitates it, optimise the policy against it with PPO near the SFT "
    "model, evaluate against the SFT model and the registry's champion with the reward model as judge, and promote "
    "the policy when the gate passes.",
)
def rlhf_pipeline(
    base_model: str = "examples/tiny-llama",
    sft_data: str = "examples/data/sft.jsonl",
    preference_data: str = "examples/data/preferences.jsonl",
    eval_prompts: str = "examples/data/eval_prompts.jsonl",
    preference_format: str = "auto",
    since: str = "",
    max_rejected_fraction: float = 0.5,
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    max_length: int = 256,
    eval_fraction: float = 0.1,
    sft_epochs: int = 2,
    sft_learning_rate: float = 2e-3,
    sft_batch_size: int = 16,
    sft_max_steps: int = -1,
    reward_objective: str = "pairwise",
    reward_use_margin: bool = True,
    reward_epochs: int = 4,
    reward_learning_rate: float = 1e-3,
    reward_max_steps: int = -1,
    policy_optimizer: str = "ppo",
    ppo_iterations: int = -1,
    ppo_rollout_batch_size: int = 32,
    ppo_epochs: int = 2,
    ppo_learning_rate: float = -1.0,
    ppo_max_new_tokens: int = 32,
    ppo_temperature: float = 1.0,
    ppo_top_p: float = 1.0,
    ppo_kl_coef: float = 0.05,
    ppo_kl_controller: str = "adaptive",
    ppo_target_kl: float = 3.0,
    ppo_max_kl: float = 8.0,
    grpo_iterations: int = 16,
    grpo_num_generations: int = 4,
    grpo_learning_rate: float = 5e-4,
    grpo_max_new_tokens: int = 32,
    grpo_kl_coef: float = 0.04,
    grpo_kl_penalty: str = "loss",
    grpo_max_kl: float = 8.0,
    grpo_reward_functions: str = "",
    grpo_reward_weights: str = "",
    grpo_checkpoint_every: int = 4,
    num_checkpoints: int = -1,
    eval_max_new_tokens: int = 48,
    eval_max_prompts: int = 64,
    heldout_judge_model: str = "",
    registry_uri: str = "",
    model_name: str = "preftune-rlhf",
    gate_min_win_rate_vs_champion: float = 0.5,
    gate_max_kl: float = 10.0,
    gate_min_diversity_ratio: float = 0.8,
    gate_length_controlled: bool = True,
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    keep_checkpoints: bool = False,
    precision: str = "auto",
    report_to: str = "none",
    attn_implementation: str = "auto",
    checkpoint_every: int = 50,
    ppo_checkpoint_every: int = 4,
    seed: int = 0,
):
    """Align a language model with human feedback by RLHF (reward model + PPO).

    Args:
        base_model: Base model: a Hugging Face hub id, a local directory or an s3:// URI.
        sft_data: URI of supervised fine-tuning data (jsonl, parquet or csv; file, directory or s3:// prefix).
        preference_data: URI of human feedback: pairwise, ranked lists, scalar ratings, thumbs or Label Studio.
        eval_prompts: URI of held-out prompts for evaluation (JSONL rows with a prompt).
        preference_format: Feedback format: auto, pairwise, ranked, rating, binary or labelstudio.
        since: Only read date partitions (date=YYYY-MM-DD) from this day on; empty reads everything.
        max_rejected_fraction: Fail the import when more than this share of feedback rows is rejected.
        use_lora: Train LoRA adapters instead of all weights, in SFT, the reward model and PPO.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_r).
        max_length: Longest tokenised prompt + response in SFT and reward model training.
        eval_fraction: Share of SFT examples and of preference prompts held out for evaluation.
        sft_epochs: SFT passes over the training data.
        sft_learning_rate: SFT peak learning rate.
        sft_batch_size: SFT examples per batch, summed over all worker processes (one batch per optimisation
            step).
        sft_max_steps: Stop SFT after this many steps (-1 = all epochs).
        reward_objective: pairwise (Bradley-Terry on preferences) or regression (on normalised rating scores).
        reward_use_margin: Use each pair's margin (rank gap, score difference) in the Bradley-Terry loss.
        reward_epochs: Most reward model passes over the training pairs; early stopping on held-out accuracy
            usually ends sooner, keeping the best evaluation's weights.
        reward_learning_rate: Reward model peak learning rate.
        reward_max_steps: Stop reward model training after this many steps (-1 = all epochs).
        policy_optimizer: The policy step: ppo (a value model; the default), grpo (group-normalised advantages) or
            rloo (leave-one-out baseline); grpo and rloo need no value model.
        ppo_iterations: PPO rounds of rollouts and updates (-1 = one pass over the prompts, 8 to 64).
        ppo_rollout_batch_size: Prompts sampled per PPO iteration.
        ppo_epochs: Passes over each iteration's rollouts.
        ppo_learning_rate: Policy and critic learning rate (-1 = 1e-3 with LoRA, 1e-4 with full weights).
        ppo_max_new_tokens: Most tokens per sampled response during PPO.
        ppo_temperature: Sampling temperature of the rollouts.
        ppo_top_p: Nucleus sampling threshold of the rollouts (1 = off).
        ppo_kl_coef: KL penalty per token against the SFT model (start value when adaptive).
        ppo_kl_controller: fixed or adaptive KL coefficient.
        ppo_target_kl: Adaptive controller's target KL per response, in nats.
        ppo_max_kl: KL bound per response, below gate_max_kl: PPO stops, keeping the last good policy, when
            rollouts pass it.
        grpo_iterations: GRPO / RLOO sampling and update rounds.
        grpo_num_generations: GRPO / RLOO answers sampled per prompt (the group each answer is judged against).
        grpo_learning_rate: GRPO / RLOO policy learning rate.
        grpo_max_new_tokens: Most tokens per sampled answer during GRPO / RLOO.
        grpo_kl_coef: GRPO / RLOO weight of the KL to the SFT model.
        grpo_kl_penalty: Where GRPO / RLOO's KL acts: loss (a per-token term) or reward (taken off each answer's
            reward).
        grpo_max_kl: GRPO / RLOO KL bound per answer, below gate_max_kl: training stops, keeping the last good
            policy, when the samples pass it (0 = never).
        grpo_reward_functions: Comma-separated Python reward functions (package.module:function) added to the
            reward model's score in GRPO / RLOO.
        grpo_reward_weights: Comma-separated weights of grpo_reward_functions (empty = 1 each).
        grpo_checkpoint_every: Resumable GRPO / RLOO checkpoint every this many iterations (0 = never).
        num_checkpoints: Intermediate PPO policies kept, scored by evaluation (reward-vs-KL chart) and eligible
            as the promoted candidate (-1 = 8 with LoRA or up to 100M parameters, else 3).
        eval_max_new_tokens: Longest generated response in evaluation, in tokens.
        eval_max_prompts: Evaluate at most this many held-out prompts.
        heldout_judge_model: Optional reward model URI trained on preferences the policy never saw; when set,
            the gate promotes only a candidate whose gain this second judge confirms (a reward-hacking
            guard).
        registry_uri: Model registry root (s3://bucket/prefix); empty = no registry: nothing is promoted.
        model_name: Name of the policy in the registry.
        gate_min_win_rate_vs_champion: Promote only when the reward model prefers the candidate over the
            champion on at least this share of prompts (-1 = do not check).
        gate_max_kl: Promote only when KL(candidate || SFT) per response is at most this, in nats (-1 = off).
        gate_min_diversity_ratio: Promote only when the candidate's distinct-2 is at least this share of the
            SFT model's (-1 = off).
        gate_length_controlled: Use the length-controlled win rate against the champion in the gate.
        num_gpus: GPUs (worker processes) per training step; 0 = every GPU the step's pod has.
        num_nodes: Nodes per training step; more than 1 runs each as a Kubeflow Trainer TrainJob.
        distributed_strategy: ddp, or fsdp (sharded; refused by stages that do not support it yet).
        keep_checkpoints: Keep each training step's resumable checkpoints (optimizer state included) after it
            succeeds; by default they are deleted then, since only a retried step needs them.
        precision: Compute precision of every training and evaluation step: auto (bf16 on GPUs that support it,
            else fp32), fp32, bf16 or fp16. Trainable weights are fp32 whatever the checkpoint's dtype.
        report_to: Live tracking of every training and evaluation step: none, mlflow (the server named by
            MLFLOW_TRACKING_URI; on a cluster from the preftune-mlflow Secret) or tensorboard (event files under
            each model output's tensorboard/ folder).
        attn_implementation: Attention kernel of every training and evaluation step: auto (the model's
            default), eager, sdpa, flash_attention_2 or flex_attention; a combination that cannot be masked
            correctly is refused before training.
        checkpoint_every: Resumable checkpoint every this many optimisation steps in SFT, reward model and DPO
            (0 = never); a retried step resumes from the newest one.
        ppo_checkpoint_every: Resumable PPO checkpoint every this many iterations (0 = never).
        seed: Seed for splits, initialisation, data order and sampling.
    """
    scale = {
        "num_gpus": num_gpus,
        "num_nodes": num_nodes,
        "distributed_strategy": distributed_strategy,
        "keep_checkpoints": keep_checkpoints,
        "precision": precision,
        "report_to": report_to,
        "attn_implementation": attn_implementation,
    }
    compute = {"precision": precision, "attn_implementation": attn_implementation, "report_to": report_to}
    sft_rows = ingest_data(sft_data, eval_fraction, seed)
    sft = supervised_fine_tuning(
        base_model,
        sft_rows,
        epochs=sft_epochs,
        learning_rate=sft_learning_rate,
        batch_size=sft_batch_size,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        seed=seed,
        max_steps=sft_max_steps,
        scale={**scale, "checkpoint_every": checkpoint_every},
    )
    pairs = import_pairs(
        preference_data, eval_fraction, seed, preference_format, since, max_rejected_fraction
    )

    reward = reward_model_step(
        sft,
        pairs,
        objective=reward_objective,
        use_margin=reward_use_margin,
        epochs=reward_epochs,
        learning_rate=reward_learning_rate,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        seed=seed,
        max_steps=reward_max_steps,
        checkpoint_every=checkpoint_every,
        **scale,
    )

    grpo_settings = {
        "iterations": grpo_iterations,
        "num_generations": grpo_num_generations,
        "learning_rate": grpo_learning_rate,
        "max_new_tokens": grpo_max_new_tokens,
        "kl_coef": grpo_kl_coef,
        "kl_penalty": grpo_kl_penalty,
        "kl_blowup": grpo_max_kl,
        "reward_functions": grpo_reward_functions,
        "reward_weights": grpo_reward_weights,
        "use_lora": use_lora,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "num_checkpoints": num_checkpoints,
        "checkpoint_every": grpo_checkpoint_every,
        "seed": seed,
        **scale,
    }
    # the evaluate / gate / promote tail runs in the branch that trained the policy (kfp.local passes no
    # artifact through dsl.OneOf yet)
    tail = {
        "eval_prompts": eval_prompts,
        "registry_uri": registry_uri,
        "model_name": model_name,
        "max_new_tokens": eval_max_new_tokens,
        "max_prompts": eval_max_prompts,
        "seed": seed,
        "min_win_rate_vs_champion": gate_min_win_rate_vs_champion,
        "max_kl": gate_max_kl,
        "min_diversity_ratio": gate_min_diversity_ratio,
        "length_controlled": gate_length_controlled,
        "max_length": max_length,
        **compute,
        "heldout_judge_uri": heldout_judge_model,
        "judge": reward,
    }
    with dsl.If(policy_optimizer == "ppo", name="ppo"):
        ppo = ppo_step(
            sft,
            reward,
            pairs,
            iterations=ppo_iterations,
            rollout_batch_size=ppo_rollout_batch_size,
            ppo_epochs=ppo_epochs,
            learning_rate=ppo_learning_rate,
            max_new_tokens=ppo_max_new_tokens,
            temperature=ppo_temperature,
            top_p=ppo_top_p,
            kl_coef=ppo_kl_coef,
            kl_controller=ppo_kl_controller,
            target_kl=ppo_target_kl,
            max_kl=ppo_max_kl,
            use_lora=use_lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            num_checkpoints=num_checkpoints,
            checkpoint_every=ppo_checkpoint_every,
            seed=seed,
            **scale,
        )
        evaluate_and_promote(ppo, sft, pairs, **tail)
    with dsl.Elif(policy_optimizer == "grpo", name="grpo"):
        grpo = grpo_step(sft, reward, pairs, estimator="grpo", **grpo_settings)
        evaluate_and_promote(grpo, sft, pairs, **tail)
    with dsl.Elif(policy_optimizer == "rloo", name="rloo"):
        rloo = grpo_step(sft, reward, pairs, estimator="rloo", **grpo_settings)
        evaluate_and_promote(rloo, sft, pairs, **tail)
    with dsl.Else(name="unknown-policy-optimizer"):
        refuse_other_choice("policy_optimizer", policy_optimizer, ("ppo", "grpo", "rloo"))
