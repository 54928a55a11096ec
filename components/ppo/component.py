"""KFP component: PPO against a reward model, held near the SFT model by a KL penalty (RLHF's last stage)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def ppo(
    sft_model: Input[Model],
    reward_model: Input[Model],
    prompts: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    iterations: int = 16,
    rollout_batch_size: int = 32,
    ppo_epochs: int = 2,
    learning_rate: float = 1e-3,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    kl_coef: float = 0.05,
    kl_controller: str = "fixed",
    target_kl: float = 6.0,
    max_approx_kl: float = 0.1,
    max_kl: float = 20.0,
    use_lora: bool = True,
    lora_r: int = 16,
    num_checkpoints: int = 4,
    checkpoint_every: int = 4,
    checkpoint_uri: str = "",
    num_gpus: int = 0,
    num_nodes: int = 1,
    distributed_strategy: str = "ddp",
    trainjob_runtime: str = "torch-distributed",
    seed: int = 0,
):
    """Optimise the SFT policy against the reward model with PPO, penalising KL divergence from the SFT model.

    Each iteration samples one response per prompt, scores it with the reward model, and takes clipped PPO steps
    on a reward of score minus kl_coef times the log-ratio to the SFT model. With LoRA, the reference is the SFT
    model with the policy's adapter disabled and the critic is the reward model with its own adapter, so each
    model is held once in memory.

    Args:
        sft_model: The SFT model; it is the starting policy and the frozen reference.
        reward_model: The reward model; it scores responses and initialises the critic (value model).
        prompts: Rows with a prompt (text or chat messages), e.g. the preference import's train pairs;
            duplicate prompts are used once.
        model: The PPO policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Mean reward score of the first and last iterations and its gain, KL to the SFT model (last and
            max), entropy, clip fraction, value loss, explained variance, response length, early stops, KL
            blow-ups and timings.
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
        report: Curves of every logged quantity per iteration and sample responses of the first and last
            iterations (HTML).
        iterations: Rollout and update rounds.
        rollout_batch_size: Prompts sampled (one response each) per iteration.
        ppo_epochs: Passes over each iteration's rollouts (minibatches of 8 sequences, or fewer when the batch is smaller).
        learning_rate: Policy and critic learning rate (constant).
        max_new_tokens: Most tokens sampled per response.
        temperature: Sampling temperature; log-probabilities use the same temperature.
        top_p: Nucleus sampling threshold (1 = off, which keeps the PPO ratio exact).
        kl_coef: KL penalty per token (the starting value for the adaptive controller).
        kl_controller: fixed, or adaptive (moves kl_coef so the KL per response tracks target_kl).
        target_kl: Adaptive controller: wanted KL to the SFT model per response, in nats.
        max_approx_kl: Stop an iteration's PPO updates once the policy has moved this far (approximate KL per
            token) from the one that sampled the rollouts; 0 = never.
        max_kl: The KL bound: when the rollouts' KL to the SFT model (per response, in nats) passes it, training
            stops before that iteration's update, keeps the last good policy and says so in the report.
        use_lora: Train LoRA adapters (policy and critic) instead of all weights; full fine-tuning holds frozen
            copies of the SFT and reward models besides the trained ones.
        lora_r: LoRA rank.
        num_checkpoints: Intermediate policies kept in ``checkpoints``, evenly spaced over training, for the
            evaluate step's reward-vs-KL chart (0 = none).
        checkpoint_every: Write a resumable checkpoint every this many PPO iterations (0 = never).
        checkpoint_uri: Where checkpoints go (s3:// or a local path); empty = next to the model output, so a
            retried pod finds and resumes from them.
        num_gpus: Worker processes (one per GPU) in this step, started with torchrun; 0 = every GPU the pod has.
        num_nodes: Nodes to train on; more than 1 runs the step as a Kubeflow Trainer TrainJob.
        distributed_strategy: ddp (a replica per GPU) or fsdp (sharded; not supported by this stage yet).
        trainjob_runtime: The Kubeflow Trainer runtime a multi-node TrainJob uses.
        seed: Seed for initialisation, prompt order and sampling.
    """
    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri
    from preftune.train.ppo import PPOConfig

    config = PPOConfig(
        iterations=iterations,
        rollout_batch_size=rollout_batch_size,
        mini_batch_size=min(8, rollout_batch_size),
        ppo_epochs=ppo_epochs,
        learning_rate=learning_rate,
        critic_learning_rate=learning_rate,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        kl_coef=kl_coef,
        kl_controller=kl_controller,
        target_kl=target_kl,
        max_approx_kl=max_approx_kl,
        kl_blowup=max_kl,
        use_lora=use_lora,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        num_checkpoints=num_checkpoints,
        checkpoint_every=checkpoint_every,
        checkpoint_uri=checkpoint_uri or default_checkpoint_uri(model.uri),
        seed=seed,
    )
    scale = Scale(
        num_gpus=num_gpus,
        num_nodes=num_nodes,
        strategy=distributed_strategy,
        trainjob_runtime=trainjob_runtime,
    )
    result = run_stage(
        "ppo",
        config,
        scale=scale,
        sft_model=sft_model,
        reward_model=reward_model,
        prompts=prompts,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
        snapshot_dir=checkpoints,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
