"""Import collected human feedback -- pairwise, ranked, rated, thumbs, Label Studio -- as validated preference pairs.

The steps, each accounting for every input row (docs/preference_formats.md has the user's view):

1. list the files (``since`` keeps date partitions on or after a day), read them, and recognise each file's format;
2. normalise rows (problems -> ``missing:<field>`` / ``invalid:<field>``) and run the row suite on rows that are
   not pairs yet (ranked lists, ratings, thumbs);
3. make candidate pairs (:mod:`pairing`, :mod:`labelstudio`) and run the pair suite on all of them;
4. a row is *used* when at least one accepted pair came from it; every other row is rejected with the reasons of
   its failed pairs, or ``unpaired``. So ``rows_input == rows_used + rows_rejected``, while pairs are counted apart
   (``pairs_train``, ``pairs_eval``): a rating row may feed several pairs and still counts once;
5. split accepted pairs by prompt, write train / eval / rejected and the HTML report, and fail (after writing)
   when more than ``max_rejected_fraction`` of the rows were rejected.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from preftune.data import formats, labelstudio, pairing, readers, records, validation
from preftune.data.formats import Observation, RankedList
from preftune.data.ingest import (
    READ_REASONS,
    Publication,
    Split,
    add_reason_metrics,
    check_split_parameters,
    failure_texts,
    listed,
    place,
    sort_rejected,
    split_or_publish,
    write_outputs,
)
from preftune.data.readers import DataFormatError
from preftune.report import html as reports

log = logging.getLogger(__name__)


def _schema(*fields: str) -> tuple[str, ...]:
    return tuple(f"{kind}:{f}" for f in fields for kind in ("missing", "invalid"))


#: The reasons a row can be rejected for, by feedback format.
REASONS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pairwise": (
        *READ_REASONS,
        "missing:prompt",
        "missing:chosen",
        "missing:rejected",
        "invalid:prompt",
        "invalid:chosen",
        "invalid:rejected",
        "invalid:margin",
        *validation.PAIR_REASONS,
    ),
    "ranked": (
        *READ_REASONS,
        *_schema("prompt", "responses", "ranks"),
        *validation.row_reasons("ranked"),
        *validation.PAIR_REASONS,
        "unpaired",
    ),
    "rating": (
        *READ_REASONS,
        *_schema("prompt", "response", "score"),
        *validation.row_reasons("rating"),
        *validation.PAIR_REASONS,
        "unpaired",
    ),
    "binary": (
        *READ_REASONS,
        *_schema("prompt", "response", "label"),
        *validation.row_reasons("binary"),
        *validation.PAIR_REASONS,
        "unpaired",
    ),
    "labelstudio": (
        *READ_REASONS,
        "invalid:data",
        "invalid:annotations",
        "unannotated",
        "skipped",
        "no_choice",
        "invalid:selected",
        "missing:prompt",
        "missing:chosen",
        "missing:rejected",
        "invalid:prompt",
        "invalid:chosen",
        "invalid:rejected",
        *validation.PAIR_REASONS,
    ),
}
#: Every reason a preference row can be rejected for, in any format.
PREFERENCE_REASONS = tuple(dict.fromkeys(r for reasons in REASONS_BY_FORMAT.values() for r in reasons))

DEFAULT_MIN_SCORE_GAP = 0.5
DEFAULT_MAX_PAIRS_PER_PROMPT = 16
DEFAULT_MAX_REJECTED_FRACTION = 0.5
DEFAULT_TRUNCATION_CHARS = 4096


class RejectedFractionError(ValueError):
    """More rows were rejected than ``max_rejected_fraction`` allows (the outputs and report are written);
    ``metrics`` holds the import's metrics all the same."""

    def __init__(self, message: str, metrics: dict[str, float]) -> None:
        super().__init__(message)
        self.metrics = metrics


