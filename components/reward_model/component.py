"""KFP component: train a reward model on preference pairs, from the SFT model."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def reward_model(
    sft_model: Input[Model],
    train_pairs: Input[Dataset],
    eval_pairs: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    objective: str = "pairwise",
    use_margin: bool = True,
    epochs: int = 1,
    learning_rate: float = 1e-3,
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
    """Train a reward model that scores a response to a prompt with one number, imitating human preferences.

    The SFT model gets a one-scalar head and reads the same chat-formatted text as the policy. The pairwise
    objective is Bradley-Terry (the chosen answer should score higher, by at least the pair's margin when the
    data gives one); the regression objective fits the normalised scores that pairs made from ratings carry.
    PPO optimises the policy against this model; the evaluate step can use it as a judge.

    Args:
        sft_model: The SFT model; its weights initialise the reward model.
        train_pairs: Training pairs from the preference import step.
        eval_pairs: Held-out pairs from the preference import step.
        model: The reward model (a LoRA adapter with its score head, stacked on the SFT model, or full
            sequence-classification weights); loads with preftune.model.modeling.load_reward_model.
        metrics: Held-out pair accuracy (before and after training), mean reward margin, accuracy by margin
            bucket, losses, reward mean and spread.
        report: Training curves and accuracy by margin bucket (HTML).
        objective: pairwise (Bradley-Terry on chosen vs rejected) or regression (MSE on the pairs' normalised
            scores, for pairs made from scalar ratings).
        use_margin: Pairwise: require the chosen answer to win by each pair's margin (rank gap, score
            difference) when the data gives one.
        epochs: Passes over the training pairs.
        learning_rate: Peak learning rate (linear warm-up and decay).
        batch_size: Pairs per optimisation step.
        max_length: Longest tokenised prompt + response.
        use_lora: Train a LoRA adapter (and the full score head) instead of all weights.
        lora_r: LoRA rank.
        checkpoint_every: Write a resumable checkpoint every this many optimisation steps (0 = never).
        checkpoint_uri: Where checkpoints go (s3:// or a local path); empty = next to the model output, so a
            retried pod finds and resumes from them.
        num_gpus: Worker processes (one per GPU) in this step, started with torchrun; 0 = every GPU the pod has.
        num_nodes: Nodes to train on; more than 1 runs the step as a Kubeflow Trainer TrainJob.
        distributed_strategy: ddp (a replica per GPU) or fsdp (sharded; not supported by this stage yet).
        trainjob_runtime: The Kubeflow Trainer runtime a multi-node TrainJob uses.
        seed: Seed for the score head's initialisation and data order.
        max_steps: Stop after this many optimisation steps (-1 = run all epochs).
    """
    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri
    from preftune.train.reward import RewardConfig

    config = RewardConfig(
        objective=objective,
        use_margin=use_margin,
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
        "reward",
        config,
        scale=scale,
        sft_model=sft_model,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
