"""KFP component: read, validate and split supervised fine-tuning data."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The parameters that set IngestConfig fields are documented from those fields' metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("ingest")
def ingest(
    source: str,
    train_data: Output[Dataset],
    eval_data: Output[Dataset],
    rejected_rows: Output[Dataset],
    report: Output[HTML],
    metrics: Output[Metrics],
    expectation_suite: Output[Artifact],
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
    expectation_suite_uri: str = "",
    source_fingerprint: str = "",
):
    """Read SFT data, validate every row, and split it into train and eval sets.

    Rows are prompt/completion pairs or chat ``messages``. Every input row ends up in exactly one of train,
    eval or rejected (with its reasons), and the counts are logged as metrics. Rows are streamed, so memory does
    not grow with the input; the content rules run as great-expectations suites through Checkpoints.

    Args:
        source: URI of the SFT data: a jsonl, json, csv or parquet file, a directory or s3:// prefix of them, a
            datasets save_to_disk directory, or hf://<dataset id> for a Hugging Face dataset.
        source_fingerprint: Identity of the data behind ``source`` (set by the pipeline from the fingerprint
            step); it only changes the cache key, so the step reruns when the data changes.

    Returns:
        train_data: Training examples (JSONL, one normalised example per line).
        eval_data: Held-out examples (JSONL).
        rejected_rows: Rows that failed validation, each with its file, row number and reasons (JSONL).
        report: Validation report (HTML) with every expectation and samples of rejected rows.
        metrics: Row counts: input, train, eval, rejected, and rejections by reason.
        expectation_suite: The expectation suites that ran (JSON); edit and pass back as expectation_suite_uri.
    """
    from preftune.config.components import configs_from

    (config,) = configs_from("ingest", locals())

    import dataclasses

    from preftune.data.ingest import ingest as run_ingest

    result = run_ingest(
        source,
        train_data.path,
        eval_data.path,
        rejected_rows.path,
        report.path,
        suite_path=expectation_suite.path,
        **dataclasses.asdict(config),
    )
    from preftune.launch.metrics import log_metrics

    log_metrics(metrics, result)
