"""KFP component: import collected human feedback as validated preference pairs."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Metrics, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set PreferenceImportConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("preference_import")
def preference_import(
    source: str,
    train_pairs: Output[Dataset],
    eval_pairs: Output[Dataset],
    rejected_rows: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
    format: str = "auto",
    ranked_pairs: str = "all",
    min_score_gap: float = 0.5,
    max_pairs_per_prompt: int = 16,
    since: str = "",
    max_rejected_fraction: float = 0.5,
    truncation_chars: int = 4096,
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
    source_fingerprint: str = "",
):
    """Turn collected human feedback into chosen/rejected training pairs, accounting for every row.

    Takes pairwise preferences, ranked lists, scalar ratings, thumbs up/down and Label Studio pairwise exports
    (see docs/preference_formats.md). Pairs are split by prompt, so no held-out prompt is ever trained on. Every
    input row is used in at least one pair or lands in ``rejected_rows`` with its reasons (empty texts, chosen
    equal to rejected, duplicates, contradictions, unpaired, ...). The step fails, after writing its outputs,
    when more than ``max_rejected_fraction`` of the rows were rejected.

    Args:
        source: URI of the feedback: a jsonl, json, parquet or csv file, a directory, or an s3:// file or prefix.
        source_fingerprint: Identity of the data behind ``source`` (set by the pipeline from the fingerprint
            step); it only changes the cache key, so the step reruns when the data changes.

    Returns:
        train_pairs: Training pairs (JSONL: prompt messages, chosen, rejected, margin, meta; scores for ratings).
        eval_pairs: Held-out pairs (JSONL), split by prompt.
        rejected_rows: Rows that gave no accepted pair, each with its file, row number, reasons and detail (JSONL).
        report: Validation report (HTML): great-expectations results, rejections by reason, warnings.
        metrics: Rows in / used / rejected, pairs train / eval, and rejections by reason.
    """
    from preftune.config.components import configs_from

    (config,) = configs_from("preference_import", locals())

    import dataclasses

    from preftune.data.preferences import RejectedFractionError, import_preferences

    try:
        result = import_preferences(
            source,
            train_pairs.path,
            eval_pairs.path,
            rejected_rows.path,
            report.path,
            **dataclasses.asdict(config),
        )
    except RejectedFractionError as err:
        for name, value in err.metrics.items():
            metrics.log_metric(name, value)
        raise
    for name, value in result.items():
        metrics.log_metric(name, value)
