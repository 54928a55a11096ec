"""KFP component: supervised fine-tuning of the base model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.platform import runtime_image


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
        seed: Seed for initialisation and data order.
        max_steps: Stop after this many optimisation steps (-1 = run all epochs).
    """
    from preftune.train.sft import SFTConfig, train_sft

    config = SFTConfig(
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        seed=seed,
        max_steps=max_steps,
    )
    result = train_sft(
        base_model,
        train_data.path,
        eval_data.path,
        model.path,
        report.path,
        config,
        base_model_uri=base_model,
        model_uri=model.uri,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
