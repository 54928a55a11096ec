"""KFP component: train a reward model on preference pairs, from the SFT model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set RewardConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("reward_model")
def reward_model(
    sft_model: Input[Model],
    train_pairs: Input[Dataset],
    eval_pairs: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    objective: str = "pairwise",
    use_margin: bool = True,
    epochs: int = 4,
    learning_rate: float = 1e-3,
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
    early_stopping_patience: int = 4,
    pair_subset: str = "all",
    judge_fraction: float = 0.25,
):
    """Train a reward model that scores a response to a prompt with one number, imitating human preferences.

    The SFT model gets a one-scalar head and reads the same chat-formatted text as the policy. The pairwise
    objective is Bradley-Terry (the chosen answer should score higher, by at least the pair's margin when the
    data gives one); the regression objective fits the normalised scores that pairs made from ratings carry.
    PPO optimises the policy against this model; the evaluate step can use it as a judge.

    Args:
        sft_model: The SFT model; its weights initialise the reward model.
        train_pairs: Training pairs from the preference import step.
        eval_pairs: Held-out pairs from the preference import step.

    Returns:
        model: The reward model (a LoRA adapter with its score head, stacked on the SFT model, or full
            sequence-classification weights); loads with preftune.model.modeling.load_reward_model.
        metrics: Held-out pair accuracy (before and after training), mean reward margin, accuracy by margin
            bucket, losses, reward mean and spread.
        report: Training curves and accuracy by margin bucket (HTML).
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("reward_model", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "reward",
        config,
        scale=Scale(**scale.launch_arguments()),
        sft_model=sft_model,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
