"""KFP component: import collected human feedback as validated preference pairs."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Output

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
    expectation_suite: Output[Artifact],
    train_unpaired: Output[Dataset],
    eval_unpaired: Output[Dataset],
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
    expectation_suite_uri: str = "",
    source_fingerprint: str = "",
):
    """Turn collected human feedback into chosen/rejected training pairs, accounting for every row.

    Takes pairwise preferences, ranked lists, scalar ratings, thumbs up/down and Label Studio pairwise exports
    (see docs/preference_formats.md). Pairs are split by prompt, so no held-out prompt is ever trained on. Every
    input row is used in at least one pair or lands in ``rejected_rows`` with its reasons (empty texts, chosen
    equal to rejected, duplicates, contradictions, unpaired, ...). The step fails, after writing its outputs,
    when more than ``max_rejected_fraction`` of the rows were rejected; thumbs and ratings that made no pair
    are valid judgements the unpaired outputs keep (KTO trains on them), and do not count. Rows are streamed, so
    memory does not grow with the input; the content rules run as great-expectations suites through
    Checkpoints.

    Args:
        source: URI of the feedback: a jsonl, json, csv or parquet file, a directory or s3:// prefix of them
            (date=YYYY-MM-DD partitions select with since), a datasets save_to_disk directory, or
            hf://<dataset id> for a Hugging Face dataset.
        source_fingerprint: Identity of the data behind ``source`` (set by the pipeline from the fingerprint
            step); it only changes the cache key, so the step reruns when the data changes.

    Returns:
        train_pairs: Training pairs (JSONL: prompt messages, chosen, rejected, margin, meta; scores for ratings).
        eval_pairs: Held-out pairs (JSONL), split by prompt.
        rejected_rows: Rows that gave no accepted pair, each with its file, row number, reasons and detail (JSONL).
        report: Validation report (HTML): great-expectations results, rejections by reason, warnings.
        metrics: Rows in / used / rejected, pairs train / eval, and rejections by reason.
        expectation_suite: The expectation suites that ran (JSON); edit and pass back as expectation_suite_uri.
        train_unpaired: The accepted thumbs and ratings as single answers (JSONL: prompt, completion, label true =
            desirable: a thumbs up, or a rating above its rater's mean), for KTO; empty for pairwise feedback.
        eval_unpaired: Held-out unpaired answers, split by prompt like the pairs.
    """
    from preftune.config.components import configs_from

    (config,) = configs_from("preference_import", locals())

    import dataclasses

    from preftune.data.preferences import RejectedFractionError, import_preferences
    from preftune.launch.metrics import log_metrics

    try:
        result = import_preferences(
            source,
            train_pairs.path,
            eval_pairs.path,
            rejected_rows.path,
            report.path,
            suite_path=expectation_suite.path,
            unpaired_train_path=train_unpaired.path,
            unpaired_eval_path=eval_unpaired.path,
            **dataclasses.asdict(config),
        )
    except RejectedFractionError as err:
        log_metrics(metrics, err.metrics)
        raise
    log_metrics(metrics, result)
