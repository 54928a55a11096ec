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
    judge: Input[Model] = None,
    checkpoints: Input[Model] = None,
    judge_uri: str = "",
    champion_uri: str = "",
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.9,
    beta: float = 0.1,
    max_prompts: int = 64,
    seed: int = 0,
    max_length: int = 256,
    precision: str = "auto",
    attn_implementation: str = "auto",
):
    """Generate with the candidate, the reference and the champion on held-out prompts and measure how they differ.

    Reports KL(candidate || reference) on candidate samples, implicit-reward accuracy and chosen-response
    perplexity on held-out pairs, distinct-1/2 diversity (and its ratio to the reference's) and response length.
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
        checkpoints: Optional intermediate policies of the training step (its checkpoints output): each becomes
            a point of the reward-vs-KL chart.
        judge_uri: Optional URI of a reward model to judge with (s3://, a local directory or a hub id); when set
            it judges instead of ``judge`` (an independent judge for pipelines that train their own).
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
            implicit_reward_accuracy, mean_length): the reference, each checkpoint and the final candidate.
    """
    from preftune.config.components import configs_from

    (config,) = configs_from("evaluate", locals())

    from preftune.eval.evaluation import evaluate as run_evaluate
    from preftune.launch import devices, failures, threads
    from preftune.launch.metrics import log_metrics

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
            champion=champion_uri or None,
            checkpoints=checkpoints.path if checkpoints else None,
            frontier_path=frontier.path,
        )
    log_metrics(metrics, result)