@dataclass
class _Unit:
    """One accounted input row (a Label Studio annotation is a row of its own)."""

    file: str
    row: int
    record: Any
    annotation: int | None = None
    reasons: list[str] = field(default_factory=list)
    detail: str = ""

    def reject(self, reasons: Sequence[str], detail: str) -> None:
        """Add reasons (each once) and their detail; a row may be rejected at several stages."""
        self.reasons = list(dict.fromkeys([*self.reasons, *reasons]))
        self.detail = "; ".join(d for d in (self.detail, detail) if d)

    def rejected_row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "row": self.row}
        if self.annotation is not None:
            out["annotation"] = self.annotation
        out.update({"reasons": self.reasons, "detail": self.detail, "record": self.record})
        return out

    def where(self) -> str:
        note = f", annotation {self.annotation}" if self.annotation is not None else ""
        return f"{place(self.file, self.row)}{note}"


@dataclass
class _Settings:
    """The import's parameters, as :func:`import_preferences` takes them (its defaults are the defaults)."""

    format: str
    ranked_pairs: str
    min_score_gap: float
    max_pairs_per_prompt: int
    since: str
    max_rejected_fraction: float
    truncation_chars: int
    eval_fraction: float
    seed: int
    min_chars: int
    max_chars: int

    def check(self) -> str:
        """Every parameter checked before any data is read, so a typo fails fast with the parameter's name;
        returns the format, lower-cased."""
        fmt = formats.check_format(self.format)
        if self.ranked_pairs not in pairing.RANKED_MODES:
            raise ValueError(
                f"ranked_pairs must be one of {', '.join(pairing.RANKED_MODES)}, got {self.ranked_pairs!r}"
            )
        if not (math.isfinite(self.min_score_gap) and self.min_score_gap >= 0):
            raise ValueError(f"min_score_gap must be a finite number >= 0, got {self.min_score_gap}")
        if self.max_pairs_per_prompt < 0:
            raise ValueError(
                f"max_pairs_per_prompt must be >= 0 (0 = no cap), got {self.max_pairs_per_prompt}"
            )
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ValueError(f"max_rejected_fraction must be in [0, 1], got {self.max_rejected_fraction}")
        if self.truncation_chars < 0:
            raise ValueError(f"truncation_chars must be >= 0 (0 = not checked), got {self.truncation_chars}")
        check_split_parameters(self.eval_fraction, self.min_chars, self.max_chars)
        readers.parse_since(self.since)
        return fmt

    def shown(self) -> dict[str, Any]:
        """The parameters as the report lists them."""
        return {**asdict(self), "since": self.since or "(all)"}


@dataclass
class _Sources:
    """The files of the source: those read, those skipped (hidden, unknown type, before ``since``)."""

    files: list[tuple[str, str]]
    skipped: list[str]
    since_skipped: list[str]
    unpartitioned: list[str]


def _list_sources(source: str, since: str) -> _Sources:
    found, skipped = readers.data_files(source)
    files, since_skipped, unpartitioned = readers.select_since(found, since)
    return _Sources(files, skipped, since_skipped, unpartitioned)


# ---------------------------------------------------------------------------------------------- read


@dataclass
class _Rows:
    """Every accounted row, the candidate pairs made so far, and the rows that are not pairs yet."""

    units: list[_Unit] = field(default_factory=list)
    candidates: list[pairing.Candidate] = field(default_factory=list)
    ranked: list[RankedList] = field(default_factory=list)
    observations: dict[str, list[Observation]] = field(default_factory=lambda: {"rating": [], "binary": []})
    file_formats: dict[str, str] = field(default_factory=dict)

    def add(self, unit: _Unit) -> int:
        """Account for a row; its index is how candidates and pairing refer to it."""
        self.units.append(unit)
        return len(self.units) - 1

    def not_paired(self) -> list[tuple[str, Sequence[Any]]]:
        """The rows that pairing still has to turn into pairs, by format."""
        return [
            ("ranked", self.ranked),
            ("rating", self.observations["rating"]),
            ("binary", self.observations["binary"]),
        ]


def _read_sources(sources: _Sources, fmt: str) -> _Rows:
    """Every row of every file, accounted for: a candidate pair, waiting for pairing, or rejected."""
    rows = _Rows()
    for file_uri, name in sources.files:
        _read_file(rows, file_uri, name, fmt)
    return rows


