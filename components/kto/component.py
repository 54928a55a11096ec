"""KFP component: KTO, learning from unpaired thumbs-up/down examples against the SFT model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set KTOConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("kto")
def kto(
    sft_model: Input[Model],
    train_pairs: Input[Dataset],
    eval_pairs: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    train_unpaired: Input[Dataset] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    epochs: int = 1,
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
):
    """Train the policy on desirable and undesirable answers one at a time (KTO), against the frozen SFT model.

    Binary feedback (thumbs up/down, a rating above or below a threshold) trains without being paired first:
    each answer's implicit reward is compared with a reference point, the batch's KL to the SFT model, and
    desirable and undesirable examples are weighted as the KTO paper says. Preference pairs work too (the chosen
    answer desirable, the rejected one undesirable), and held-out pairs give the preference accuracy.

    Args:
        sft_model: The SFT model; it is both the starting policy and the frozen reference.
        train_pairs: Training pairs from the preference import step: the chosen answer counts as desirable, the
            rejected one as undesirable.
        eval_pairs: Held-out pairs (or unpaired examples); pairs give the held-out preference accuracy.
        train_unpaired: Optional unpaired examples (prompt, completion, label true/false), e.g. the preference
            import's thumbs and ratings; a prompt with unpaired examples is learned from them, not from its pairs.

    Returns:
        model: The KTO policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Loss (first step and final), the KL reference point, desirable and undesirable rewards and their
            margin, and with held-out pairs the preference accuracy (and the SFT model's).
        report: Training curves (HTML).
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("kto", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "kto",
        config,
        scale=Scale(**scale.launch_arguments()),
        sft_model=sft_model,
        train_data=train_pairs,
        eval_data=eval_pairs,
        unpaired_data=train_unpaired,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
        snapshot_dir=checkpoints,
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
