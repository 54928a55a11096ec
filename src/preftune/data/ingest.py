"""Ingest SFT data: read, normalise, validate, split and write the train / eval / rejected artifacts and report.

Every input row ends in exactly one of train, eval or rejected (``rows_input == rows_train + rows_eval +
rows_rejected``); a rejected row carries every reason that applies. The split is by prompt group, decided by a
hash of (seed, prompt), so the same seed and data always give the same split and no prompt is in both splits.
Rows stream through :mod:`importing`: memory holds a chunk of rows' numbers, whatever the input's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from preftune.data import buckets, checkpoints, records, sources, spill, suites
from preftune.data.importing import (
    READ_REASONS,
    Items,
    Publication,
    Rejections,
    Units,
    add_reason_metrics,
    check_split_parameters,
    emit,
    listed,
    metric_name,
    rank_key,
    verdict,
)
from preftune.data.readers import DataFormatError

log = logging.getLogger(__name__)

#: Every reason an SFT row can be rejected for (with the default suite).
SFT_REASONS = (
    *READ_REASONS,
    "missing:prompt",
    "missing:completion",
    "invalid:prompt",
    "invalid:completion",
    "invalid:messages",
    *suites.reasons_of(suites.default_document("ingest"), "examples"),
)


def _read(listing: sources.Listing, units: Units, rejections: Rejections, items: Items, seed: int) -> None:
    """Every row of every file: an example, or rejected (unreadable, or a ``missing:``/``invalid:`` field)."""
    prompts, completions = items.columns["prompt_chars"], items.columns["completion_chars"]
    for file_index, source_file in enumerate(listing.files):
        units.formats[file_index] = "sft"
        for raw in source_file.rows("reject"):
            unit = units.add(file_index, raw.row)
            if raw.error:
                rejections.add(unit, [raw.error], raw.detail or "", {"raw": raw.raw})
                continue
            try:
                row = records.normalize_sft(raw)
            except records.RowError as exc:
                rejections.add(unit, exc.reasons, exc.message, raw.record)
                continue
            items.new_block()
            prompt_key = records.canonical_json(row["prompt"])
            items.add(records.dumps(row), str(unit), int(row["id"], 16), rank_key(seed, prompt_key), unit)
            prompts.append(records.text_length(row["prompt"]))
            completions.append(records.text_length(row["completion"]))


def ingest(
    source: str,
    train_path: str,
    eval_path: str,
    rejected_path: str,
    report_path: str,
    *,
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
    expectation_suite_uri: str = "",
    suite_path: str = "",
    exclude: Sequence[str] = (),
) -> dict[str, float]:
    """Turn raw SFT data (jsonl / json / csv / tsv / parquet file, directory, s3 prefix, ``save_to_disk``
    directory or ``hf://`` dataset) into train and eval datasets of ``{"id", "prompt", "completion", "meta",
    "source"}`` rows, a rejected-rows file, an HTML report and (``suite_path``) the expectation suites it ran.

    Rows are ``{"prompt", "completion"}`` or ``{"messages": [...]}``. Returns flat metrics (``rows_input``,
    ``rows_train``, ``rows_eval``, ``rows_rejected``, ``rejected_<reason>`` for every reason, ...).
    Raises DataFormatError for whole-file problems and ValueError when nothing usable remains or the eval
    split would be empty while ``eval_fraction > 0`` (after writing the rejected rows and the report).
    """
    check_split_parameters(eval_fraction, min_chars, max_chars)
    document = suites.load_document(expectation_suite_uri, "ingest")
    outputs = [train_path, eval_path, rejected_path, report_path, suite_path]
    listing = sources.list_source(source, exclude=[*outputs, *exclude])
    parameters = {
        "eval_fraction": eval_fraction,
        "seed": seed,
        "min_chars": min_chars,
        "max_chars": max_chars,
    }
    publication = Publication(
        "preftune ingest validation",
        source,
        (train_path, eval_path, rejected_path, report_path, suite_path),
        parameters,
        document,
        listing.skipped,
    )
    with spill.workspace() as work:
        units, rejections = Units(listing.files, work), Rejections(work)
        items = Items(work, "examples", prompt_chars="i", completion_chars="i")
        _read(listing, units, rejections, items, seed)
        return _finish(items, units, rejections, publication, listing, eval_fraction)


def _finish(
    items: Items,
    units: Units,
    rejections: Rejections,
    publication: Publication,
    listing: sources.Listing,
    eval_fraction: float,
) -> dict[str, float]:
    """Validate, split, write; the rejected rows and report are written even when the import then fails."""
    repeats = buckets.Repeats(items.columns, items.spill.directory)

    def chunks() -> Iterator[tuple[int, dict[str, Any]]]:
        for start, part in items.columns.chunks("prompt_chars", "completion_chars"):
            part["is_duplicate"] = repeats.masks(start, len(part["prompt_chars"]))[0]
            yield start, part

    validator = checkpoints.Validator(publication.document, publication.parameters)
    result = validator.run_chunks("examples", len(items), chunks, items.spill.directory)
    failure: ValueError | None = None
    accepted = result.accepted
    try:
        decided = verdict(items, result, repeats, eval_fraction)
    except ValueError as exc:
        failure, decided = exc, verdict(items, result, repeats, 0.0)
    published = failure is None and accepted > 0
    emit(items, decided, units, rejections, publication.train_path, publication.eval_path, published)
    train, held = decided.counts()
    metrics: dict[str, float] = {
        "rows_input": len(units),
        "rows_train": train if failure is None else 0,
        "rows_eval": held if failure is None else 0,
        "rows_rejected": len(rejections),
        "files_read": len(listing.files),
        "files_skipped": len(listing.skipped),
    }
    add_reason_metrics(metrics, SFT_REASONS, rejections.counts)
    if published:
        metrics.update(prompts_train=decided.prompts_train, prompts_eval=decided.prompts_eval)
    publication.write(units, rejections, metrics, [("examples", result)], validator.import_seconds)
    if not accepted:
        raise ValueError(
            f"no usable rows in {publication.source}: all {len(units)} input rows were rejected "
            f"({listed(rejections.counts)}); see {publication.rejected_path}"
        )
    if failure is not None:
        raise failure
    assert metrics["rows_input"] == train + held + len(rejections), "row accounting does not balance"
    log.info(
        "ingest %s: %d rows in -> %d train, %d eval, %d rejected%s",
        publication.source,
        len(units),
        train,
        held,
        len(rejections),
        f" ({listed(rejections.counts, 4, ' ')})" if rejections.counts else "",
    )
    return metrics


__all__ = ["READ_REASONS", "SFT_REASONS", "DataFormatError", "ingest", "metric_name"]