def _read_file(rows: _Rows, file_uri: str, name: str, fmt: str) -> None:
    """Read one file, recognise its format (unless named) and take in each of its rows."""
    raws = list(readers.read_file(file_uri, name, on_error="reject"))
    readable = [r for r in raws if r.error is None]
    file_fmt = fmt if fmt != "auto" or not readable else formats.detect(readable, name)
    rows.file_formats[name] = file_fmt
    for raw in raws:
        if raw.error:
            unit = rows.add(_Unit(raw.file, raw.row, {"raw": raw.raw}))
            rows.units[unit].reject([raw.error], raw.detail or "")
        elif file_fmt == "labelstudio":
            _take_annotations(rows, raw)
        else:
            _take_row(rows, raw, file_fmt)


def _take_annotations(rows: _Rows, raw: readers.RawRow) -> None:
    """A Label Studio task: each annotation is a row of its own, giving a pair or rejected."""
    for ann in labelstudio.expand(raw):
        unit = rows.add(_Unit(ann.file, ann.row, ann.record, ann.annotation))
        if ann.error is not None:
            reasons = ann.error.reasons if isinstance(ann.error, records.RowError) else None
            rows.units[unit].reject(reasons or [ann.error.reason or "invalid"], ann.error.message)
        else:
            assert ann.pair is not None
            rows.candidates.append(pairing.Candidate(ann.pair, [unit], [unit]))


def _take_row(rows: _Rows, raw: readers.RawRow, file_fmt: str) -> None:
    """Normalise a row: a pairwise row is a candidate pair now, the others wait for pairing."""
    unit = rows.add(_Unit(raw.file, raw.row, raw.record))
    try:
        if file_fmt == "pairwise":
            rows.candidates.append(pairing.Candidate(records.normalize_preference(raw), [unit], [unit]))
        elif file_fmt == "ranked":
            rows.ranked.append(formats.normalize_ranked(raw, unit))
        else:
            rows.observations[file_fmt].append(formats.normalize_observation(raw, unit, file_fmt))
    except records.RowError as exc:
        rows.units[unit].reject(exc.reasons, exc.message)


# ---------------------------------------------------------------------------------------------- pair


@dataclass
class _Pairing:
    """What the row suites and pairing gave: each suite's outcome, pairing counters, why rows made no pair."""

    outcomes: list[tuple[str, validation.ValidationOutcome]] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)
    unpaired: dict[int, str] = field(default_factory=dict)


def _pair_rows(rows: _Rows, settings: _Settings) -> _Pairing:
    """Ranked lists, ratings and thumbs: the row suite, then pairs from the rows it accepted."""
    result = _Pairing()
    for kind, items in rows.not_paired():
        if not items:
            continue
        outcome = validation.validate_rows(
            kind, items, min_chars=settings.min_chars, max_chars=settings.max_chars
        )
        result.outcomes.append((f"{kind} rows", outcome))
        made = _make_pairs(kind, _passed(rows, items, outcome), settings)
        for unit, (reason, detail) in made.rejected.items():
            rows.units[unit].reject([reason], detail)
        rows.candidates.extend(made.candidates)
        result.unpaired.update(made.unpaired)
        result.stats.update(made.stats)
    return result


def _passed(rows: _Rows, items: Sequence[Any], outcome: validation.ValidationOutcome) -> list[Any]:
    """The items the row suite accepted; the rows of the others are rejected with its reasons."""
    failures = outcome.failures()
    good = []
    for item, reasons in zip(items, outcome.reasons, strict=True):
        if reasons:
            rows.units[item.unit].reject(reasons, "; ".join(failures.get(r, r) for r in reasons))
        else:
            good.append(item)
    return good


def _make_pairs(kind: str, items: list[Any], settings: _Settings) -> pairing.Pairing:
    if kind == "ranked":
        return pairing.ranked_pairs(items, settings.ranked_pairs)
    if kind == "rating":
        return pairing.rating_pairs(
            items,
            min_score_gap=settings.min_score_gap,
            max_pairs_per_prompt=settings.max_pairs_per_prompt,
            seed=settings.seed,
        )
    return pairing.binary_pairs(items, max_pairs_per_prompt=settings.max_pairs_per_prompt, seed=settings.seed)


# ---------------------------------------------------------------------------------------------- judge pairs


