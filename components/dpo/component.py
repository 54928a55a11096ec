"""KFP component: Direct Preference Optimization against the SFT model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set DPOConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("dpo")
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
    epochs: int = 3,
    learning_rate: float = 2e-4,
    batch_size: int = 16,
    max_length: int = 256,
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    num_checkpoints: int = -1,
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
    early_stopping_patience: int = 3,
):
    """Train the policy directly on preference pairs, against the frozen SFT model as reference.

    With LoRA, the SFT weights are merged first and the DPO adapter goes on top; the reference log-probs come
    from the same model with the adapter disabled, so no second copy is held in memory.

    Args:
        sft_model: The SFT model; it is both the starting policy and the frozen reference.
        train_pairs: Training pairs from the preference import step.
        eval_pairs: Held-out pairs from the preference import step.

    Returns:
        model: The DPO policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Loss (first step and final), reward accuracy, reward margin and implicit rewards on eval pairs.
        report: Training curves (HTML).
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("dpo", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "dpo",
        config,
        scale=Scale(**scale.launch_arguments()),
        sft_model=sft_model,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
        snapshot_dir=checkpoints,
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
