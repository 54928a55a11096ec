"""KFP component: Direct Preference Optimization against the SFT model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def dpo(
    sft_model: Input[Model],
    train_pairs: Input[Dataset],
    eval_pairs: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    epochs: int = 1,
    learning_rate: float = 2e-4,
    batch_size: int = 16,
    max_length: int = 256,
    use_lora: bool = True,
    lora_r: int = 16,
    num_checkpoints: int = 4,
    checkpoint_every: int = 100,
    checkpoint_uri: str = "",
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    trainjob_runtime: str = "torch-distributed",
    seed: int = 0,
    max_steps: int = -1,
):
    """Train the policy directly on preference pairs, against the frozen SFT model as reference.

    With LoRA, the SFT weights are merged first and the DPO adapter goes on top; the reference log-probs come
    from the same model with the adapter disabled, so no second copy is held in memory.

    Args:
        sft_model: The SFT model; it is both the starting policy and the frozen reference.
        train_pairs: Training pairs from the preference import step.
        eval_pairs: Held-out pairs from the preference import step.
        model: The DPO policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Loss (first step and final), reward accuracy, reward margin and implicit rewards on eval pairs.
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
        report: Training curves (HTML).
        beta: Strength of the pull towards the reference (higher = stay closer).
        loss_type: sigmoid (the DPO paper), ipo or hinge.
        label_smoothing: Assumed share of flipped preference labels (conservative DPO), 0 to 0.5.
        epochs: Passes over the training pairs.
        learning_rate: Peak learning rate (linear warm-up and decay).
        batch_size: Pairs per optimisation step.
        max_length: Longest tokenised prompt + response.
        use_lora: Train a LoRA adapter instead of all weights.
        lora_r: LoRA rank.
        num_checkpoints: Intermediate policies kept in ``checkpoints``, evenly spaced over training, for the
            evaluate step's reward-vs-KL chart (0 = none).
        checkpoint_every: Write a resumable checkpoint every this many optimisation steps (0 = never).
        checkpoint_uri: Where checkpoints go (s3:// or a local path); empty = next to the model output, so a
            retried pod finds and resumes from them.
        num_gpus: Worker processes (one per GPU) in this step, started with torchrun; 0 = every GPU the pod has.
        num_nodes: Nodes to train on; more than 1 runs the step as a Kubeflow Trainer TrainJob.
        distributed_strategy: ddp (a replica per GPU) or fsdp (sharded; not supported by this stage yet).
        trainjob_runtime: The Kubeflow Trainer runtime a multi-node TrainJob uses.
        seed: Seed for initialisation and data order.
        max_steps: Stop after this many optimisation steps (-1 = run all epochs).
    """
    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri
    from preftune.train.dpo import DPOConfig

    config = DPOConfig(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        num_checkpoints=num_checkpoints,
        checkpoint_every=checkpoint_every,
        checkpoint_uri=checkpoint_uri or default_checkpoint_uri(model.uri),
        seed=seed,
        max_steps=max_steps,
    )
    scale = Scale(
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        strategy=distributed_strategy,
        trainjob_runtime=trainjob_runtime,
    )
    result = run_stage(
        "dpo",
        config,
        scale=scale,
        sft_model=sft_model,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
        snapshot_dir=checkpoints,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
