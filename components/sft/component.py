"""KFP component: supervised fine-tuning of the base model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def sft(
    base_model: str,
    train_data: Input[Dataset],
    eval_data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    epochs: int = 2,
    learning_rate: float = 2e-3,
    batch_size: int = 16,
    max_length: int = 256,
    use_lora: bool = True,
    lora_r: int = 16,
    checkpoint_every: int = 100,
    checkpoint_uri: str = "",
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    trainjob_runtime: str = "torch-distributed",
    seed: int = 0,
    max_steps: int = -1,
):
    """Fine-tune the base model on demonstrations, with the loss on completion tokens only.

    The chat template of the model's tokenizer is applied to every prompt. With LoRA the output is an adapter
    stacked on the base model; without, full weights. Either way it is the reference model for DPO and PPO.

    Args:
        base_model: Base model: a Hugging Face hub id, a local directory or an s3:// URI.
        train_data: Training examples from the ingest step.
        eval_data: Held-out examples from the ingest step.
        model: The fine-tuned model (Hugging Face directory, safetensors, lineage and model card).
        metrics: Train and eval loss, eval perplexity, steps, tokens and time.
        report: Training curves (HTML).
        epochs: Passes over the training data.
        learning_rate: Peak learning rate (linear warm-up and decay).
        batch_size: Examples per optimisation step.
        max_length: Longest tokenised prompt + completion; longer prompts keep their end.
        use_lora: Train a LoRA adapter instead of all weights.
        lora_r: LoRA rank.
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
    from preftune.train.sft import SFTConfig

    config = SFTConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
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
        "sft",
        config,
        scale=scale,
        base_model=base_model,
        train_data=train_data,
        eval_data=eval_data,
        model_dir=model,
        report_path=report,
        base_model_uri=base_model,
        model_uri=model.uri,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
