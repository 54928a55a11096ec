"""KFP component: online (iterative) DPO, the reward model ranking the policy's own answers into pairs each round."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set OnlineDPOConfig and ScaleConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("online_dpo")
def online_dpo(
    sft_model: Input[Model],
    prompts: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    checkpoints: Output[Model],
    reward_model: Input[Model] = None,
    rounds: int = 8,
    prompts_per_round: int = 16,
    num_generations: int = 4,
    batch_size: int = 8,
    dpo_epochs: int = 2,
    learning_rate: float = -1.0,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    min_score_gap: float = 0.0,
    max_prompt_length: int = 128,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generation_backend: str = "transformers",
    kv_cache: str = "dynamic",
    compile_decode: bool = False,
    length_bucketing: bool = True,
    vllm_gpu_memory_utilization: float = 0.3,
    kl_blowup: float = 20.0,
    reward_model_weight: float = 1.0,
    reward_functions: str = "",
    reward_weights: str = "",
    missing_eos_penalty: float = 0.0,
    use_lora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    num_checkpoints: int = -1,
    checkpoint_every: int = 2,
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
    """Collect, rank and train inside one step; each round the policy answers, the judge pairs, DPO learns.

    Each round samples num_generations answers per prompt from the current policy, scores them with the reward
    model and/or the reward functions, pairs each prompt's best answer with its worst, and takes DPO steps on
    those pairs against the frozen SFT model (the reference for every round). A KL past kl_blowup stops the run
    and keeps the last good policy.

    Args:
        sft_model: The SFT model; it is the starting policy and the frozen reference.
        prompts: Rows with a prompt (text or chat messages), e.g. the preference import's train pairs;
            duplicate prompts are used once.
        reward_model: The judge: a reward model (the reward_model step's output) that ranks the sampled answers;
            it may be left out when reward_functions rank them.

    Returns:
        model: The policy (a LoRA adapter stacked on the SFT model, or full weights).
        metrics: Mean reward of the first and last rounds and its gain, KL to the SFT model, pairs trained on,
            DPO loss and accuracy, KL blow-ups and timings.
        report: Curves per round and sample answers of the first and last rounds (HTML).
        checkpoints: Intermediate policies (``step-<N>/`` model directories and ``index.json``), for the
            evaluate step's reward-vs-KL chart.
    """
    from preftune.config.components import configs_from

    config, scale = configs_from("online_dpo", locals())

    from preftune.launch.distributed import Scale, run_stage
    from preftune.train.checkpoint import default_checkpoint_uri

    config.checkpoint_uri = config.checkpoint_uri or default_checkpoint_uri(model.uri)
    result = run_stage(
        "online_dpo",
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
