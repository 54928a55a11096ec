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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data import formats, labelstudio, pairing, readers, records, validation
from preftune.data.formats import Observation, RankedList
from preftune.data.ingest import READ_REASONS, metric_name, prompt_key, split_groups
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

    def rejected_row(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "row": self.row}
        if self.annotation is not None:
            out["annotation"] = self.annotation
        out.update({"reasons": self.reasons, "detail": self.detail, "record": self.record})
        return out

    def where(self) -> str:
        note = f", annotation {self.annotation}" if self.annotation is not None else ""
        return f"{self.file}, {readers.row_label(self.file)} {self.row}{note}"


def _check(
    *,
    fmt: str,
    ranked_pairs: str,
    min_score_gap: float,
    max_pairs_per_prompt: int,
    max_rejected_fraction: float,
    truncation_chars: int,
    eval_fraction: float,
    min_chars: int,
    max_chars: int,
    since: str,
) -> str:
    """Every parameter checked before any data is read, so a typo fails fast with the parameter's name."""
    fmt = formats.check_format(fmt)
    if ranked_pairs not in pairing.RANKED_MODES:
        raise ValueError(
            f"ranked_pairs must be one of {', '.join(pairing.RANKED_MODES)}, got {ranked_pairs!r}"
        )
    if not (math.isfinite(min_score_gap) and min_score_gap >= 0):
        raise ValueError(f"min_score_gap must be a finite number >= 0, got {min_score_gap}")
    if max_pairs_per_prompt < 0:
        raise ValueError(f"max_pairs_per_prompt must be >= 0 (0 = no cap), got {max_pairs_per_prompt}")
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise ValueError(f"max_rejected_fraction must be in [0, 1], got {max_rejected_fraction}")
    if truncation_chars < 0:
        raise ValueError(f"truncation_chars must be >= 0 (0 = not checked), got {truncation_chars}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if min_chars < 0 or max_chars < max(min_chars, 1):
        raise ValueError(
            f"need 0 <= min_chars <= max_chars and max_chars >= 1, got {min_chars} and {max_chars}"
        )
    readers.parse_since(since)
    return fmt


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
    fmt = _check(
        fmt=format,
        ranked_pairs=ranked_pairs,
        min_score_gap=min_score_gap,
        max_pairs_per_prompt=max_pairs_per_prompt,
        max_rejected_fraction=max_rejected_fraction,
        truncation_chars=truncation_chars,
        eval_fraction=eval_fraction,
        min_chars=min_chars,
        max_chars=max_chars,
        since=since,
    )
    listed, skipped = readers.data_files(source)
    files, since_skipped, unpartitioned = readers.select_since(listed, since)

    units: list[_Unit] = []
    candidates: list[pairing.Candidate] = []
    ranked: list[RankedList] = []
    observations: dict[str, list[Observation]] = {"rating": [], "binary": []}
    file_formats: dict[str, str] = {}

    def reject(unit: int, reasons: Sequence[str], detail: str) -> None:
        units[unit].reasons = list(dict.fromkeys([*units[unit].reasons, *reasons]))
        units[unit].detail = "; ".join(d for d in (units[unit].detail, detail) if d)

    for file_uri, name in files:
        raws = list(readers.read_file(file_uri, name, on_error="reject"))
        readable = [r for r in raws if r.error is None]
        file_fmt = fmt if fmt != "auto" or not readable else formats.detect(readable, name)
        file_formats[name] = file_fmt
        for raw in raws:
            if raw.error:
                units.append(_Unit(raw.file, raw.row, {"raw": raw.raw}))
                reject(len(units) - 1, [raw.error], raw.detail or "")
                continue
            if file_fmt == "labelstudio":
                for ann in labelstudio.expand(raw):
                    units.append(_Unit(ann.file, ann.row, ann.record, ann.annotation))
                    if ann.error is not None:
                        reasons = ann.error.reasons if isinstance(ann.error, records.RowError) else None
                        reject(len(units) - 1, reasons or [ann.error.reason or "invalid"], ann.error.message)
                    else:
                        assert ann.pair is not None
                        candidates.append(pairing.Candidate(ann.pair, [len(units) - 1], [len(units) - 1]))
                continue
            units.append(_Unit(raw.file, raw.row, raw.record))
            unit = len(units) - 1
            try:
                if file_fmt == "pairwise":
                    pair = records.normalize_preference(raw)
                    candidates.append(pairing.Candidate(pair, [unit], [unit]))
                elif file_fmt == "ranked":
                    ranked.append(formats.normalize_ranked(raw, unit))
                else:
                    observations[file_fmt].append(formats.normalize_observation(raw, unit, file_fmt))
            except records.RowError as exc:
                reject(unit, exc.reasons, exc.message)

    # Rows that are not pairs yet: the row suite, then pairing.
    outcomes: list[tuple[str, validation.ValidationOutcome]] = []
    stats: Counter[str] = Counter()
    unpaired: dict[int, str] = {}
    items_by_format: list[tuple[str, Sequence[Any]]] = [
        ("ranked", ranked),
        ("rating", observations["rating"]),
        ("binary", observations["binary"]),
    ]
    for kind, items in items_by_format:
        if not items:
            continue
        outcome = validation.validate_rows(kind, items, min_chars=min_chars, max_chars=max_chars)
        outcomes.append((f"{kind} rows", outcome))
        failures = {e.reason: e.failure for e in outcome.expectations}
        good = []
        for item, reasons in zip(items, outcome.reasons, strict=True):
            if reasons:
                reject(item.unit, reasons, "; ".join(failures.get(r, r) for r in reasons))
            else:
                good.append(item)
        if kind == "ranked":
            made = pairing.ranked_pairs(good, ranked_pairs)
        elif kind == "rating":
            made = pairing.rating_pairs(
                good, min_score_gap=min_score_gap, max_pairs_per_prompt=max_pairs_per_prompt, seed=seed
            )
        else:
            made = pairing.binary_pairs(good, max_pairs_per_prompt=max_pairs_per_prompt, seed=seed)
        for unit, (reason, detail) in made.rejected.items():
            reject(unit, [reason], detail)
        candidates.extend(made.candidates)
        unpaired.update(made.unpaired)
        stats.update(made.stats)

    # All candidate pairs: the pair suite; then each row's fate.
    pair_outcome = (
        validation.validate_pairs(
            [c.pair for c in candidates],
            min_chars=min_chars,
            max_chars=max_chars,
            truncation_chars=truncation_chars,
        )
        if candidates
        else validation.ValidationOutcome(reasons=[], expectations=[], success=True, seconds=0.0)
    )
    outcomes.append(("pairs", pair_outcome))
    failures = {e.reason: e.failure for e in pair_outcome.expectations}
    truncated_rows = next((set(e.rows) for e in pair_outcome.expectations if e.column == "truncated"), set())
    accepted: list[dict[str, Any]] = []
    used: set[int] = set()
    failed: dict[int, list[str]] = {}
    failed_detail: dict[int, list[str]] = {}
    first_seen: dict[str, int] = {}
    pair_reasons: Counter[str] = Counter()
    truncated = 0
    for index, (cand, reasons) in enumerate(zip(candidates, pair_outcome.reasons, strict=True)):
        first = first_seen.setdefault(cand.pair["id"], cand.chosen_units[0])
        if not reasons:
            accepted.append(cand.pair)
            used.update(cand.units)
            truncated += index in truncated_rows
            continue
        pair_reasons.update(reasons)
        texts = [failures.get(r, r) for r in reasons]
        if "duplicate" in reasons:
            texts[reasons.index("duplicate")] += f" ({units[first].where()})"
        for unit in cand.units:
            failed.setdefault(unit, []).extend(reasons)
            failed_detail.setdefault(unit, []).extend(texts)
    for index, unit in enumerate(units):
        if unit.reasons or index in used:
            continue
        if index in failed:
            reject(index, failed[index], "; ".join(dict.fromkeys(failed_detail[index])))
        else:
            reject(index, ["unpaired"], unpaired.get(index, "made no pair"))

    order = {name: i for i, (_, name) in enumerate(files)}
    rejected = [u.rejected_row() for u in units if u.reasons]
    rejected.sort(key=lambda r: (order.get(r["file"], 0), r["row"], r.get("annotation") or 0))
    rows_input = len(units)
    metrics = _metrics(
        rows_input=rows_input,
        rows_used=sum(1 for i, u in enumerate(units) if i in used and not u.reasons),
        rejected=rejected,
        formats_used=sorted(set(file_formats.values())),
        files=len(files),
        skipped=len(skipped),
        since_skipped=len(since_skipped),
        unpartitioned=len(unpartitioned),
        candidates=len(candidates),
        pairs_rejected=sum(1 for r in pair_outcome.reasons if r),
        stats=stats,
        truncated=truncated,
        accepted=len(accepted),
    )
    binary = observations["binary"]
    if binary:
        metrics["label_up_fraction"] = sum(o.value for o in binary) / len(binary)
    if observations["rating"]:
        metrics["raters"] = len({o.rater for o in observations["rating"] if o.rater is not None})
    warnings = _warnings(metrics, max_rejected_fraction, truncation_chars, since, unpartitioned)
    parameters = {
        "format": format,
        "ranked_pairs": ranked_pairs,
        "min_score_gap": min_score_gap,
        "max_pairs_per_prompt": max_pairs_per_prompt,
        "since": since or "(all)",
        "max_rejected_fraction": max_rejected_fraction,
        "truncation_chars": truncation_chars,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "min_chars": min_chars,
        "max_chars": max_chars,
    }

    def publish() -> None:
        records.write_jsonl(rejected_path, rejected)
        extra = [
            (
                "Files and formats",
                reports.table(
                    [{"file": n, "format": f} for n, f in file_formats.items()]
                    + [
                        {"file": n, "format": f"not read: partition before since={since}"}
                        for n in since_skipped
                    ],
                    ["file", "format"],
                ),
            ),
            (
                "Pairs",
                reports.key_values(
                    {
                        "candidate pairs": len(candidates),
                        "accepted pairs": len(accepted),
                        **{f"pairs rejected: {k}": v for k, v in pair_reasons.most_common()},
                        "tied response pairs (no pair made)": stats["pairs_tied"],
                        "response pairs below min_score_gap": stats["pairs_below_gap"],
                        "pairs left out by max_pairs_per_prompt": stats["pairs_capped"],
                    }
                ),
            ),
        ]
        html = validation.render_report(
            "preftune preference import validation",
            source=source,
            metrics=metrics,
            parameters=parameters,
            outcome=validation.combine([o for _, o in outcomes]),
            rejected=rejected,
            skipped_files=skipped,
            warnings=warnings,
            sections_after=extra,
            suite_note=f"Suites run: {', '.join(f'{n} ({len(o.reasons)})' for n, o in outcomes)}.",
        )
        reports.write(report_path, html)

    counts = Counter(reason for r in rejected for reason in r["reasons"])
    try:
        if not accepted:
            raise ValueError(
                f"no usable pairs in {source}: all {rows_input} input rows were rejected "
                f"({', '.join(f'{k}: {v}' for k, v in counts.most_common()) or 'no rows'}); see {rejected_path}"
            )
        to_eval = split_groups(accepted, eval_fraction, seed)
    except ValueError:
        publish()
        raise
    train = [p for p, e in zip(accepted, to_eval, strict=True) if not e]
    held = [p for p, e in zip(accepted, to_eval, strict=True) if e]
    metrics.update(
        pairs_train=len(train),
        pairs_eval=len(held),
        rows_train=len(train),
        rows_eval=len(held),
        prompts_train=len({prompt_key(p) for p in train}),
        prompts_eval=len({prompt_key(p) for p in held}),
    )
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"], (
        "row accounting does not balance"
    )
    records.write_jsonl(train_path, train)
    records.write_jsonl(eval_path, held)
    publish()
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(4))
    log.info(
        "preference import %s: %d rows in -> %d used (%d train pairs, %d eval pairs), %d rejected%s",
        source,
        rows_input,
        metrics["rows_used"],
        len(train),
        len(held),
        len(rejected),
        f" ({top})" if top else "",
    )
    if rows_input and len(rejected) / rows_input > max_rejected_fraction:
        raise RejectedFractionError(
            f"{len(rejected)} of {rows_input} rows ({len(rejected) / rows_input:.0%}) were rejected, more than "
            f"max_rejected_fraction={max_rejected_fraction:g}; most common reasons: {top}. See the rejected rows "
            f"({rejected_path}) and the report ({report_path})",
            metrics,
        )
    return metrics


