"""KFP component: PPO against a reward model, held near the SFT model by a KL penalty (RLHF's last stage)."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set PPOConfig and ScaleConfig fields are documented from those fields' metadata; max_kl
# sets kl_blowup, learning_rate also the critic's, and rollout_batch_size the minibatch (preftune.config.components).
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("ppo")
def ppo(
    sft_model: Input[Model],
    reward_model: Input[Model],
    prompts: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    iterations: int = -1,
    rollout_batch_size: int = 32,
    ppo_epochs: int = 2,
    learning_rate: float = -1.0,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generation_backend: str = "transformers",
    kv_cache: str = "dynamic",
    compile_decode: bool = False,
    length_bucketing: bool = True,
    vllm_gpu_memory_utilization: float = 0.3,
    kl_coef: float = 0.05,
    kl_controller: str = "adaptive",
    target_kl: float = 3.0,
    max_approx_kl: float = 0.1,
    max_kl: float = 8.0,
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    num_checkpoints: int = -1,
    checkpoint_every: int = 4,
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

    Returns:
        model: The PPO policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Mean reward score of the first and last iterations and its gain, KL to the SFT model (last and
            max), entropy, clip fraction, value loss, explained variance, response length, early stops, KL
            blow-ups and timings.
        report: Curves of every logged quantity per iteration and sample responses of the first and last
            iterations (HTML).
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("ppo", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "ppo",
        config,
        scale=Scale(**scale.launch_arguments()),
        sft_model=sft_model,
        reward_model=reward_model,
        prompts=prompts,
        model_dir=model,
        report_path=report,
        sft_model_uri=sft_model.uri,
        model_uri=model.uri,
        snapshot_dir=checkpoints,
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
