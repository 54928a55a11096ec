"""Ingest SFT data: read, normalise, validate, split and write the train / eval / rejected artifacts and report.

Every input row ends in exactly one of train, eval or rejected (``rows_input == rows_train + rows_eval +
rows_rejected``); a rejected row carries every reason that applies. The split is by prompt group, decided by a
hash of (seed, prompt), so the same seed and data always give the same split and no prompt is in both splits.
The shared engine here (parameter checks, reason counts, the split, writing the artifacts) also serves
:mod:`preftune.data.preferences`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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


def check_split_parameters(eval_fraction: float, min_chars: int, max_chars: int) -> None:
    """The parameters every import has, checked before any data is read."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if min_chars < 0 or max_chars < max(min_chars, 1):
        raise ValueError(
            f"need 0 <= min_chars <= max_chars and max_chars >= 1, got {min_chars} and {max_chars}"
        )


# ---------------------------------------------------------------------------------------------- rejections


def place(file: str, row: int) -> str:
    """Where a row is, as messages name it: ``data.jsonl, line 3``."""
    return f"{file}, {readers.row_label(file)} {row}"


def failure_texts(reasons: Sequence[str], failures: Mapping[str, str], first: str) -> list[str]:
    """What each failed rule says of a row; a duplicate also names ``first``, where the kept copy is."""
    texts = [failures.get(r, r) for r in reasons]
    if "duplicate" in reasons:
        texts[reasons.index("duplicate")] += f" ({first})"
    return texts


def listed(counts: Counter[str], most: int | None = None, sep: str = ": ") -> str:
    """Reasons and their counts, most common first: ``duplicate: 3, empty:prompt: 1``."""
    return ", ".join(f"{k}{sep}{v}" for k, v in counts.most_common(most))


def add_reason_metrics(metrics: dict[str, float], known: Sequence[str], counts: Counter[str]) -> None:
    """A ``rejected_<reason>`` metric for every known reason (0 when none) and every other reason seen."""
    for reason in dict.fromkeys([*known, *sorted(set(counts) - set(known))]):
        metrics[metric_name(reason)] = counts.get(reason, 0)


def _rejection(file: str, row: int, reasons: list[str], detail: str | None, record: Any) -> dict[str, Any]:
    return {"file": file, "row": row, "reasons": reasons, "detail": detail, "record": record}


# ---------------------------------------------------------------------------------------------- split


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


@dataclass
class Split:
    """Accepted rows split by prompt group into train and held-out eval rows."""

    train: list[dict[str, Any]]
    held: list[dict[str, Any]]

    def metrics(self) -> dict[str, float]:
        """Rows and distinct prompts on each side."""
        return {
            "rows_train": len(self.train),
            "rows_eval": len(self.held),
            "prompts_train": len({prompt_key(r) for r in self.train}),
            "prompts_eval": len({prompt_key(r) for r in self.held}),
        }


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class Publication:
    """The rejected rows and the HTML report of an import: written whether the import succeeds or fails, so the
    user can always see why rows were rejected. ``metrics`` is the import's own dict, read when written."""

    title: str
    source: str
    rejected_path: str
    report_path: str
    metrics: dict[str, float]
    parameters: Mapping[str, Any]
    outcome: validation.ValidationOutcome
    rejected: list[dict[str, Any]]
    skipped_files: Sequence[str] = ()
    warnings: Sequence[str] = ()
    sections_after: Sequence[tuple[str, str]] = ()
    suite_note: str | None = None

    def write(self) -> None:
        records.write_jsonl(self.rejected_path, self.rejected)
        html = validation.render_report(
            self.title,
            source=self.source,
            metrics=self.metrics,
            parameters=self.parameters,
            outcome=self.outcome,
            rejected=self.rejected,
            skipped_files=self.skipped_files,
            warnings=self.warnings,
            sections_after=self.sections_after,
            suite_note=self.suite_note,
        )
        reports.write(self.report_path, html)


def split_or_publish(
    rows: list[dict[str, Any]], eval_fraction: float, seed: int, empty_message: str, publication: Publication
) -> Split:
    """Split accepted rows by prompt. When none remain (ValueError ``empty_message``) or no eval split can be
    held out, the rejected rows and the report are written before the error is raised."""
    try:
        if not rows:
            raise ValueError(empty_message)
        to_eval = split_groups(rows, eval_fraction, seed)
    except ValueError:
        publication.write()
        raise
    return Split(
        [r for r, e in zip(rows, to_eval, strict=True) if not e],
        [r for r, e in zip(rows, to_eval, strict=True) if e],
    )


def write_outputs(split: Split, train_path: str, eval_path: str, publication: Publication) -> None:
    """Train and eval rows, then the rejected rows and the report."""
    records.write_jsonl(train_path, split.train)
    records.write_jsonl(eval_path, split.held)
    publication.write()


