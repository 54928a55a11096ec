"""Ingest SFT data: read, normalise, validate, split and write the train / eval / rejected artifacts and report.

Every input row ends in exactly one of train, eval or rejected (``rows_input == rows_train + rows_eval +
rows_rejected``); a rejected row carries every reason that applies. The split is by prompt group, decided by a
hash of (seed, prompt), so the same seed and data always give the same split and no prompt is in both splits.
The shared engine here also serves :mod:`preftune.data.preferences`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from preftune.data import readers, records, validation
from preftune.data.readers import DataFormatError
from preftune.report import html as reports

log = logging.getLogger(__name__)

#: Rejections found while reading a file (the row could not be parsed at all).
READ_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "malformed_row")
#: Every reason an SFT row can be rejected for.
SFT_REASONS = (
    *READ_REASONS,
    "missing:prompt",
    "missing:completion",
    "invalid:prompt",
    "invalid:completion",
    "invalid:messages",
    *validation.content_reasons(("prompt", "completion")),
)


def metric_name(reason: str) -> str:
    """The metric counting a reason: ``rejected_`` + the reason with ``:`` as ``_`` (``rejected_empty_prompt``)."""
    return "rejected_" + reason.replace(":", "_")


def _check_parameters(eval_fraction: float, min_chars: int, max_chars: int) -> None:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if min_chars < 0 or max_chars < max(min_chars, 1):
        raise ValueError(
            f"need 0 <= min_chars <= max_chars and max_chars >= 1, got {min_chars} and {max_chars}"
        )


def prompt_key(row: Mapping[str, Any]) -> str:
    """The prompt group of a normalised row: its prompt's canonical JSON."""
    return records.canonical_json(row["prompt"])


def _group_rank(seed: int, group: str) -> str:
    """Where a prompt group falls in the seed's order: a hash, so it depends only on seed and prompt."""
    return hashlib.sha256(f"{seed}\0{group}".encode()).hexdigest()


def split_groups(rows: Sequence[Mapping[str, Any]], eval_fraction: float, seed: int) -> list[bool]:
    """For each row, whether it goes to eval: ``round(eval_fraction * groups)`` prompt groups (at least one, and
    leaving at least one for train, when ``eval_fraction > 0``), the groups first in the seed's hash order."""
    groups = [prompt_key(r) for r in rows]
    distinct = sorted(set(groups), key=lambda g: _group_rank(seed, g))
    if eval_fraction <= 0:
        return [False] * len(rows)
    if len(distinct) < 2:
        raise ValueError(
            f"cannot hold out an eval split: only {len(distinct)} distinct prompt(s) remain after validation "
            f"(eval_fraction={eval_fraction}); add data or set eval_fraction=0"
        )
    n_eval = min(max(1, round(eval_fraction * len(distinct))), len(distinct) - 1)
    held_out = set(distinct[:n_eval])
    return [g in held_out for g in groups]


