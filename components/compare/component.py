"""KFP component: RLHF against DPO on the same data, cost and quality side by side, with a verdict."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def compare(
    sft_metrics: Input[Metrics],
    dpo_metrics: Input[Metrics],
    reward_metrics: Input[Metrics],
    ppo_metrics: Input[Metrics],
    dpo_evaluation: Input[Metrics],
    rlhf_evaluation: Input[Metrics],
    dpo_generations: Input[Dataset],
    rlhf_generations: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    dpo_frontier: Input[Dataset] = None,
    rlhf_frontier: Input[Dataset] = None,
    gpus_per_step: int = 1,
    num_nodes: int = 1,
    judge_model: str = "",
) -> str:
    """Compare the DPO policy and the RLHF (reward model + PPO) policy trained from the same SFT model.

    Both must have been evaluated on the same prompts with the same seed and judge. Reports per method the wall
    time and compute (GPU-hours requested, tokens processed), peak memory, reward under the judge, win rate
    against the SFT model and head to head, KL to the SFT model, diversity and response length; both
    reward-vs-KL paths on one chart; and a short verdict in plain words with the numbers behind it.

    Args:
        sft_metrics: Metrics of the shared SFT step.
        dpo_metrics: Metrics of the DPO step.
        reward_metrics: Metrics of the reward model step.
        ppo_metrics: Metrics of the PPO step.
        dpo_evaluation: Metrics of the DPO policy's evaluation against the SFT model.
        rlhf_evaluation: Metrics of the PPO policy's evaluation against the SFT model, same prompts and judge.
        dpo_generations: The DPO evaluation's generations (with per-prompt judge rewards).
        rlhf_generations: The PPO evaluation's generations (with per-prompt judge rewards).
        dpo_frontier: The DPO evaluation's reward-vs-KL points.
        rlhf_frontier: The PPO evaluation's reward-vs-KL points.
        gpus_per_step: GPUs each training step requests (compile-time setting), for GPU-hours.
        num_nodes: Nodes each training step runs on, for GPU-hours.
        judge_model: The independent judge both evaluations used, if any; empty means the judge was the RLHF
            branch's own reward model, and the verdict then warns that it favours RLHF.

    Returns:
        metrics: Every figure of both methods (``dpo_*``, ``rlhf_*``) and the head-to-head win rates.
        report: The comparison: verdict, side-by-side table, charts, answers to the same prompts (HTML).
        Output: The verdict, one sentence per line (also at the top of the report), for the run's log and
            summary.
    """
    from preftune.eval.comparison import compare as run_compare
    from preftune.eval.comparison import verdict
    from preftune.launch.metrics import log_metrics

    result = run_compare(
        training={
            "sft": dict(sft_metrics.metadata),
            "dpo": dict(dpo_metrics.metadata),
            "reward": dict(reward_metrics.metadata),
            "ppo": dict(ppo_metrics.metadata),
        },
        evaluations={"dpo": dict(dpo_evaluation.metadata), "rlhf": dict(rlhf_evaluation.metadata)},
        generations={"dpo": dpo_generations.path, "rlhf": rlhf_generations.path},
        frontiers={
            "dpo": dpo_frontier.path if dpo_frontier else None,
            "rlhf": rlhf_frontier.path if rlhf_frontier else None,
        },
        report_path=report.path,
        gpus_per_step=gpus_per_step * num_nodes,
        judge_is_rlhf_reward_model=not judge_model,
    )
    log_metrics(metrics, result)
    return "\n".join(verdict(result, judge_is_rlhf_reward_model=not judge_model))