@dataclass
class _Verdict:
    """The pair suite's outcome, the accepted pairs, the rows they came from, and what failed for other rows."""

    outcome: validation.ValidationOutcome
    accepted: list[dict[str, Any]] = field(default_factory=list)
    used: set[int] = field(default_factory=set)
    failed: dict[int, list[str]] = field(default_factory=dict)
    failed_detail: dict[int, list[str]] = field(default_factory=dict)
    pair_reasons: Counter[str] = field(default_factory=Counter)
    truncated: int = 0

    @property
    def rejected_pairs(self) -> int:
        return sum(1 for r in self.outcome.reasons if r)


def _pair_suite(candidates: Sequence[pairing.Candidate], settings: _Settings) -> validation.ValidationOutcome:
    """The pair suite over every candidate pair, whatever its format."""
    if not candidates:
        return validation.ValidationOutcome(reasons=[], expectations=[], success=True, seconds=0.0)
    return validation.validate_pairs(
        [c.pair for c in candidates],
        min_chars=settings.min_chars,
        max_chars=settings.max_chars,
        truncation_chars=settings.truncation_chars,
    )


def _judge_pairs(rows: _Rows, outcome: validation.ValidationOutcome) -> _Verdict:
    """Accept the pairs the suite passed; note for each row behind a failed pair why it failed."""
    verdict = _Verdict(outcome)
    failures = outcome.failures()
    truncated_rows = next((set(e.rows) for e in outcome.expectations if e.column == "truncated"), set())
    first_seen: dict[str, int] = {}
    for index, (cand, reasons) in enumerate(zip(rows.candidates, outcome.reasons, strict=True)):
        first = first_seen.setdefault(cand.pair["id"], cand.chosen_units[0])
        if not reasons:
            verdict.accepted.append(cand.pair)
            verdict.used.update(cand.units)
            verdict.truncated += index in truncated_rows
            continue
        verdict.pair_reasons.update(reasons)
        texts = failure_texts(reasons, failures, rows.units[first].where())
        for unit in cand.units:
            verdict.failed.setdefault(unit, []).extend(reasons)
            verdict.failed_detail.setdefault(unit, []).extend(texts)
    return verdict


def _settle_rows(rows: _Rows, verdict: _Verdict, unpaired: Mapping[int, str]) -> None:
    """A row that fed no accepted pair and is not rejected yet: rejected for its failed pairs, or unpaired."""
    for index, unit in enumerate(rows.units):
        if unit.reasons or index in verdict.used:
            continue
        if index in verdict.failed:
            unit.reject(verdict.failed[index], "; ".join(dict.fromkeys(verdict.failed_detail[index])))
        else:
            unit.reject(["unpaired"], unpaired.get(index, "made no pair"))


# ---------------------------------------------------------------------------------------------- account


@dataclass
class _Settled:
    """An import once every row is settled: where it read, what it read, how rows paired, which pairs passed."""

    sources: _Sources
    rows: _Rows
    pairs: _Pairing
    verdict: _Verdict

    def rejected(self) -> list[dict[str, Any]]:
        """The rejected rows, in input order."""
        rejected = [u.rejected_row() for u in self.rows.units if u.reasons]
        sort_rejected(rejected, self.sources.files)
        return rejected


def _metrics(state: _Settled, rejected: list[dict[str, Any]]) -> dict[str, float]:
    """The flat metrics: row accounting, pair counts, file counts, ``rejected_<reason>`` per reason, and what
    ratings and thumbs say of the feedback itself."""
    rows, sources, stats, verdict = state.rows, state.sources, state.pairs.stats, state.verdict
    rows_input = len(rows.units)
    accepted = len(verdict.accepted)
    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_used": sum(1 for i, u in enumerate(rows.units) if i in verdict.used and not u.reasons),
        "rows_rejected": len(rejected),
        "rejected_fraction": len(rejected) / rows_input if rows_input else 0.0,
        "pairs_train": 0,
        "pairs_eval": 0,
        "rows_train": 0,
        "rows_eval": 0,
        "pairs_candidates": len(rows.candidates),
        "pairs_rejected": verdict.rejected_pairs,
        "pairs_tied": stats["pairs_tied"],
        "pairs_below_gap": stats["pairs_below_gap"],
        "pairs_capped": stats["pairs_capped"],
        "pairs_truncated": verdict.truncated,
        "truncated_fraction": verdict.truncated / accepted if accepted else 0.0,
        "files_read": len(sources.files),
        "files_skipped": len(sources.skipped),
        "files_skipped_since": len(sources.since_skipped),
        "files_unpartitioned": len(sources.unpartitioned),
    }
    formats_used = sorted(set(rows.file_formats.values()))
    known = [r for f in formats_used for r in REASONS_BY_FORMAT.get(f, ())] or list(READ_REASONS)
    add_reason_metrics(metrics, known, validation.reason_counts(rejected))
    binary, rating = rows.observations["binary"], rows.observations["rating"]
    if binary:
        metrics["label_up_fraction"] = sum(o.value for o in binary) / len(binary)
    if rating:
        metrics["raters"] = len({o.rater for o in rating if o.rater is not None})
    return metrics


