"""The DPO pipeline: ingest -> SFT -> preference import -> DPO -> evaluate -> gate -> promote."""

from kfp import dsl

from preftune.pipelines.alignment import (
    dpo_step,
    kto_step,
    online_dpo_step,
    refuse_other_choice,
    reward_model_step,
)
from preftune.pipelines.data import import_pairs, ingest_data
from preftune.pipelines.promotion import evaluate_and_promote
from preftune.pipelines.sft_stage import supervised_fine_tuning

PIPELINE_NAME = "preftune-dpo"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Align a language model with pairwise human preferences by DPO: ingest SFT data, fine-tune, "
    "import preference pairs, train with DPO against the SFT model, evaluate against it and the registry's "
    "champion, and promote the policy when the gate passes.",
)
def dpo_pipeline(
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
    dpo_epochs: int = 3,
    dpo_learning_rate: float = 2e-4,
    dpo_batch_size: int = 16,
    dpo_beta: float = 0.1,
    dpo_loss: str = "sigmoid",
    dpo_label_smoothing: float = 0.0,
    dpo_max_steps: int = -1,
    dpo_method: str = "dpo",
    kto_epochs: int = 1,
    kto_desirable_weight: float = 1.0,
    kto_undesirable_weight: float = 1.0,
    online_dpo_rounds: int = 8,
    online_dpo_num_generations: int = 4,
    online_dpo_learning_rate: float = -1.0,
    online_dpo_max_new_tokens: int = 32,
    online_dpo_max_kl: float = 8.0,
    reward_epochs: int = 4,
    reward_learning_rate: float = 1e-3,
    reward_max_steps: int = -1,
    num_checkpoints: int = -1,
    eval_max_new_tokens: int = 48,
    eval_max_prompts: int = 64,
    judge_model: str = "",
    heldout_judge_model: str = "",
    registry_uri: str = "",
    model_name: str = "preftune-dpo",
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
    seed: int = 0,
):
    """Align a language model with pairwise human preferences by DPO.

    Args:
        base_model: Base model: a Hugging Face hub id, a local directory or an s3:// URI.
        sft_data: URI of supervised fine-tuning data (jsonl, parquet or csv; file, directory or s3:// prefix).
        preference_data: URI of pairwise preference data (prompt, chosen, rejected).
        eval_prompts: URI of held-out prompts for evaluation (JSONL rows with a prompt).
        preference_format: Feedback format: auto, pairwise, ranked, rating, binary or labelstudio.
        since: Only read date partitions (date=YYYY-MM-DD) from this day on; empty reads everything.
        max_rejected_fraction: Fail the import when more than this share of feedback rows is rejected.
        use_lora: Train LoRA adapters instead of all weights, in SFT and DPO.
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
        dpo_label_smoothing: Assumed share of flipped preference labels (conservative DPO; sigmoid loss only).
        dpo_max_steps: Stop DPO after this many steps (-1 = all epochs).
        dpo_method: The policy step: dpo (offline, on the imported pairs; the default), kto (on the import's
            unpaired thumbs and ratings, and the pairs of the other prompts; with dpo_beta, dpo_learning_rate,
            dpo_batch_size and dpo_max_steps) or online_dpo (a reward model trained on the pairs ranks the
            policy's own answers into pairs each round; with dpo_beta and dpo_loss).
        kto_epochs: KTO passes over the training examples.
        kto_desirable_weight: KTO weight of the desirable examples' loss (lambda_D).
        kto_undesirable_weight: KTO weight of the undesirable examples' loss (lambda_U).
        online_dpo_rounds: Online DPO sample, rank and train rounds.
        online_dpo_num_generations: Online DPO answers sampled per prompt; the best and worst make its pair.
        online_dpo_learning_rate: Online DPO policy learning rate (-1 = 5e-4 with LoRA, 5e-5 with full weights).
        online_dpo_max_new_tokens: Most tokens per sampled answer during online DPO.
        online_dpo_max_kl: Online DPO KL bound per answer, below gate_max_kl: training stops, keeping the last
            good policy, when the samples pass it (0 = never).
        reward_epochs: Most passes of online DPO's reward model (its judge) over the training pairs.
        reward_learning_rate: Peak learning rate of online DPO's reward model.
        reward_max_steps: Stop online DPO's reward model training after this many steps (-1 = all epochs).
        num_checkpoints: Intermediate DPO policies kept, scored by evaluation (reward-vs-KL chart) and eligible
            as the promoted candidate (-1 = 8 with LoRA or up to 100M parameters, else 3).
        eval_max_new_tokens: Longest generated response in evaluation, in tokens.
        eval_max_prompts: Evaluate at most this many held-out prompts.
        judge_model: Optional reward model URI (s3://, local directory or hub id) that judges the policy against
            the SFT model and the champion; without one the candidate cannot be compared with a champion.
        heldout_judge_model: Optional reward model URI trained on preferences the policy never saw; when set,
            the gate promotes only a candidate whose gain this second judge confirms (a reward-hacking
            guard).
        registry_uri: Model registry root (s3://bucket/prefix); empty = no registry: nothing is promoted.
        model_name: Name of the policy in the registry.
        gate_min_win_rate_vs_champion: Promote only when the judge prefers the candidate over the champion on
            at least this share of prompts (-1 = do not check).
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

    lora = {"use_lora": use_lora, "lora_r": lora_r, "lora_alpha": lora_alpha}
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
        "judge_uri": judge_model,
        "beta": dpo_beta,
    }
    with dsl.If(dpo_method == "dpo", name="dpo"):
        offline = dpo_step(
            sft,
            pairs,
            beta=dpo_beta,
            loss_type=dpo_loss,
            label_smoothing=dpo_label_smoothing,
            epochs=dpo_epochs,
            learning_rate=dpo_learning_rate,
            batch_size=dpo_batch_size,
            max_length=max_length,
            use_lora=use_lora,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            seed=seed,
            max_steps=dpo_max_steps,
            num_checkpoints=num_checkpoints,
            checkpoint_every=checkpoint_every,
            **scale,
        )
        evaluate_and_promote(offline, sft, pairs, **tail)
    with dsl.Elif(dpo_method == "kto", name="kto"):
        kto = kto_step(
            sft,
            pairs,
            beta=dpo_beta,
            desirable_weight=kto_desirable_weight,
            undesirable_weight=kto_undesirable_weight,
            epochs=kto_epochs,
            learning_rate=dpo_learning_rate,
            batch_size=dpo_batch_size,
            max_length=max_length,
            seed=seed,
            max_steps=dpo_max_steps,
            num_checkpoints=num_checkpoints,
            checkpoint_every=checkpoint_every,
            **lora,
            **scale,
        )
        evaluate_and_promote(kto, sft, pairs, **tail)
    with dsl.Elif(dpo_method == "online_dpo", name="online-dpo"):
        judge = reward_model_step(
            sft,
            pairs,
            display_name="Online DPO judge",
            epochs=reward_epochs,
            learning_rate=reward_learning_rate,
            max_steps=reward_max_steps,
            max_length=max_length,
            seed=seed,
            checkpoint_every=checkpoint_every,
            **lora,
            **scale,
        )
        online = online_dpo_step(
            sft,
            judge,
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
        )
        evaluate_and_promote(online, sft, pairs, **tail)
    with dsl.Else(name="unknown-dpo-method"):
        refuse_other_choice("dpo_method", dpo_method, ("dpo", "kto", "online_dpo"))
