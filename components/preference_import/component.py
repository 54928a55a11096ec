"""KFP component: import collected human feedback as validated preference pairs."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from preftune.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def preference_import(
    source: str,
    train_pairs: Output[Dataset],
    eval_pairs: Output[Dataset],
    rejected_rows: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
):
    """Turn collected preference feedback into chosen/rejected training pairs, accounting for every row.

    Pairs are split by prompt, so no held-out prompt is ever trained on. Rows that fail validation (empty
    texts, chosen equal to rejected, duplicates, length bounds) go to ``rejected_rows`` with their reasons.

    Args:
        source: URI of the feedback: a jsonl, parquet or csv file, a directory, or an s3:// file or prefix.
        train_pairs: Training pairs (JSONL: prompt messages, chosen, rejected, margin, meta).
        eval_pairs: Held-out pairs (JSONL), split by prompt.
        rejected_rows: Rows that failed validation, each with its file, row number and reasons (JSONL).
        report: Validation report (HTML).
        metrics: Row counts: input, train, eval, rejected, and rejections by reason.
        eval_fraction: Share of prompts held out for evaluation (0 to 0.5).
        seed: Seed of the train/eval split.
        min_chars: Shortest accepted prompt or response, in characters.
        max_chars: Longest accepted prompt or response, in characters.
    """
    from preftune.data.preferences import import_preferences

    result = import_preferences(
        source,
        train_pairs.path,
        eval_pairs.path,
        rejected_rows.path,
        report.path,
        eval_fraction=eval_fraction,
        seed=seed,
        min_chars=min_chars,
        max_chars=max_chars,
    )
    for name, value in result.items():
        metrics.log_metric(name, value)
