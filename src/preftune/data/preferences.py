"""Import collected human feedback -- pairwise, ranked, rated, thumbs, Label Studio -- as validated preference pairs.

The steps, each accounting for every input row (docs/preference_formats.md has the user's view):

1. list the source (``since`` keeps date partitions on or after a day), read every row once, and recognise each
   file's format (:mod:`feedback`);
2. normalise rows (problems -> ``missing:<field>`` / ``invalid:<field>``) and run the row suite on rows that are
   not pairs yet (ranked lists, ratings, thumbs); pair the rows it accepts, at most ``max_pairs_per_prompt``
   pairs per prompt;
3. run the pair suite on every candidate pair (duplicates and contradictions found through 64-bit hashes);
4. a row is *used* when at least one accepted pair came from it; every other row is rejected with the reasons of
   its failed pairs, or ``unpaired``. So ``rows_input == rows_used + rows_rejected``, while pairs are counted apart
   (``pairs_train``, ``pairs_eval``): a rating row may feed several pairs and still counts once;
5. split accepted pairs by prompt, write train / eval / rejected, the HTML report and the suites, and fail (after
   writing) when more than ``max_rejected_fraction`` of the rows were rejected.

Rows stream through :mod:`importing`: memory holds a few numbers per row and per pair, whatever the input's size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from preftune.data import buckets, checkpoints, formats, pairing, readers, sources, spill, suites
from preftune.data.feedback import Feedback, pair_columns
from preftune.data.importing import (
    READ_REASONS,
    Items,
    Publication,
    Rejections,
    Units,
    Verdict,
    add_reason_metrics,
    check_split_parameters,
    emit,
    listed,
    verdict,
)
from preftune.data.readers import DataFormatError
from preftune.data.unpaired import UnpairedSet
from preftune.report import html as reports

log = logging.getLogger(__name__)

_DEFAULTS = suites.default_document("preferences")
_PAIR_REASONS = (*suites.reasons_of(_DEFAULTS, "pairs"), "contradiction")


def _schema(*fields: str) -> tuple[str, ...]:
    return tuple(f"{kind}:{f}" for f in fields for kind in ("missing", "invalid"))


def _answers() -> tuple[str, ...]:
    return (
        "missing:prompt",
        "missing:chosen",
        "missing:rejected",
        "invalid:prompt",
        "invalid:chosen",
        "invalid:rejected",
    )


#: The reasons a row can be rejected for, by feedback format (with the default suites).
REASONS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "pairwise": (*READ_REASONS, *_answers(), "invalid:margin", *_PAIR_REASONS),
    "ranked": (
        *READ_REASONS,
        *_schema("prompt", "responses", "ranks"),
        *suites.reasons_of(_DEFAULTS, "ranked_rows"),
        *_PAIR_REASONS,
        "unpaired",
    ),
    "rating": (
        *READ_REASONS,
        *_schema("prompt", "response", "score"),
        *suites.reasons_of(_DEFAULTS, "rating_rows"),
        *_PAIR_REASONS,
        "unpaired",
    ),
    "binary": (
        *READ_REASONS,
        *_schema("prompt", "response", "label"),
        *suites.reasons_of(_DEFAULTS, "binary_rows"),
        *_PAIR_REASONS,
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
        *_answers(),
        *_PAIR_REASONS,
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
    expectation_suite_uri: str

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
        shown = {**asdict(self), "since": self.since or "(all)"}
        shown["expectation_suite_uri"] = self.expectation_suite_uri or "(the default suites)"
        return shown


# ---------------------------------------------------------------------------------------------- pair suite


def _pair_suite(items: Items, validator: checkpoints.Validator, truncation: int) -> tuple[Any, Any, int]:
    """The pair suite over every candidate, whatever its format, a chunk of candidates at a time; returns (its
    result, the repeats (each duplicate's first item), how many accepted pairs are truncated)."""
    import numpy as np

    repeats = buckets.Repeats(items.columns, items.spill.directory, reverse="reverse")
    names = ("prompt_chars", "chosen_chars", "rejected_chars", "margin", "flags")

    def chunks() -> Iterator[tuple[int, dict[str, Any]]]:
        for start, part in items.columns.chunks(*names):
            flags = part.pop("flags")
            repeated, reversed_ = repeats.masks(start, len(flags))
            pair_chars = part["prompt_chars"] + np.maximum(part["chosen_chars"], part["rejected_chars"])
            yield (
                start,
                {
                    **part,
                    "pair_chars": pair_chars,
                    "identical_pair": (flags & 1).astype(bool),
                    "is_duplicate": repeated,
                    "is_contradiction": (flags & 2 == 0) & reversed_,
                    "truncated": pair_chars > truncation
                    if truncation > 0
                    else np.zeros(len(flags), dtype=bool),
                },
            )

    result = validator.run_chunks("pairs", len(items), chunks, items.spill.directory)
    truncated = 0
    if truncation > 0:
        parts = zip(items.columns.chunks(*names[:3]), result.chunks(), strict=True)
        for (_, part), (_, failed) in parts:
            longer = np.maximum(part["chosen_chars"], part["rejected_chars"])
            truncated += int(((part["prompt_chars"] + longer > truncation) & (failed == 0)).sum())
    return result, repeats, truncated


# ---------------------------------------------------------------------------------------------- account


@dataclass
class _Done:
    """An import once every row is settled."""

    listing: sources.Listing
    units: Units
    rejections: Rejections
    feedback: Feedback
    verdict: Verdict
    truncated: int
    used: int


def _metrics(done: _Done) -> dict[str, float]:
    """The flat metrics: row accounting, pair counts, file counts, ``rejected_<reason>`` per reason, and what
    ratings and thumbs say of the feedback itself."""
    import numpy as np

    listing, stats, result = done.listing, done.feedback.stats, done.verdict.suite
    rows_input, rejected = len(done.units), len(done.rejections)
    accepted, truncated = result.accepted, done.truncated
    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_used": done.used,
        "rows_rejected": rejected,
        "rejected_fraction": rejected / rows_input if rows_input else 0.0,
        "pairs_train": 0,
        "pairs_eval": 0,
        "rows_train": 0,
        "rows_eval": 0,
        "pairs_candidates": result.rows,
        "pairs_rejected": result.rows - accepted,
        "pairs_tied": stats["pairs_tied"],
        "pairs_below_gap": stats["pairs_below_gap"],
        "pairs_capped": stats["pairs_capped"],
        "pairs_truncated": truncated,
        "truncated_fraction": truncated / accepted if accepted else 0.0,
        "files_read": len(listing.files),
        "files_skipped": len(listing.skipped),
        "files_skipped_since": len(listing.since_skipped),
        "files_unpartitioned": len(listing.unpartitioned),
    }
    formats_used = sorted(set(done.feedback.file_formats.values()))
    known = [r for f in formats_used for r in REASONS_BY_FORMAT.get(f, ())] or list(READ_REASONS)
    add_reason_metrics(metrics, known, done.rejections.counts)
    binary, rating = done.feedback.kinds["binary"], done.feedback.kinds["rating"]
    if len(binary):
        ups = sum(float(part["value"].sum()) for _, part in binary.columns.chunks("value"))
        metrics["label_up_fraction"] = ups / len(binary)
    if len(rating):
        raters: set[int] = set()
        for _, part in rating.columns.chunks("rater"):
            raters.update(np.unique(part["rater"][part["rater"] != 0]).tolist())
        metrics["raters"] = len(raters)
    return metrics


def _counted_rejected(metrics: dict[str, float]) -> tuple[float, float]:
    """The rows rejected less those the unpaired set keeps for KTO, and their share of the input rows: what
    ``max_rejected_fraction`` bounds."""
    rows_input = metrics["rows_input"]
    rejected = metrics["rows_rejected"] - metrics.get("rows_unpaired_kept", 0)
    return rejected, rejected / rows_input if rows_input else 0.0


def _warnings(metrics: dict[str, float], settings: _Settings, unpartitioned: list[str]) -> list[str]:
    """What the report should put first: things that are not errors but that a person should look at."""
    out = []
    _, counted = _counted_rejected(metrics)
    if counted > settings.max_rejected_fraction:
        out.append(
            f"{counted:.0%} of rows were rejected, more than max_rejected_fraction="
            f"{settings.max_rejected_fraction:g}: the step fails."
        )
    if metrics.get("rows_unpaired_kept"):
        out.append(
            f"{int(metrics['rows_unpaired_kept'])} rows made no pair; the unpaired set keeps them for KTO, and "
            "they do not count against max_rejected_fraction."
        )
    up = metrics.get("label_up_fraction")
    if up is not None and not suites.LABEL_BALANCE <= up <= 1 - suites.LABEL_BALANCE:
        out.append(f"Binary labels are extremely unbalanced: {up:.0%} of rows are up-votes.")
    truncation = settings.truncation_chars
    if truncation and metrics["truncated_fraction"] > 1 - suites.TRUNCATION_MOSTLY:
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


def _pair_reasons(result: checkpoints.SuiteResult) -> Counter[str]:
    """How many candidate pairs each reason rejected."""
    counts: Counter[str] = Counter()
    for mask, size in result.masks.items():
        for reason in result.reasons_for(mask):
            counts[reason] += size
    return counts


def _sections(done: _Done, since: str) -> list[tuple[str, str]]:
    """The report's own sections for feedback: each file's format, and what became of the candidate pairs."""
    files = [{"file": n, "format": f} for n, f in done.feedback.file_formats.items()] + [
        {"file": n, "format": f"not read: partition before since={since}"} for n in done.listing.since_skipped
    ]
    stats, result = done.feedback.stats, done.verdict.suite
    counts = {
        "candidate pairs": result.rows,
        "accepted pairs": result.accepted,
        **{f"pairs rejected: {k}": v for k, v in _pair_reasons(result).most_common()},
        "tied response pairs (no pair made)": stats["pairs_tied"],
        "response pairs below min_score_gap": stats["pairs_below_gap"],
        "pairs left out by max_pairs_per_prompt": stats["pairs_capped"],
    }
    return [
        ("Files and formats", reports.table(files, ["file", "format"])),
        ("Pairs", reports.key_values(counts)),
    ]


def _check_rejected_fraction(
    metrics: dict[str, float], settings: _Settings, publication: Publication, counts: Counter[str]
) -> None:
    """Fail (the outputs are written by now) when more rows were rejected than ``max_rejected_fraction``; rows
    rejected only for making no pair while the unpaired set (KTO's examples) holds them are not counted: with
    thumbs, most prompts often have a single judgement, and KTO trains on every one."""
    rejected, fraction = _counted_rejected(metrics)
    if fraction > settings.max_rejected_fraction:
        kept = metrics.get("rows_unpaired_kept", 0)
        also = f", besides {int(kept)} unpaired rows kept for KTO" if kept else ""
        raise RejectedFractionError(
            f"{int(rejected)} of {int(metrics['rows_input'])} rows ({fraction:.0%}) were rejected{also}, more "
            f"than max_rejected_fraction={settings.max_rejected_fraction:g}; most common reasons: "
            f"{listed(counts, 4, ' ')}. See the rejected rows ({publication.rejected_path}) and the report "
            f"({publication.report_path})",
            metrics,
        )


def _finish(
    state: tuple[sources.Listing, Units, Rejections, Items, Feedback],
    outcomes: list[tuple[str, checkpoints.SuiteResult]],
    pair_suite: tuple[Any, Any, Any],
    settings: _Settings,
    publication: Publication,
    validator: checkpoints.Validator,
) -> dict[str, float]:
    """Split, write, account; the rejected rows and the report are written even when the import then fails."""
    listing, units, rejections, items, feedback = state
    result, repeats, truncated = pair_suite
    accepted = result.accepted
    failure: ValueError | None = None
    try:
        decided = verdict(items, result, repeats, settings.eval_fraction)
    except ValueError as exc:
        failure, decided = exc, verdict(items, result, repeats, 0.0)
    published = failure is None and accepted > 0
    used = emit(items, decided, units, rejections, publication.train_path, publication.eval_path, published)
    done = _Done(listing, units, rejections, feedback, decided, truncated, used)
    metrics = _metrics(done)
    if not accepted:
        failure = ValueError(
            f"no usable pairs in {publication.source}: all {len(units)} input rows were rejected "
            f"({listed(rejections.counts) or 'no rows'}); see {publication.rejected_path}"
        )
    train, held = decided.counts()
    if failure is None:
        metrics.update(pairs_train=train, pairs_eval=held, rows_train=train, rows_eval=held)
        if feedback.unpaired is not None:
            metrics.update(feedback.unpaired.publish(decided.cut))
            metrics["rows_unpaired_kept"] = feedback.unpaired_kept
        metrics.update(prompts_train=decided.prompts_train, prompts_eval=decided.prompts_eval)
    publication.write(
        units,
        rejections,
        metrics,
        [*outcomes, ("pairs", result)],
        validator.import_seconds,
        warnings=_warnings(metrics, settings, listing.unpartitioned),
        sections_after=_sections(done, settings.since),
        suite_note=f"Suites run: {', '.join(f'{n} ({r.rows})' for n, r in [*outcomes, ('pairs', result)])}.",
    )
    if failure is not None:
        raise failure
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"], (
        "row accounting does not balance"
    )
    top = listed(rejections.counts, 4, " ")
    log.info(
        "preference import %s: %d rows in -> %d used (%d train pairs, %d eval pairs), %d rejected%s",
        publication.source,
        len(units),
        used,
        train,
        held,
        len(rejections),
        f" ({top})" if top else "",
    )
    _check_rejected_fraction(metrics, settings, publication, rejections.counts)
    return metrics


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
    expectation_suite_uri: str = "",
    suite_path: str = "",
    exclude: Sequence[str] = (),
    unpaired_train_path: str = "",
    unpaired_eval_path: str = "",
) -> dict[str, float]:
    """Turn collected feedback (jsonl / json / csv / tsv / parquet file, directory, s3 prefix, ``save_to_disk``
    directory or ``hf://`` dataset) into train and eval pair datasets, a rejected-rows file, an HTML validation
    report and (``suite_path``) the expectation suites it ran; see the module docstring. ``exclude``: files and
    directories never read as input (the import's own outputs never are). ``unpaired_train_path`` /
    ``unpaired_eval_path``: where to write the accepted thumbs and ratings as single desirable / undesirable
    examples, split by prompt like the pairs (:mod:`preftune.data.unpaired`; "" = not written).

    Returns flat metrics (``rows_input``, ``rows_used``, ``rows_rejected``, ``pairs_train``, ``pairs_eval``,
    ``rejected_<reason>``, ...). Raises ValueError for bad parameters, DataFormatError for whole-file problems,
    ValueError when no pair remains or an eval split is impossible, and :class:`RejectedFractionError` when too
    many rows were rejected -- the last two after writing the rejected rows and the report.
    """
    settings = _Settings(
        format,
        ranked_pairs,
        min_score_gap,
        max_pairs_per_prompt,
        since,
        max_rejected_fraction,
        truncation_chars,
        eval_fraction,
        seed,
        min_chars,
        max_chars,
        expectation_suite_uri,
    )
    fmt = settings.check()
    document = suites.load_document(expectation_suite_uri, "preferences")
    outputs = (train_path, eval_path, rejected_path, report_path, suite_path)
    unpaired_paths = (unpaired_train_path, unpaired_eval_path)
    listing = sources.list_source(source, since, exclude=[*outputs, *unpaired_paths, *exclude])
    publication = Publication(
        "preftune preference import validation", source, outputs, settings.shown(), document, listing.skipped
    )
    validator = checkpoints.Validator(
        document, {"min_chars": min_chars, "max_chars": max_chars, "truncation_chars": truncation_chars}
    )
    validator.preload()
    with spill.workspace() as work:
        units, rejections = Units(listing.files, work), Rejections(work)
        items = Items(work, "pairs", **pair_columns())
        feedback = Feedback(work, units, rejections, items, settings)
        if unpaired_train_path:
            feedback.unpaired = UnpairedSet(work, *unpaired_paths, seed)
        feedback.read(listing.files, fmt, source)
        outcomes = feedback.pair(validator)
        pair_suite = _pair_suite(items, validator, truncation_chars)
        state = (listing, units, rejections, items, feedback)
        return _finish(state, outcomes, pair_suite, settings, publication, validator)


__all__ = [
    "PREFERENCE_REASONS",
    "REASONS_BY_FORMAT",
    "DataFormatError",
    "RejectedFractionError",
    "import_preferences",
]
