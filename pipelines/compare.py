"""Which alignment method, measured on your data: one SFT model, any two or more methods from it in parallel, one
judge for all."""

from typing import Any

from kfp import dsl

from preftune.components import choose_methods_op, compare_op, skip_method_op
from preftune.eval.methods import LABELS, STAGES
from preftune.launch import platform
from preftune.pipelines.alignment import (
    dpo_step,
    grpo_step,
    kto_step,
    online_dpo_step,
    ppo_step,
    reward_model_step,
)
from preftune.pipelines.cluster import data_step
from preftune.pipelines.data import import_pairs, ingest_data
from preftune.pipelines.promotion import evaluate_policy
from preftune.pipelines.sft_stage import supervised_fine_tuning

PIPELINE_NAME = "preftune-compare"


#: The compare step's input of each method's training metrics (RLHF's is its PPO step's).
STAGE_INPUT = {method: stages[-1] for method, stages in STAGES.items()}
#: The compare step's inputs from each method's evaluation (evaluate output -> compare input suffix).
EVALUATED = {"evaluation": "metrics", "generations": "generations", "frontier": "frontier"}


def method_branch(
    method: str,
    chosen: dsl.PipelineTask,
    train: Any,
    sft: dsl.PipelineTask,
    pairs: dsl.PipelineTask,
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """One method's training and evaluation when ``chosen`` switches it on, a skip_method stand-in when not;
    the compare step's inputs for it, each a dsl.OneOf of the two branches."""
    name = method.replace("_", "-")
    with dsl.If(chosen.outputs[method] == True, name=name):  # noqa: E712 - a KFP condition
        policy = train()
        evaluated = evaluate_policy(policy, sft, pairs, f"Evaluate {LABELS[method]}", **evaluation)
    with dsl.Else(name=f"skip-{name}"):
        skipped = data_step(skip_method_op(method=method).set_display_name(f"Skip {LABELS[method]}"))
    return {
        "metrics": dsl.OneOf(policy.outputs["metrics"], skipped.outputs["metrics"]),
        **{
            key: dsl.OneOf(evaluated.outputs[output], skipped.outputs[key])
            for key, output in EVALUATED.items()
        },
    }


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Which alignment method? Train any two or more of DPO, RLHF (PPO), GRPO, RLOO, KTO and online "
    "DPO from one SFT model on the same feedback, evaluate all on the same held-out prompts with the same judge, "
    "and report cost, reward, win rates (against SFT and head to head), KL, diversity and a verdict.",
)
def compare_pipeline(
    base_model: str = "examples/tiny-llama",
    sft_data: str = "examples/data/sft.jsonl",
    preference_data: str = "examples/data/preferences.jsonl",
    eval_prompts: str = "examples/data/eval_prompts.jsonl",
    methods: str = "dpo,rlhf",
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
    dpo_epochs: int = 3,
    dpo_learning_rate: float = 2e-4,
    dpo_batch_size: int = 16,
    dpo_beta: float = 0.1,
    dpo_loss: str = "sigmoid",
    dpo_max_steps: int = -1,
    reward_objective: str = "pairwise",
    reward_epochs: int = 4,
    reward_learning_rate: float = 1e-3,
    reward_max_steps: int = -1,
    ppo_iterations: int = -1,
    ppo_rollout_batch_size: int = 32,
    ppo_learning_rate: float = -1.0,
    ppo_max_new_tokens: int = 32,
    ppo_kl_coef: float = 0.05,
    ppo_max_kl: float = 8.0,
    grpo_iterations: int = 16,
    grpo_num_generations: int = 4,
    grpo_learning_rate: float = 5e-4,
    grpo_max_new_tokens: int = 32,
    grpo_kl_coef: float = 0.04,
    grpo_max_kl: float = 8.0,
    kto_epochs: int = 1,
    kto_desirable_weight: float = 1.0,
    kto_undesirable_weight: float = 1.0,
    online_dpo_rounds: int = 8,
    online_dpo_num_generations: int = 4,
    online_dpo_learning_rate: float = -1.0,
    online_dpo_max_new_tokens: int = 32,
    online_dpo_max_kl: float = 8.0,
    num_checkpoints: int = -1,
    eval_max_new_tokens: int = 48,
    eval_max_prompts: int = 64,
    judge_model: str = "",
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    keep_checkpoints: bool = False,
    precision: str = "auto",
    report_to: str = "none",
    attn_implementation: str = "auto",
    checkpoint_every: int = 50,
    seed: int = 0,
):
    """Train the chosen methods from the same SFT model and compare them on the same prompts under one judge.

    The reward model always trains: it is RLHF's, GRPO's, RLOO's and online DPO's reward and the judge of every
    evaluation unless ``judge_model`` names another. A method that is not chosen runs a stand-in step instead.

    Args:
        base_model: Base model: a Hugging Face hub id, a local directory or an s3:// URI.
        sft_data: URI of supervised fine-tuning data (jsonl, parquet or csv; file, directory or s3:// prefix).
        preference_data: URI of human feedback: pairwise, ranked lists, scalar ratings, thumbs or Label Studio.
        eval_prompts: URI of held-out prompts for evaluation (JSONL rows with a prompt).
        methods: Comma-separated methods to compare, two or more of dpo, rlhf (reward model + PPO), grpo, rloo,
            kto and online_dpo; all for every one.
        preference_format: Feedback format: auto, pairwise, ranked, rating, binary or labelstudio.
        since: Only read date partitions (date=YYYY-MM-DD) from this day on; empty reads everything.
        max_rejected_fraction: Fail the import when more than this share of feedback rows is rejected.
        use_lora: Train LoRA adapters instead of all weights, in every stage.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = lora_alpha / lora_r).
        max_length: Longest tokenised prompt + response.
        eval_fraction: Share of SFT examples and of preference prompts held out for evaluation.
        sft_epochs: SFT passes over the training data.
        sft_learning_rate: SFT peak learning rate.
        sft_batch_size: SFT examples per batch, summed over all worker processes (one batch per optimisation
            step).
        sft_max_steps: Stop SFT after this many steps (-1 = all epochs).
        dpo_epochs: Most DPO passes over the training pairs; early stopping on held-out accuracy usually ends
            sooner.
        dpo_learning_rate: DPO peak learning rate.
        dpo_batch_size: DPO pairs per batch, summed over all worker processes (one batch per optimisation
            step).
        dpo_beta: DPO beta: strength of the pull towards the SFT reference.
        dpo_loss: DPO loss type: sigmoid, ipo or hinge.
        dpo_max_steps: Stop DPO after this many steps (-1 = all epochs).
        reward_objective: pairwise (Bradley-Terry on preferences) or regression (on normalised rating scores).
        reward_epochs: Most reward model passes over the training pairs; early stopping on held-out accuracy
            usually ends sooner, keeping the best evaluation's weights.
        reward_learning_rate: Reward model peak learning rate.
        reward_max_steps: Stop reward model training after this many steps (-1 = all epochs).
        ppo_iterations: PPO rounds of rollouts and updates (-1 = one pass over the prompts, 8 to 64).
        ppo_rollout_batch_size: Prompts sampled per PPO iteration.
        ppo_learning_rate: Policy and critic learning rate (-1 = 1e-3 with LoRA, 1e-4 with full weights).
        ppo_max_new_tokens: Most tokens per sampled response during PPO.
        ppo_kl_coef: KL penalty per token against the SFT model.
        ppo_max_kl: KL bound per response, below gate_max_kl: PPO stops, keeping the last good policy, when
            rollouts pass it.
        grpo_iterations: GRPO / RLOO sampling and update rounds.
        grpo_num_generations: GRPO / RLOO answers sampled per prompt (the group each answer is judged against).
        grpo_learning_rate: GRPO / RLOO policy learning rate.
        grpo_max_new_tokens: Most tokens per sampled answer during GRPO / RLOO.
        grpo_kl_coef: GRPO / RLOO weight of the KL to the SFT model.
        grpo_max_kl: GRPO / RLOO KL bound per answer: training stops, keeping the last good policy, when
            rollouts pass it.
        kto_epochs: KTO passes over the desirable and undesirable examples.
        kto_desirable_weight: KTO weight of the desirable examples' loss.
        kto_undesirable_weight: KTO weight of the undesirable examples' loss.
        online_dpo_rounds: Online DPO rounds of sampling, ranking by the reward model and a DPO update.
        online_dpo_num_generations: Online DPO answers sampled per prompt each round, ranked into pairs.
        online_dpo_learning_rate: Online DPO learning rate (-1 = 5e-4 with LoRA, 5e-5 with full weights).
        online_dpo_max_new_tokens: Most tokens per sampled answer during online DPO.
        online_dpo_max_kl: Online DPO KL bound per answer: training stops, keeping the last good policy, when
            its samples pass it.
        num_checkpoints: Intermediate policies of each method kept, scored for the reward-vs-KL chart and
            eligible as the promoted candidate (-1 = 8 with LoRA or up to 100M parameters, else 3).
        eval_max_new_tokens: Longest generated response in evaluation, in tokens.
        eval_max_prompts: Evaluate at most this many held-out prompts.
        judge_model: Reward model URI judging every method; empty = the pipeline's reward model (which
            favours the methods optimised against it, as the report says).
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
        checkpoint_every: Resumable checkpoint every this many optimisation steps in SFT, reward model and DPO.
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
    chosen = data_step(choose_methods_op(methods=methods).set_display_name("Choose methods"))
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
    lora = {"use_lora": use_lora, "lora_r": lora_r, "lora_alpha": lora_alpha}
    # the reward model of the RL methods, and the judge of every evaluation unless judge_model is set
    reward = reward_model_step(
        sft,
        pairs,
        objective=reward_objective,
        epochs=reward_epochs,
        learning_rate=reward_learning_rate,
        max_length=max_length,
        seed=seed,
        max_steps=reward_max_steps,
        checkpoint_every=checkpoint_every,
        **lora,
        **scale,
    )
    grpo_settings = {
        "iterations": grpo_iterations,
        "num_generations": grpo_num_generations,
        "learning_rate": grpo_learning_rate,
        "max_new_tokens": grpo_max_new_tokens,
        "kl_coef": grpo_kl_coef,
        "kl_blowup": grpo_max_kl,
        "num_checkpoints": num_checkpoints,
        "seed": seed,
        **lora,
        **scale,
    }
    # DPO's settings, which KTO shares (its beta, learning rate and batch size are the dpo_* parameters)
    offline = {
        "beta": dpo_beta,
        "learning_rate": dpo_learning_rate,
        "batch_size": dpo_batch_size,
        "max_length": max_length,
        "seed": seed,
        "max_steps": dpo_max_steps,
        "num_checkpoints": num_checkpoints,
        "checkpoint_every": checkpoint_every,
        **lora,
        **scale,
    }
    trainers = {
        "dpo": lambda: dpo_step(sft, pairs, loss_type=dpo_loss, epochs=dpo_epochs, **offline),
        "rlhf": lambda: ppo_step(
            sft,
            reward,
            pairs,
            iterations=ppo_iterations,
            rollout_batch_size=ppo_rollout_batch_size,
            learning_rate=ppo_learning_rate,
            max_new_tokens=ppo_max_new_tokens,
            kl_coef=ppo_kl_coef,
            max_kl=ppo_max_kl,
            num_checkpoints=num_checkpoints,
            seed=seed,
            **lora,
            **scale,
        ),
        "grpo": lambda: grpo_step(sft, reward, pairs, estimator="grpo", **grpo_settings),
        "rloo": lambda: grpo_step(sft, reward, pairs, estimator="rloo", **grpo_settings),
        "kto": lambda: kto_step(
            sft,
            pairs,
            desirable_weight=kto_desirable_weight,
            undesirable_weight=kto_undesirable_weight,
            epochs=kto_epochs,
            **offline,
        ),
        "online_dpo": lambda: online_dpo_step(
            sft,
            reward,
            pairs,
            rounds=online_dpo_rounds,
            num_generations=online_dpo_num_generations,
            learning_rate=online_dpo_learning_rate,
            beta=dpo_beta,
            loss_type=dpo_loss,
            max_new_tokens=online_dpo_max_new_tokens,
            kl_blowup=online_dpo_max_kl,
            seed=seed,
            num_checkpoints=num_checkpoints,
            **lora,
            **scale,
        ),
    }
    evaluation = {
        "eval_prompts": eval_prompts,
        "judge": reward,
        "judge_uri": judge_model,  # when set, it judges instead of the pipeline's reward model
        "max_new_tokens": eval_max_new_tokens,
        "beta": dpo_beta,
        "max_prompts": eval_max_prompts,
        "seed": seed,
        "max_length": max_length,
        **compute,
    }
    results = {
        method: method_branch(method, chosen, train, sft, pairs, evaluation)
        for method, train in trainers.items()
    }
    comparison = compare_op(
        sft_metrics=sft.outputs["metrics"],
        reward_metrics=reward.outputs["metrics"],
        **{f"{STAGE_INPUT[method]}_metrics": r["metrics"] for method, r in results.items()},
        **{f"{method}_{key}": r[key] for method, r in results.items() for key in EVALUATED},
        gpus_per_step=platform.accelerator_count(),
        num_nodes=num_nodes,
        judge_model=judge_model,
    )
    data_step(comparison.set_display_name("Compare methods"))