def run_import(
    kind: str,
    source: str,
    train_path: str,
    eval_path: str,
    rejected_path: str,
    report_path: str,
    *,
    normalize: Callable[[readers.RawRow], dict[str, Any]],
    validate: Callable[..., validation.ValidationOutcome],
    known_reasons: Sequence[str],
    eval_fraction: float,
    seed: int,
    min_chars: int,
    max_chars: int,
) -> dict[str, float]:
    """The shared import pipeline behind :func:`ingest` and ``import_preferences``.

    The rejected rows and the report are written even when nothing usable remains (then ValueError), so the user
    can see why every row was rejected.
    """
    _check_parameters(eval_fraction, min_chars, max_chars)
    files, skipped = readers.data_files(source)
    rejected: list[dict[str, Any]] = []
    accepted: list[dict[str, Any]] = []
    originals: list[dict[str, Any]] = []
    order: dict[str, int] = {name: i for i, (_, name) in enumerate(files)}
    rows_input = 0
    for file_uri, name in files:
        for raw in readers.read_file(file_uri, name, on_error="reject"):
            rows_input += 1
            if raw.error:
                rejected.append(
                    {
                        "file": raw.file,
                        "row": raw.row,
                        "reasons": [raw.error],
                        "detail": raw.detail,
                        "record": {"raw": raw.raw},
                    }
                )
                continue
            try:
                accepted.append(normalize(raw))
                originals.append(raw.record or {})
            except records.RowError as exc:
                rejected.append(
                    {
                        "file": raw.file,
                        "row": raw.row,
                        "reasons": exc.reasons,
                        "detail": exc.message,
                        "record": raw.record,
                    }
                )
    outcome = validate(accepted, min_chars=min_chars, max_chars=max_chars)
    kept: list[dict[str, Any]] = []
    failures = {e.reason: e.failure for e in outcome.expectations}
    first_seen: dict[str, dict[str, Any]] = {}
    for row, original, reasons in zip(accepted, originals, outcome.reasons, strict=True):
        first = first_seen.setdefault(row["id"], row["source"])
        if reasons:
            texts = [failures.get(r, r) for r in reasons]
            if "duplicate" in reasons:
                texts[reasons.index("duplicate")] += (
                    f" ({first['file']}, {readers.row_label(first['file'])} {first['row']})"
                )
            detail = "; ".join(texts)
            rejected.append(
                {
                    "file": row["source"]["file"],
                    "row": row["source"]["row"],
                    "reasons": reasons,
                    "detail": detail,
                    "record": original,
                }
            )
        else:
            kept.append(row)
    rejected.sort(key=lambda r: (order.get(r["file"], 0), r["row"]))

    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_train": 0,
        "rows_eval": 0,
        "rows_rejected": len(rejected),
        "files_read": len(files),
        "files_skipped": len(skipped),
    }
    counts = Counter(reason for r in rejected for reason in r["reasons"])
    for reason in [*known_reasons, *sorted(set(counts) - set(known_reasons))]:
        metrics[metric_name(reason)] = counts.get(reason, 0)
    parameters = {
        "eval_fraction": eval_fraction,
        "seed": seed,
        "min_chars": min_chars,
        "max_chars": max_chars,
    }

    def publish() -> None:
        records.write_jsonl(rejected_path, rejected)
        html = validation.render_report(
            f"preftune {kind} validation",
            source=source,
            metrics=metrics,
            parameters=parameters,
            outcome=outcome,
            rejected=rejected,
            skipped_files=skipped,
        )
        reports.write(report_path, html)

    try:
        if not kept:
            raise ValueError(
                f"no usable rows in {source}: all {rows_input} input rows were rejected "
                f"({', '.join(f'{k}: {v}' for k, v in counts.most_common())}); see {rejected_path}"
            )
        to_eval = split_groups(kept, eval_fraction, seed)
    except ValueError:
        publish()
        raise
    train = [r for r, e in zip(kept, to_eval, strict=True) if not e]
    held = [r for r, e in zip(kept, to_eval, strict=True) if e]
    metrics["rows_train"] = len(train)
    metrics["rows_eval"] = len(held)
    metrics["prompts_train"] = len({prompt_key(r) for r in train})
    metrics["prompts_eval"] = len({prompt_key(r) for r in held})
    assert metrics["rows_input"] == len(train) + len(held) + len(rejected), "row accounting does not balance"
    records.write_jsonl(train_path, train)
    records.write_jsonl(eval_path, held)
    publish()
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(4))
    log.info(
        "%s %s: %d rows in -> %d train, %d eval, %d rejected%s",
        kind,
        source,
        rows_input,
        len(train),
        len(held),
        len(rejected),
        f" ({top})" if top else "",
    )
    return metrics


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
) -> dict[str, float]:
    """Turn raw SFT data (jsonl / json / csv / tsv / parquet file, directory or s3 prefix) into train and eval
    datasets of ``{"id", "prompt", "completion", "meta", "source"}`` rows, a rejected-rows file and an HTML report.

    Rows are ``{"prompt", "completion"}`` or ``{"messages": [...]}``. Returns flat metrics (``rows_input``,
    ``rows_train``, ``rows_eval``, ``rows_rejected``, ``rejected_<reason>`` for every reason, ...).
    Raises DataFormatError for whole-file problems and ValueError when nothing usable remains or the eval
    split would be empty while ``eval_fraction > 0``.
    """
    return run_import(
        "ingest",
        source,
        train_path,
        eval_path,
        rejected_path,
        report_path,
        normalize=records.normalize_sft,
        validate=validation.validate_sft,
        known_reasons=SFT_REASONS,
        eval_fraction=eval_fraction,
        seed=seed,
        min_chars=min_chars,
        max_chars=max_chars,
    )


__all__ = [
    "DataFormatError",
    "READ_REASONS",
    "SFT_REASONS",
    "ingest",
    "metric_name",
    "run_import",
    "split_groups",
]
