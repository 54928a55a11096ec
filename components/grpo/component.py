"""KFP component: GRPO, Dr. GRPO or RLOO, the critic-free policy optimisers, against a reward model and/or Python
reward functions, held near the SFT model by a KL term."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set GRPOConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("grpo")
def grpo(
    sft_model: Input[Model],
    prompts: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    reward_model: Input[Model] = None,
    estimator: str = "grpo",
    iterations: int = 16,
    prompts_per_iteration: int = 8,
    num_generations: int = 4,
    mini_batch_size: int = 16,
    update_epochs: int = 1,
    learning_rate: float = 5e-4,
    max_prompt_length: int = 128,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generation_backend: str = "transformers",
    kv_cache: str = "dynamic",
    compile_decode: bool = False,
    length_bucketing: bool = True,
    vllm_gpu_memory_utilization: float = 0.3,
    clip_range: float = 0.2,
    kl_coef: float = 0.04,
    kl_penalty: str = "loss",
    kl_controller: str = "fixed",
    target_kl: float = 4.0,
    kl_blowup: float = 20.0,
    reward_model_weight: float = 1.0,
    reward_functions: str = "",
    reward_weights: str = "",
    missing_eos_penalty: float = 0.0,
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
    """Optimise the SFT policy with GRPO, Dr. GRPO or RLOO, critic-free; each answer is judged against its group.

    Each iteration samples num_generations answers per prompt, rewards each with the reward model's score and/or
    the reward functions (weighted), and turns the rewards into advantages within each prompt's group
    (group-normalised for grpo, mean-centred for dr_grpo, leave-one-out for rloo). The policy takes clipped
    ratio steps; the KL to the SFT model enters the loss or the reward (kl_penalty, recorded in the lineage).
    With LoRA the reference is the SFT model with the adapter off, so the SFT weights are held once.

    Args:
        sft_model: The SFT model; it is the starting policy and the frozen reference.
        prompts: Rows with a prompt (text or chat messages), e.g. the preference import's train pairs;
            duplicate prompts are used once, and the other columns reach the reward functions.
        reward_model: Optional reward model (the reward_model step's output) that scores answers; it may be left
            out when reward_functions give the reward.

    Returns:
        model: The policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Mean reward of the first and last iterations and its gain, KL to the SFT model (last and max),
            entropy, clip fraction, share of groups with one reward, answer length, KL blow-ups and timings.
        report: Curves of every logged quantity per iteration and sample answers of the first and last
            iterations (HTML).
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("grpo", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "grpo",
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
