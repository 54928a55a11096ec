"""The supervised fine-tuning stage both pipelines start from."""

from kfp import dsl

from preftune.components import sft_op
from preftune.orchestration.runner import Rule
from preftune.pipelines.cluster import training_step

#: Value rules of the parameters every pipeline shares (data, SFT, evaluation).
SHARED_RULES = {
    "eval_fraction": Rule(low=0.0, high=0.5),
    "preference_format": Rule(choices=("auto", "pairwise", "ranked", "rating", "binary", "labelstudio")),
    "max_rejected_fraction": Rule(low=0.0, high=1.0),
    "lora_r": Rule(low=1),
    "max_length": Rule(low=16),
    "sft_epochs": Rule(low=1),
    "sft_learning_rate": Rule(low=0.0, low_inclusive=False),
    "sft_batch_size": Rule(low=1),
    "eval_max_new_tokens": Rule(low=1),
    "eval_max_prompts": Rule(low=1),
    "num_gpus": Rule(low=0),
    "num_nodes": Rule(low=1),
    "distributed_strategy": Rule(choices=("ddp", "fsdp")),
    "checkpoint_every": Rule(low=0),
}


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
    seed: int,
    max_steps: int,
    scale: dict,
) -> dsl.PipelineTask:
    """SFT on the ingested rows; its model is the reference of every later stage.

    ``scale`` holds the settings every training step shares (GPUs, nodes, strategy, checkpoint interval).
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
        seed=seed,
        max_steps=max_steps,
        **scale,
    )
    return training_step(task.set_display_name("Supervised fine-tuning"))