def _warnings(metrics: dict[str, float], settings: _Settings, unpartitioned: list[str]) -> list[str]:
    """What the report should put first: things that are not errors but that a person should look at."""
    out = []
    if metrics["rows_input"] and metrics["rejected_fraction"] > settings.max_rejected_fraction:
        out.append(
            f"{metrics['rejected_fraction']:.0%} of rows were rejected, more than max_rejected_fraction="
            f"{settings.max_rejected_fraction:g}: the step fails."
        )
    up = metrics.get("label_up_fraction")
    if up is not None and not validation.LABEL_BALANCE <= up <= 1 - validation.LABEL_BALANCE:
        out.append(f"Binary labels are extremely unbalanced: {up:.0%} of rows are up-votes.")
    truncation = settings.truncation_chars
    if truncation and metrics["truncated_fraction"] > 1 - validation.TRUNCATION_MOSTLY:
        out.append(
            f"{metrics['truncated_fraction']:.0%} of pairs are longer than truncation_chars={truncation}; "
            "training at that length would truncate them."
        )
    if settings.since and unpartitioned:
        out.append(
            f"{len(unpartitioned)} file(s) are in no date=YYYY-MM-DD partition and were read despite "
            f"since={settings.since}: {', '.join(unpartitioned[:5])}"
        )
    for warning in out:
        log.warning("%s", warning)
    return out


def _sections(state: _Settled, since: str) -> list[tuple[str, str]]:
    """The report's own sections for feedback: each file's format, and what became of the candidate pairs."""
    files = [{"file": n, "format": f} for n, f in state.rows.file_formats.items()] + [
        {"file": n, "format": f"not read: partition before since={since}"}
        for n in state.sources.since_skipped
    ]
    stats = state.pairs.stats
    counts = {
        "candidate pairs": len(state.rows.candidates),
        "accepted pairs": len(state.verdict.accepted),
        **{f"pairs rejected: {k}": v for k, v in state.verdict.pair_reasons.most_common()},
        "tied response pairs (no pair made)": stats["pairs_tied"],
        "response pairs below min_score_gap": stats["pairs_below_gap"],
        "pairs left out by max_pairs_per_prompt": stats["pairs_capped"],
    }
    return [
        ("Files and formats", reports.table(files, ["file", "format"])),
        ("Pairs", reports.key_values(counts)),
    ]


def _publication(
    state: _Settled, settings: _Settings, source: str, rejected_path: str, report_path: str
) -> Publication:
    """The rejected rows and the report, with the metrics they show (the split's counts are added later)."""
    rejected = state.rejected()
    metrics = _metrics(state, rejected)
    outcomes = [*state.pairs.outcomes, ("pairs", state.verdict.outcome)]
    return Publication(
        title="preftune preference import validation",
        source=source,
        rejected_path=rejected_path,
        report_path=report_path,
        metrics=metrics,
        parameters=settings.shown(),
        outcome=validation.combine([o for _, o in outcomes]),
        rejected=rejected,
        skipped_files=state.sources.skipped,
        warnings=_warnings(metrics, settings, state.sources.unpartitioned),
        sections_after=_sections(state, settings.since),
        suite_note=f"Suites run: {', '.join(f'{n} ({len(o.reasons)})' for n, o in outcomes)}.",
    )


