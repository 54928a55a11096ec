"""KFP component: compare a candidate policy with its reference on held-out data."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

from preftune.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def evaluate(
    candidate: Input[Model],
    reference: Input[Model],
    eval_prompts: str,
    eval_pairs: Input[Dataset],
    metrics: Output[Metrics],
    report: Output[HTML],
    generations: Output[Dataset],
    judge: Input[Model] = None,
    max_new_tokens: int = 48,
    temperature: float = 0.7,
    top_p: float = 0.9,
    beta: float = 0.1,
    max_prompts: int = 64,
    seed: int = 0,
):
    """Generate with the candidate and the reference on held-out prompts and measure how they differ.

    Reports KL(candidate || reference) on candidate samples, implicit-reward accuracy and chosen-response
    perplexity on held-out pairs, distinct-1/2 diversity and response length of both models. Given a judge (a
    reward model), it also scores both models' responses and reports the candidate's win rate.

    Args:
        candidate: The trained policy.
        reference: The reference policy (the SFT model).
        eval_prompts: URI of held-out prompts (JSONL rows with a ``prompt``: text or chat messages).
        eval_pairs: Held-out preference pairs from the preference import step.
        metrics: KL, implicit-reward accuracy and margin, perplexities, distinct-1/2 and lengths; with a judge
            also its mean rewards for both models, the candidate's win rate (ties count half) and the tie count.
        report: Side-by-side generations and metrics (HTML).
        generations: The generations (JSONL rows: prompt, candidate, reference; with a judge also
            candidate_reward and reference_reward).
        judge: Optional reward model (for example the reward_model step's output) that scores the responses of
            both models to each prompt; leave unset to skip.
        max_new_tokens: Longest generated response, in tokens.
        temperature: Sampling temperature of the displayed generations.
        top_p: Nucleus sampling threshold of the displayed generations.
        beta: The DPO beta used for implicit rewards.
        max_prompts: Evaluate at most this many prompts.
        seed: Sampling seed, the same for both models.
    """
    from preftune.evaluation import EvalConfig
    from preftune.evaluation import evaluate as run_evaluate

    config = EvalConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        beta=beta,
        max_prompts=max_prompts,
        seed=seed,
    )
    result = run_evaluate(
        candidate.path,
        reference.path,
        eval_prompts,
        eval_pairs.path,
        generations.path,
        report.path,
        config,
        judge=judge.path if judge else None,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
