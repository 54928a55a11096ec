"""KFP component: compare a candidate policy with its reference on held-out data."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set EvalConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("evaluate")
def evaluate(
    candidate: Input[Model],
    reference: Input[Model],
    eval_prompts: str,
    eval_pairs: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    generations: Output[Dataset],
    frontier: Output[Dataset],
    selected: Output[Model],
    judge: Input[Model] = None,
    heldout_judge: Input[Model] = None,
    checkpoints: Input[Model] = None,
    judge_uri: str = "",
    heldout_judge_uri: str = "",
    champion_uri: str = "",
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.9,
    generation_backend: str = "transformers",
    kv_cache: str = "dynamic",
    compile_decode: bool = False,
    length_bucketing: bool = True,
    vllm_gpu_memory_utilization: float = 0.3,
    beta: float = 0.1,
    max_prompts: int = 64,
    seed: int = 0,
    max_length: int = 256,
    precision: str = "auto",
    report_to: str = "none",
    attn_implementation: str = "auto",
    select_snapshot: bool = True,
    max_kl: float = 10.0,
    min_diversity_ratio: float = 0.8,
    min_judge_confirmation: float = 0.5,
):
    """Choose the candidate among the training run's policies, then measure it against its reference and champion.

    Every training snapshot and the final policy are measured as a candidate would be; the best one by the
    held-out judge's reward (else the judge's, else held-out implicit-reward accuracy) that stays inside the
    gate's bounds on KL, diversity and held-out confirmation is chosen, and copied to ``selected`` for the gate
    and promote; the report says which and why. Reports KL(candidate || reference) on candidate samples,
    implicit-reward accuracy and chosen-response perplexity on held-out pairs, distinct-1/2 diversity (and its
    ratio to the reference's) and response length.
    Given a judge (a reward model), it scores every model's responses and reports the candidate's win rate,
    raw and length-controlled, against the reference and the champion. Given the training step's checkpoints,
    it draws reward against KL over training (the frontier view of the DPO paper). All in one HTML report.

    Args:
        candidate: The trained policy.
        reference: The reference policy (the SFT model).
        eval_prompts: URI of held-out prompts (JSONL rows with a ``prompt``: text or chat messages).
        eval_pairs: Held-out preference pairs from the preference import step.
        judge: Optional reward model (for example the reward_model step's output) that scores the responses of
            every model to each prompt; leave unset to skip.
        heldout_judge: Optional second reward model, trained on preferences the judge never saw (the RLHF
            pipeline's held-out judge): it ranks the run's policies and must confirm the judge's gain (the
            gate's reward-hacking guard).
        checkpoints: Optional intermediate policies of the training step (its checkpoints output): each becomes
            a point of the reward-vs-KL chart.
        judge_uri: Optional URI of a reward model to judge with (s3://, a local directory or a hub id); when set
            it judges instead of ``judge`` (an independent judge for pipelines that train their own).
        heldout_judge_uri: Optional URI of a held-out judge you give; when set it is used instead of
            ``heldout_judge``.
        champion_uri: URI of the current champion (the champion step's output); empty when there is none. The
            champion answers the same prompts; with a judge the candidate's win rate against it is reported.

    Returns:
        metrics: KL, implicit-reward accuracy and margin, perplexities, distinct-1/2, diversity ratio and
            lengths; with a judge also mean rewards per model, the candidate's win rates (ties count half) and
            length-controlled win rates against the reference and the champion, and the tie counts.
        report: Side-by-side generations and metrics (HTML).
        generations: The generations (JSONL rows: prompt, candidate, reference, and champion when there is
            one; with a judge also each model's reward, e.g. candidate_reward).
        frontier: The reward-vs-KL points (JSONL: label, step, kl, kl_per_token, reward or
            implicit_reward_accuracy, distinct_2, in_bounds, chosen, ...): the reference, each checkpoint and the
            final policy.
        selected: The chosen policy's model artifact (a copy of the final policy or of a snapshot).
    """
    from preftune.config.components import configs_from

    (config,) = configs_from("evaluate", locals())

    import dataclasses

    from preftune.eval.evaluation import evaluate as run_evaluate
    from preftune.launch import devices, failures, threads
    from preftune.launch.metrics import log_metrics
    from preftune.report.tracking import log_final, tracked

    devices.check_gpus()  # a pod given a GPU whose torch sees none fails here, not silently on the CPU
    threads.limit_threads()  # torch's thread pool sized by the pod's CPU limit, not the node's cores
    with failures.not_retried(metrics.uri):
        result = run_evaluate(
            candidate.path,
            reference.path,
            eval_prompts,
            eval_pairs.path,
            generations.path,
            report.path,
            config,
            judge=judge_uri or (judge.path if judge else None),
            heldout_judge=heldout_judge_uri or (heldout_judge.path if heldout_judge else None),
            champion=champion_uri or None,
            checkpoints=checkpoints.path if checkpoints else None,
            frontier_path=frontier.path,
            selected_path=selected.path,
        )
        # no per-step curves here: the tracking run holds the settings, the lineage and the final metrics
        lineage = {
            "input.candidate": candidate.uri,
            "input.reference": reference.uri,
            "input.prompts": eval_prompts,
        }
        lineage.update({"input.champion": champion_uri} if champion_uri else {})
        with tracked(
            config.report_to,
            stage="evaluate",
            params=dataclasses.asdict(config),
            lineage=lineage,
            log_dir=f"{selected.path}/tensorboard/evaluate",
        ):
            log_final(result)
    log_metrics(metrics, result)