def _log_summary(publication: Publication, split: Split) -> None:
    metrics, counts = publication.metrics, validation.reason_counts(publication.rejected)
    top = listed(counts, 4, " ")
    log.info(
        "preference import %s: %d rows in -> %d used (%d train pairs, %d eval pairs), %d rejected%s",
        publication.source,
        metrics["rows_input"],
        metrics["rows_used"],
        len(split.train),
        len(split.held),
        len(publication.rejected),
        f" ({top})" if top else "",
    )


def _check_rejected_fraction(publication: Publication, max_rejected_fraction: float) -> None:
    """Fail (the outputs are written by now) when more rows were rejected than ``max_rejected_fraction``."""
    rows_input, rejected = publication.metrics["rows_input"], len(publication.rejected)
    if rows_input and rejected / rows_input > max_rejected_fraction:
        top = listed(validation.reason_counts(publication.rejected), 4, " ")
        raise RejectedFractionError(
            f"{rejected} of {rows_input} rows ({rejected / rows_input:.0%}) were rejected, more than "
            f"max_rejected_fraction={max_rejected_fraction:g}; most common reasons: {top}. See the rejected "
            f"rows ({publication.rejected_path}) and the report ({publication.report_path})",
            publication.metrics,
        )


def import_preferences(
    source: str,
    train_path: str,
    eval_path: str,
    rejected_path: str,
    report_path: str,
    *,
    format: str = "auto",  # noqa: A002  (the parameter's name in the component and CLI)
    ranked_pairs: str = "all",
    min_score_gap: float = DEFAULT_MIN_SCORE_GAP,
    max_pairs_per_prompt: int = DEFAULT_MAX_PAIRS_PER_PROMPT,
    since: str = "",
    max_rejected_fraction: float = DEFAULT_MAX_REJECTED_FRACTION,
    truncation_chars: int = DEFAULT_TRUNCATION_CHARS,
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
) -> dict[str, float]:
    """Turn collected feedback (jsonl / json / csv / tsv / parquet file, directory or s3 prefix) into train and
    eval pair datasets, a rejected-rows file and an HTML validation report; see the module docstring.

    Returns flat metrics (``rows_input``, ``rows_used``, ``rows_rejected``, ``pairs_train``, ``pairs_eval``,
    ``rejected_<reason>``, ...). Raises ValueError for bad parameters, DataFormatError for whole-file problems,
    ValueError when no pair remains or an eval split is impossible, and :class:`RejectedFractionError` when too
    many rows were rejected -- the last two after writing the rejected rows and the report.
    """
    settings = _Settings(
        format=format,
        ranked_pairs=ranked_pairs,
        min_score_gap=min_score_gap,
        max_pairs_per_prompt=max_pairs_per_prompt,
        since=since,
        max_rejected_fraction=max_rejected_fraction,
        truncation_chars=truncation_chars,
        eval_fraction=eval_fraction,
        seed=seed,
        min_chars=min_chars,
        max_chars=max_chars,
    )
    fmt = settings.check()
    sources = _list_sources(source, since)
    rows = _read_sources(sources, fmt)
    pairs = _pair_rows(rows, settings)
    verdict = _judge_pairs(rows, _pair_suite(rows.candidates, settings))
    _settle_rows(rows, verdict, pairs.unpaired)
    publication = _publication(
        _Settled(sources, rows, pairs, verdict), settings, source, rejected_path, report_path
    )
    metrics = publication.metrics
    empty_message = (
        f"no usable pairs in {source}: all {metrics['rows_input']} input rows were rejected "
        f"({listed(validation.reason_counts(publication.rejected)) or 'no rows'}); see {rejected_path}"
    )
    split = split_or_publish(verdict.accepted, eval_fraction, seed, empty_message, publication)
    metrics.update(pairs_train=len(split.train), pairs_eval=len(split.held), **split.metrics())
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"], (
        "row accounting does not balance"
    )
    write_outputs(split, train_path, eval_path, publication)
    _log_summary(publication, split)
    _check_rejected_fraction(publication, max_rejected_fraction)
    return metrics


__all__ = [
    "PREFERENCE_REASONS",
    "REASONS_BY_FORMAT",
    "DataFormatError",
    "RejectedFractionError",
    "import_preferences",
]
