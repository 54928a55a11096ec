"""KFP component: any subset of the alignment methods on the same data, cost and quality side by side."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def compare(
    sft_metrics: Input[Metrics],
    metrics: Output[Metrics],
    report: Output[HTML],
    reward_metrics: Input[Metrics] = None,
    dpo_metrics: Input[Metrics] = None,
    dpo_evaluation: Input[Metrics] = None,
    dpo_generations: Input[Dataset] = None,
    dpo_frontier: Input[Dataset] = None,
    ppo_metrics: Input[Metrics] = None,
    rlhf_evaluation: Input[Metrics] = None,
    rlhf_generations: Input[Dataset] = None,
    rlhf_frontier: Input[Dataset] = None,
    grpo_metrics: Input[Metrics] = None,
    grpo_evaluation: Input[Metrics] = None,
    grpo_generations: Input[Dataset] = None,
    grpo_frontier: Input[Dataset] = None,
    rloo_metrics: Input[Metrics] = None,
    rloo_evaluation: Input[Metrics] = None,
    rloo_generations: Input[Dataset] = None,
    rloo_frontier: Input[Dataset] = None,
    kto_metrics: Input[Metrics] = None,
    kto_evaluation: Input[Metrics] = None,
    kto_generations: Input[Dataset] = None,
    kto_frontier: Input[Dataset] = None,
    online_dpo_metrics: Input[Metrics] = None,
    online_dpo_evaluation: Input[Metrics] = None,
    online_dpo_generations: Input[Dataset] = None,
    online_dpo_frontier: Input[Dataset] = None,
    gpus_per_step: int = 1,
    num_nodes: int = 1,
    judge_model: str = "",
) -> str:
    """Compare the policies that two or more alignment methods trained from the same SFT model.

    The methods: DPO, RLHF (reward model + PPO), GRPO, RLOO, KTO and online DPO. A method takes part when its evaluation is given and not a skip_method stand-in. All must have been
    evaluated on the same prompts with the same seed and judge. Reports per method the wall time and compute
    (GPU-hours requested, tokens processed), peak memory, reward under the judge, win rate against the SFT model
    and head to head against each other method, KL to the SFT model, diversity and response length; every
    reward-vs-KL path on one chart; and a short verdict in plain words with the numbers behind it.

    Args:
        sft_metrics: Metrics of the shared SFT step.
        reward_metrics: Metrics of the reward model step (needed by RLHF, GRPO, RLOO and online DPO, whose cost
            includes it).
        dpo_metrics: Metrics of the DPO training step.
        dpo_evaluation: Metrics of the DPO policy's evaluation against the SFT model.
        dpo_generations: The DPO evaluation's generations (with per-prompt judge rewards).
        dpo_frontier: The DPO evaluation's reward-vs-KL points.
        ppo_metrics: Metrics of the PPO training step.
        rlhf_evaluation: Metrics of the RLHF (reward model + PPO) policy's evaluation against the SFT model.
        rlhf_generations: The RLHF (reward model + PPO) evaluation's generations (with per-prompt judge rewards).
        rlhf_frontier: The RLHF (reward model + PPO) evaluation's reward-vs-KL points.
        grpo_metrics: Metrics of the GRPO training step.
        grpo_evaluation: Metrics of the GRPO policy's evaluation against the SFT model.
        grpo_generations: The GRPO evaluation's generations (with per-prompt judge rewards).
        grpo_frontier: The GRPO evaluation's reward-vs-KL points.
        rloo_metrics: Metrics of the RLOO training step.
        rloo_evaluation: Metrics of the RLOO policy's evaluation against the SFT model.
        rloo_generations: The RLOO evaluation's generations (with per-prompt judge rewards).
        rloo_frontier: The RLOO evaluation's reward-vs-KL points.
        kto_metrics: Metrics of the KTO training step.
        kto_evaluation: Metrics of the KTO policy's evaluation against the SFT model.
        kto_generations: The KTO evaluation's generations (with per-prompt judge rewards).
        kto_frontier: The KTO evaluation's reward-vs-KL points.
        online_dpo_metrics: Metrics of the online DPO training step.
        online_dpo_evaluation: Metrics of the online DPO policy's evaluation against the SFT model.
        online_dpo_generations: The online DPO evaluation's generations (with per-prompt judge rewards).
        online_dpo_frontier: The online DPO evaluation's reward-vs-KL points.
        gpus_per_step: GPUs each training step requests (compile-time setting), for GPU-hours.
        num_nodes: Nodes each training step runs on, for GPU-hours.
        judge_model: The independent judge every evaluation used, if any; empty means the judge was the
            pipeline's own reward model, and the verdict then warns whom it favours.

    Returns:
        metrics: Every figure of each method (``dpo_*``, ``rlhf_*``, ...) and the head-to-head win rates.
        report: The comparison: verdict, side-by-side table, charts, answers to the same prompts (HTML).
        Output: The verdict, one sentence per line (also at the top of the report), for the run's log and
            summary.
    """
    from preftune.eval.comparison import compare_artifacts, verdict
    from preftune.launch.metrics import log_metrics

    result = compare_artifacts(
        {
            "sft": sft_metrics,
            "reward": reward_metrics,
            "dpo": dpo_metrics,
            "ppo": ppo_metrics,
            "grpo": grpo_metrics,
            "rloo": rloo_metrics,
            "kto": kto_metrics,
            "online_dpo": online_dpo_metrics,
        },
        {
            "dpo": (dpo_evaluation, dpo_generations, dpo_frontier),
            "rlhf": (rlhf_evaluation, rlhf_generations, rlhf_frontier),
            "grpo": (grpo_evaluation, grpo_generations, grpo_frontier),
            "rloo": (rloo_evaluation, rloo_generations, rloo_frontier),
            "kto": (kto_evaluation, kto_generations, kto_frontier),
            "online_dpo": (online_dpo_evaluation, online_dpo_generations, online_dpo_frontier),
        },
        report_path=report.path,
        gpus_per_step=gpus_per_step * num_nodes,
        judge_is_reward_model=not judge_model,
    )
    log_metrics(metrics, result)
    return "\n".join(verdict(result, judge_is_reward_model=not judge_model))