def _metrics(
    *,
    rows_input: int,
    rows_used: int,
    rejected: list[dict[str, Any]],
    formats_used: list[str],
    files: int,
    skipped: int,
    since_skipped: int,
    unpartitioned: int,
    candidates: int,
    pairs_rejected: int,
    stats: Counter[str],
    truncated: int,
    accepted: int,
) -> dict[str, float]:
    """The flat metrics: row accounting, pair counts, file counts, and ``rejected_<reason>`` per reason."""
    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_used": rows_used,
        "rows_rejected": len(rejected),
        "rejected_fraction": len(rejected) / rows_input if rows_input else 0.0,
        "pairs_train": 0,
        "pairs_eval": 0,
        "rows_train": 0,
        "rows_eval": 0,
        "pairs_candidates": candidates,
        "pairs_rejected": pairs_rejected,
        "pairs_tied": stats["pairs_tied"],
        "pairs_below_gap": stats["pairs_below_gap"],
        "pairs_capped": stats["pairs_capped"],
        "pairs_truncated": truncated,
        "truncated_fraction": truncated / accepted if accepted else 0.0,
        "files_read": files,
        "files_skipped": skipped,
        "files_skipped_since": since_skipped,
        "files_unpartitioned": unpartitioned,
    }
    known = [r for f in formats_used for r in REASONS_BY_FORMAT.get(f, ())] or list(READ_REASONS)
    counts = Counter(reason for r in rejected for reason in r["reasons"])
    for reason in dict.fromkeys([*known, *sorted(set(counts) - set(known))]):
        metrics[metric_name(reason)] = counts.get(reason, 0)
    return metrics


