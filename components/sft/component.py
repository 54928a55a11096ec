"""KFP component: supervised fine-tuning of the base model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set SFTConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("sft")
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
    lora_alpha: int = 32,
    checkpoint_every: int = 100,
    checkpoint_uri: str = "",
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    precision: str = "auto",
    report_to: str = "none",
    attn_implementation: str = "auto",
    trainjob_runtime: str = "torch-distributed",
    keep_checkpoints: bool = False,
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

    Returns:
        model: The fine-tuned model (Hugging Face directory, safetensors, lineage and model card).
        metrics: Train and eval loss, eval perplexity, steps, tokens and time.
        report: Training curves (HTML).
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("sft", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "sft",
        config,
        scale=Scale(**scale.launch_arguments()),
        base_model=base_model,
        train_data=train_data,
        eval_data=eval_data,
        model_dir=model,
        report_path=report,
        base_model_uri=base_model,
        model_uri=model.uri,
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
