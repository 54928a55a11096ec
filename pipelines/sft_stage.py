"""The supervised fine-tuning stage both pipelines start from."""

from kfp import dsl

from preftune.components import sft_op
from preftune.pipelines.cluster import training_step


def supervised_fine_tuning(
    base_model: str,
    sft_rows: dsl.PipelineTask,
    *,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    max_length: int,
    use_lora: bool,
    lora_r: int,
    lora_alpha: int,
    seed: int,
    max_steps: int,
    scale: dict,
) -> dsl.PipelineTask:
    """SFT on the ingested rows; its model is the reference of every later stage.

    ``scale`` holds the settings every training step shares (GPUs, nodes, strategy, precision, attention kernel,
    checkpoint interval).
    """
    task = sft_op(
        base_model=base_model,
        train_data=sft_rows.outputs["train_data"],
        eval_data=sft_rows.outputs["eval_data"],
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        max_length=max_length,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        seed=seed,
        max_steps=max_steps,
        **scale,
    )
    return training_step(task.set_display_name("Supervised fine-tuning"))