# ---------------------------------------------------------------------------------------------- SFT import


@dataclass
class _Read:
    """Rows read so far: normalised rows with the record each came from, and rejected-row records."""

    rows_input: int = 0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    originals: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def metrics(
        self, files: Sequence[tuple[str, str]], skipped: Sequence[str], known_reasons: Sequence[str]
    ) -> dict[str, float]:
        """Row and file counts, and ``rejected_<reason>`` for every reason (the split's counts come later)."""
        metrics: dict[str, float] = {
            "rows_input": self.rows_input,
            "rows_train": 0,
            "rows_eval": 0,
            "rows_rejected": len(self.rejected),
            "files_read": len(files),
            "files_skipped": len(skipped),
        }
        add_reason_metrics(metrics, known_reasons, validation.reason_counts(self.rejected))
        return metrics


def _read_and_normalize(
    files: Sequence[tuple[str, str]], normalize: Callable[[readers.RawRow], dict[str, Any]]
) -> _Read:
    """Every row of every file, normalised or rejected (unreadable, or a ``missing:``/``invalid:`` field)."""
    read = _Read()
    for file_uri, name in files:
        for raw in readers.read_file(file_uri, name, on_error="reject"):
            read.rows_input += 1
            if raw.error:
                read.rejected.append(_rejection(raw.file, raw.row, [raw.error], raw.detail, {"raw": raw.raw}))
                continue
            try:
                read.accepted.append(normalize(raw))
                read.originals.append(raw.record or {})
            except records.RowError as exc:
                read.rejected.append(_rejection(raw.file, raw.row, exc.reasons, exc.message, raw.record))
    return read


def _keep_valid(read: _Read, outcome: validation.ValidationOutcome) -> list[dict[str, Any]]:
    """The rows the suite accepted; the others join ``read.rejected`` with what each failed rule says."""
    kept: list[dict[str, Any]] = []
    failures = outcome.failures()
    first_seen: dict[str, dict[str, Any]] = {}
    for row, original, reasons in zip(read.accepted, read.originals, outcome.reasons, strict=True):
        first = first_seen.setdefault(row["id"], row["source"])
        if not reasons:
            kept.append(row)
            continue
        detail = "; ".join(failure_texts(reasons, failures, place(first["file"], first["row"])))
        read.rejected.append(
            _rejection(row["source"]["file"], row["source"]["row"], reasons, detail, original)
        )
    return kept


def sort_rejected(rejected: list[dict[str, Any]], files: Sequence[tuple[str, str]]) -> None:
    """Rejected rows in input order: by file as listed, then row (then Label Studio annotation)."""
    order = {name: i for i, (_, name) in enumerate(files)}
    rejected.sort(key=lambda r: (order.get(r["file"], 0), r["row"], r.get("annotation") or 0))


def _log_import(kind: str, publication: Publication, split: Split) -> None:
    top = listed(validation.reason_counts(publication.rejected), 4, " ")
    log.info(
        "%s %s: %d rows in -> %d train, %d eval, %d rejected%s",
        kind,
        publication.source,
        publication.metrics["rows_input"],
        len(split.train),
        len(split.held),
        len(publication.rejected),
        f" ({top})" if top else "",
    )


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
    """The import pipeline behind :func:`ingest`: read and normalise, validate, split, write, account.

    The rejected rows and the report are written even when nothing usable remains (then ValueError), so the user
    can see why every row was rejected.
    """
    check_split_parameters(eval_fraction, min_chars, max_chars)
    files, skipped = readers.data_files(source)
    read = _read_and_normalize(files, normalize)
    outcome = validate(read.accepted, min_chars=min_chars, max_chars=max_chars)
    kept = _keep_valid(read, outcome)
    sort_rejected(read.rejected, files)
    metrics = read.metrics(files, skipped, known_reasons)
    publication = Publication(
        title=f"preftune {kind} validation",
        source=source,
        rejected_path=rejected_path,
        report_path=report_path,
        metrics=metrics,
        parameters={
            "eval_fraction": eval_fraction,
            "seed": seed,
            "min_chars": min_chars,
            "max_chars": max_chars,
        },
        outcome=outcome,
        rejected=read.rejected,
        skipped_files=skipped,
    )
    empty_message = (
        f"no usable rows in {source}: all {read.rows_input} input rows were rejected "
        f"({listed(validation.reason_counts(read.rejected))}); see {rejected_path}"
    )
    split = split_or_publish(kept, eval_fraction, seed, empty_message, publication)
    metrics.update(split.metrics())
    assert metrics["rows_input"] == len(split.train) + len(split.held) + len(read.rejected), (
        "row accounting does not balance"
    )
    write_outputs(split, train_path, eval_path, publication)
    _log_import(kind, publication, split)
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
