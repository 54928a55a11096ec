"""KFP component: the empty, marked outputs of a method the compare pipeline was told not to train."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def skip_method(
    method: str,
    metrics: Output[Metrics],
    evaluation: Output[Metrics],
    generations: Output[Dataset],
    frontier: Output[Dataset],
) -> str:
    """Stand in for a method that is switched off, so the compare step's inputs exist whichever methods ran.

    KFP passes a step's outputs out of a dsl.If branch only through dsl.OneOf, which needs a dsl.Else branch
    with outputs of the same types: this is that branch. Every output is empty and its metadata says
    ``skipped`` and which method, so the compare step leaves the method out.

    Args:
        method: The method that was not trained (dpo, rlhf, grpo, rloo, kto or online_dpo).

    Returns:
        metrics: Stands in for the training step's metrics; metadata ``skipped`` = 1 and ``method``.
        evaluation: Stands in for the evaluate step's metrics; marked the same way.
        generations: Stands in for the evaluation's generations: an empty JSONL file, marked.
        frontier: Stands in for the evaluation's reward-vs-KL points: an empty JSONL file, marked.
        Output: A line saying which method was skipped.
    """
    from preftune.eval.comparison import mark_skipped

    for artifact in (metrics, evaluation, generations, frontier):
        mark_skipped(artifact, method)
    print(f"{method}: not compared in this run")
    return f"{method} skipped"