def _warnings(
    metrics: dict[str, float],
    max_rejected_fraction: float,
    truncation_chars: int,
    since: str,
    unpartitioned: list[str],
) -> list[str]:
    """What the report should put first: things that are not errors but that a person should look at."""
    out = []
    if metrics["rows_input"] and metrics["rejected_fraction"] > max_rejected_fraction:
        out.append(
            f"{metrics['rejected_fraction']:.0%} of rows were rejected, more than max_rejected_fraction="
            f"{max_rejected_fraction:g}: the step fails."
        )
    up = metrics.get("label_up_fraction")
    if up is not None and not validation.LABEL_BALANCE <= up <= 1 - validation.LABEL_BALANCE:
        out.append(f"Binary labels are extremely unbalanced: {up:.0%} of rows are up-votes.")
    if truncation_chars and metrics["truncated_fraction"] > 1 - validation.TRUNCATION_MOSTLY:
        out.append(
            f"{metrics['truncated_fraction']:.0%} of pairs are longer than truncation_chars={truncation_chars}; "
            "training at that length would truncate them."
        )
    if since and unpartitioned:
        out.append(
            f"{len(unpartitioned)} file(s) are in no date=YYYY-MM-DD partition and were read despite "
            f"since={since}: {', '.join(unpartitioned[:5])}"
        )
    for warning in out:
        log.warning("%s", warning)
    return out


__all__ = [
    "PREFERENCE_REASONS",
    "REASONS_BY_FORMAT",
    "DataFormatError",
    "RejectedFractionError",
    "import_preferences",
]
