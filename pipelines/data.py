"""The data stages every pipeline shares: fingerprint, ingest SFT data, import preference pairs."""

from kfp import dsl

from preftune.components import fingerprint_op, ingest_op, preference_import_op
from preftune.pipelines.cluster import data_step


def _fingerprint(source: str, display_name: str) -> dsl.PipelineTask:
    task = fingerprint_op(source=source)
    task.set_display_name(display_name)
    task.set_caching_options(False)  # it exists to notice new data: never serve it from cache
    return data_step(task)


def ingest_data(sft_data: str, eval_fraction: float, seed: int) -> dsl.PipelineTask:
    """Ingest SFT data; cached until the data behind ``sft_data`` changes."""
    fp = _fingerprint(sft_data, "Fingerprint SFT data")
    task = ingest_op(source=sft_data, eval_fraction=eval_fraction, seed=seed, source_fingerprint=fp.output)
    return data_step(task.set_display_name("Ingest SFT data"))


def import_pairs(
    preference_data: str,
    eval_fraction: float,
    seed: int,
    preference_format: str,
    since: str,
    max_rejected_fraction: float,
) -> dsl.PipelineTask:
    """Import preference feedback as pairs; cached until the data behind ``preference_data`` changes."""
    fp = _fingerprint(preference_data, "Fingerprint preference data")
    task = preference_import_op(
        source=preference_data,
        format=preference_format,
        since=since,
        max_rejected_fraction=max_rejected_fraction,
        eval_fraction=eval_fraction,
        seed=seed,
        source_fingerprint=fp.output,
    )
    return data_step(task.set_display_name("Import preferences"))
