"""Content rules for normalised rows, run as a great-expectations suite, and the HTML validation report.

The rules run over a pandas frame of computed columns (trimmed lengths, duplicate and identical-pair flags), one
frame row per normalised row, in an ephemeral GE context. Results are requested with ``result_format=COMPLETE``
so each failing expectation's ``unexpected_index_list`` maps straight back to rows; every expectation carries the
rejection reason it stands for in its ``meta``. great-expectations is imported lazily (it takes seconds to load),
with its progress bars and analytics off.
"""

from __future__ import annotations

import html
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.data.records import text_length
from preftune.report import html as reports

log = logging.getLogger(__name__)


def content_reasons(fields: Sequence[str]) -> tuple[str, ...]:
    """The rejection reasons the suite can give for these text fields (plus pair rules where they apply)."""
    reasons = [f"{kind}:{f}" for kind in ("empty", "too_short", "too_long") for f in fields]
    if "chosen" in fields:
        reasons.append("identical_pair")
    reasons.append("duplicate")
    return tuple(reasons)


@dataclass
class ExpectationOutcome:
    """One expectation's result, reduced to what the report and the importer need."""

    expectation: str
    column: str
    reason: str
    description: str
    failure: str
    success: bool
    evaluated: int
    unexpected: int
    rows: list[int] = field(default_factory=list)
    observed: Any = None


@dataclass
class ValidationOutcome:
    """Per-row rejection reasons (aligned with the rows validated; empty list = accepted) and suite results."""

    reasons: list[list[str]]
    expectations: list[ExpectationOutcome]
    success: bool
    seconds: float
    import_seconds: float = 0.0
    results: dict[str, Any] = field(repr=False, default_factory=dict)

    def counts(self) -> Counter[str]:
        """How many rows each reason rejected."""
        return Counter(reason for row in self.reasons for reason in row)

    def failures(self) -> dict[str, str]:
        """What a row failing each reason's rule is told (``reason -> failure text``)."""
        return {e.reason: e.failure for e in self.expectations}


def _frame(rows: Sequence[Mapping[str, Any]], fields: Sequence[str]) -> Any:
    """Computed columns: ``<field>_chars`` (trimmed length), ``is_duplicate`` (an earlier row had this id) and,
    for pairs, ``identical_pair`` (chosen and rejected are the same text once trimmed)."""
    import pandas as pd

    seen: set[str] = set()
    data: dict[str, list[Any]] = {"id": [], "is_duplicate": []}
    for f in fields:
        data[f"{f}_chars"] = []
    pairs = "chosen" in fields
    if pairs:
        data["identical_pair"] = []
    for row in rows:
        data["id"].append(row["id"])
        data["is_duplicate"].append(row["id"] in seen)
        seen.add(row["id"])
        for f in fields:
            data[f"{f}_chars"].append(text_length(row[f]))
        if pairs:
            data["identical_pair"].append(row["chosen"].strip() == row["rejected"].strip())
    frame = pd.DataFrame(data)
    for f in fields:
        frame[f"{f}_chars"] = frame[f"{f}_chars"].astype("int64")
    return frame


def text_specs(
    field: str, min_column: str, max_column: str, min_chars: int, max_chars: int
) -> list[tuple[Any, str, str, str]]:
    """Length rules for one text field: not empty and at least ``min_chars`` (on ``min_column``, the shortest
    text when a row holds several) and at most ``max_chars`` (on ``max_column``, the longest)."""
    import great_expectations.expectations as gxe

    specs: list[tuple[Any, str, str, str]] = [
        (
            gxe.ExpectColumnValuesToBeBetween(column=min_column, min_value=1),
            f"empty:{field}",
            f"{field} is not empty",
            f"{field} is empty",
        )
    ]
    if min_chars > 1:
        specs.append(
            (
                gxe.ExpectColumnValuesToBeBetween(
                    column=min_column,
                    min_value=min_chars,
                    row_condition=f"{min_column} > 0",
                    condition_parser="pandas",
                ),
                f"too_short:{field}",
                f"{field} has at least {min_chars} characters",
                f"{field} has fewer than {min_chars} characters",
            )
        )
    specs.append(
        (
            gxe.ExpectColumnValuesToBeBetween(column=max_column, max_value=max_chars),
            f"too_long:{field}",
            f"{field} has at most {max_chars} characters",
            f"{field} has more than {max_chars} characters",
        )
    )
    return specs


def _flag(
    column: str, reason: str, description: str, failure: str, mostly: float | None = None
) -> tuple[Any, str, str, str]:
    """A rule that a boolean column is False everywhere (``mostly``: on at least that share of rows)."""
    import great_expectations.expectations as gxe

    kwargs: dict[str, Any] = {"column": column, "value_set": [False]}
    if mostly is not None:
        kwargs["mostly"] = mostly
    return (gxe.ExpectColumnValuesToBeInSet(**kwargs), reason, description, failure)


def _specs(fields: Sequence[str], min_chars: int, max_chars: int) -> list[tuple[Any, str, str, str]]:
    """(expectation, reason, rule description, failure text) for each rule of the suite."""
    specs: list[tuple[Any, str, str, str]] = []
    for f in fields:
        specs.extend(text_specs(f, f"{f}_chars", f"{f}_chars", min_chars, max_chars))
    if "chosen" in fields:
        specs.append(
            _flag(
                "identical_pair",
                "identical_pair",
                "chosen and rejected differ",
                "chosen and rejected are the same text",
            )
        )
    specs.append(
        _flag(
            "is_duplicate",
            "duplicate",
            "no row repeats an earlier row's id (the first is kept)",
            "same id as an earlier row",
        )
    )
    return specs


def _quiet() -> None:
    """GE logs hundreds of INFO lines while importing; keep its logger at WARNING unless a user set it."""
    logger = logging.getLogger("great_expectations")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def _context() -> Any:
    """An in-memory GE context with analytics and progress bars off (no files, no network, no noise)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_suite(
    name: str, rows: Sequence[Mapping[str, Any]], fields: Sequence[str], *, min_chars: int, max_chars: int
) -> ValidationOutcome:
    """Run the content suite for ``fields`` over normalised rows; see :func:`validate_sft`."""
    started = time.perf_counter()
    _quiet()
    import great_expectations  # noqa: F401  (timed apart from the suite: loading it takes seconds)

    imported = time.perf_counter()
    return run_frame(
        name, _frame(rows, fields), _specs(fields, min_chars, max_chars), import_seconds=imported - started
    )


def run_frame(
    name: str, frame: Any, specs: Sequence[tuple[Any, str, str, str]], *, import_seconds: float = 0.0
) -> ValidationOutcome:
    """Run ``specs`` (expectation, reason, description, failure) over a pandas frame, one frame row per data row.

    A spec whose reason is ``""`` is reported but rejects no row (a share of truncated pairs, label balance).
    """
    started = time.perf_counter()
    _quiet()
    import great_expectations as gx

    imported = time.perf_counter()
    context = _context()
    batch_definition = (
        context.data_sources.add_pandas("rows")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation, reason, description, failure in specs:
        expectation.meta = {"reason": reason, "description": description, "failure": failure}
        suite.add_expectation(expectation)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    reasons: list[list[str]] = [[] for _ in range(len(frame))]
    outcomes = []
    for res in result.results:
        config = res.expectation_config
        reason = config.meta["reason"]
        if res.exception_info and res.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"validation rule {config.meta['description']!r} failed to run: "
                f"{res.exception_info.get('exception_message')}"
            )
        indices = [int(i) for i in res.result.get("unexpected_index_list") or []]
        if reason:
            for i in indices:
                reasons[i].append(reason)
        outcomes.append(
            ExpectationOutcome(
                expectation=config.type,
                column=config.kwargs.get("column", ""),
                reason=reason,
                description=config.meta["description"],
                failure=config.meta["failure"],
                success=bool(res.success),
                evaluated=int(res.result.get("element_count") or len(frame)),
                unexpected=int(res.result.get("unexpected_count") or 0),
                rows=indices,
                observed=res.result.get("observed_value"),
            )
        )
    finished = time.perf_counter()
    log.debug("great-expectations: import %.1fs, suite %.1fs", imported - started, finished - imported)
    return ValidationOutcome(
        reasons=reasons,
        expectations=outcomes,
        success=bool(result.success),
        seconds=finished - imported,
        import_seconds=import_seconds + imported - started,
        results=json.loads(json.dumps(result.describe_dict(), default=str)),
    )


def validate_sft(
    rows: Sequence[Mapping[str, Any]], *, min_chars: int = 1, max_chars: int = 8000
) -> ValidationOutcome:
    """Content rules for normalised SFT rows: prompt and completion non-empty and within ``[min_chars,
    max_chars]`` trimmed characters each; a repeated id is a duplicate (the first is kept, later ones rejected)."""
    return run_suite("sft", rows, ("prompt", "completion"), min_chars=min_chars, max_chars=max_chars)


def validate_preferences(
    rows: Sequence[Mapping[str, Any]], *, min_chars: int = 1, max_chars: int = 8000
) -> ValidationOutcome:
    """Content rules for normalised preference pairs: the SFT rules for prompt, chosen and rejected, plus chosen
    differs from rejected, and a repeated (prompt, chosen, rejected) is a duplicate (the first is kept)."""
    return run_suite(
        "preferences", rows, ("prompt", "chosen", "rejected"), min_chars=min_chars, max_chars=max_chars
    )


#: Rejection reasons of the pair suite (any feedback format).
PAIR_REASONS = (*content_reasons(("prompt", "chosen", "rejected")), "contradiction")
#: Share of pairs that may exceed ``truncation_chars`` before the report warns.
TRUNCATION_MOSTLY = 0.9
#: Label balance outside [LABEL_BALANCE, 1 - LABEL_BALANCE] up-votes is reported as extreme.
LABEL_BALANCE = 0.1


def _pair_frame(pairs: Sequence[Mapping[str, Any]], truncation_chars: int) -> Any:
    """Pair columns: trimmed lengths, identical / duplicate / contradiction flags, and ``truncated`` (prompt plus
    the longer answer exceed ``truncation_chars``; never when it is 0)."""
    import pandas as pd

    from preftune.data.records import record_id

    ids = {p["id"] for p in pairs}
    seen: set[str] = set()
    data: dict[str, list[Any]] = {
        k: []
        for k in (
            "id",
            "prompt_chars",
            "chosen_chars",
            "rejected_chars",
            "identical_pair",
            "is_duplicate",
            "is_contradiction",
            "truncated",
        )
    }
    for p in pairs:
        lengths = [text_length(p[f]) for f in ("prompt", "chosen", "rejected")]
        reverse = record_id({"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]})
        data["id"].append(p["id"])
        data["prompt_chars"].append(lengths[0])
        data["chosen_chars"].append(lengths[1])
        data["rejected_chars"].append(lengths[2])
        data["identical_pair"].append(p["chosen"].strip() == p["rejected"].strip())
        data["is_duplicate"].append(p["id"] in seen)
        data["is_contradiction"].append(p["chosen"] != p["rejected"] and reverse in ids)
        data["truncated"].append(truncation_chars > 0 and lengths[0] + max(lengths[1:]) > truncation_chars)
        seen.add(p["id"])
    frame = pd.DataFrame(data)
    for column in ("prompt_chars", "chosen_chars", "rejected_chars"):
        frame[column] = frame[column].astype("int64")
    for column in ("identical_pair", "is_duplicate", "is_contradiction", "truncated"):
        frame[column] = frame[column].astype("bool")
    return frame


def validate_pairs(
    pairs: Sequence[Mapping[str, Any]],
    *,
    min_chars: int = 1,
    max_chars: int = 8000,
    truncation_chars: int = 0,
) -> ValidationOutcome:
    """The pair suite, for pairs of every feedback format: prompt / chosen / rejected non-empty and within
    ``[min_chars, max_chars]``; chosen differs from rejected; a repeated pair is a ``duplicate`` (the first is
    kept); a pair whose reverse (same prompt, answers swapped) is also present is a ``contradiction`` (all such
    pairs are rejected). Reported only: the share of pairs longer than ``truncation_chars`` (prompt plus the
    longer answer), a warning when more than 10% are."""
    specs = []
    for f in ("prompt", "chosen", "rejected"):
        specs.extend(text_specs(f, f"{f}_chars", f"{f}_chars", min_chars, max_chars))
    specs += [
        _flag(
            "identical_pair",
            "identical_pair",
            "chosen and rejected differ",
            "chosen and rejected are the same text",
        ),
        _flag(
            "is_duplicate",
            "duplicate",
            "no pair repeats an earlier pair (the first is kept)",
            "same pair as an earlier row",
        ),
        _flag(
            "is_contradiction",
            "contradiction",
            "no pair is contradicted by its reverse (b over a for the same prompt)",
            "another row prefers the opposite answer for the same prompt",
        ),
    ]
    if truncation_chars > 0:
        specs.append(
            _flag(
                "truncated",
                "",
                f"at least {TRUNCATION_MOSTLY:.0%} of pairs fit in truncation_chars={truncation_chars} "
                "(prompt + longer answer)",
                f"longer than truncation_chars={truncation_chars}: training would truncate it",
                mostly=TRUNCATION_MOSTLY,
            )
        )
    return run_frame("pairs", _pair_frame(pairs, truncation_chars), specs)


def row_reasons(fmt: str) -> tuple[str, ...]:
    """Rejection reasons of the row suite of a ranked / rating / binary import."""
    field = "responses" if fmt == "ranked" else "response"
    reasons = [f"{kind}:{f}" for f in ("prompt", field) for kind in ("empty", "too_short", "too_long")]
    if fmt == "rating":
        reasons.append("nonfinite:score")
    return tuple(reasons)


def validate_rows(
    fmt: str, items: Sequence[Any], *, min_chars: int = 1, max_chars: int = 8000
) -> ValidationOutcome:
    """The row suite for formats whose rows are not pairs yet (``ranked``, ``rating``, ``binary``): prompt and
    response(s) non-empty and within ``[min_chars, max_chars]`` (for a ranked list: every response), scores
    finite (``nonfinite:score``). Reported only: label balance of binary feedback (warns outside 10%-90% up)."""
    import pandas as pd

    ranked = fmt == "ranked"
    field = "responses" if ranked else "response"
    data: dict[str, list[Any]] = {"prompt_chars": [], f"{field}_min_chars": [], f"{field}_max_chars": []}
    if fmt == "rating":
        data["score_nonfinite"] = []
    if fmt == "binary":
        data["label_up"] = []
    for item in items:
        lengths = [text_length(r) for r in item.responses] if ranked else [text_length(item.response)]
        data["prompt_chars"].append(text_length(item.prompt))
        data[f"{field}_min_chars"].append(min(lengths))
        data[f"{field}_max_chars"].append(max(lengths))
        if fmt == "rating":
            data["score_nonfinite"].append(not math.isfinite(item.value))
        if fmt == "binary":
            data["label_up"].append(int(item.value))
    frame = pd.DataFrame(data)
    for column in ("prompt_chars", f"{field}_min_chars", f"{field}_max_chars"):
        frame[column] = frame[column].astype("int64")
    specs = text_specs("prompt", "prompt_chars", "prompt_chars", min_chars, max_chars)
    specs += text_specs(field, f"{field}_min_chars", f"{field}_max_chars", min_chars, max_chars)
    if fmt == "rating":
        frame["score_nonfinite"] = frame["score_nonfinite"].astype("bool")
        specs.append(
            _flag(
                "score_nonfinite", "nonfinite:score", "scores are finite numbers", "score is NaN or infinite"
            )
        )
    if fmt == "binary" and len(frame):
        import great_expectations.expectations as gxe

        frame["label_up"] = frame["label_up"].astype("int64")
        specs.append(
            (
                gxe.ExpectColumnMeanToBeBetween(
                    column="label_up", min_value=LABEL_BALANCE, max_value=1 - LABEL_BALANCE
                ),
                "",
                f"label balance: between {LABEL_BALANCE:.0%} and {1 - LABEL_BALANCE:.0%} of rows are up-votes",
                "the labels are extremely unbalanced",
            )
        )
    return run_frame(f"{fmt}_rows", frame, specs)


def combine(outcomes: Sequence[ValidationOutcome]) -> ValidationOutcome:
    """Several suites' results as one, for the report (expectations listed in order; row reasons not merged)."""
    return ValidationOutcome(
        reasons=[r for o in outcomes for r in o.reasons],
        expectations=[e for o in outcomes for e in o.expectations],
        success=all(o.success for o in outcomes),
        seconds=sum(o.seconds for o in outcomes),
        import_seconds=sum(o.import_seconds for o in outcomes),
        results={"suites": [o.results for o in outcomes]},
    )


def reason_counts(rejected: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """How many rejected-row records (``reasons`` lists) each reason applies to."""
    return Counter(reason for r in rejected for reason in r["reasons"])


def _preview(record: Any, limit: int = 300) -> str:
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _warnings_section(warnings: Sequence[str]) -> tuple[str, str]:
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return ("Warnings", f"<ul>{items}</ul>")


def _rejections_section(counts: Counter[str]) -> tuple[str, str]:
    if not counts:
        return ("Rejections by reason", "<p>No row was rejected.</p>")
    chart = reports.bar_chart(dict(counts.most_common()), "Rejected rows by reason", "rows")
    table = reports.table([{"reason": k, "rows": v} for k, v in counts.most_common()], ["reason", "rows"])
    return ("Rejections by reason", chart + table)


def _expectation_row(e: ExpectationOutcome) -> dict[str, Any]:
    return {
        "expectation": e.expectation,
        "column": e.column,
        "rule": e.description,
        "reason": e.reason or "(reported only)",
        "success": e.success,
        "evaluated": e.evaluated,
        "unexpected": e.unexpected,
        **({"observed": _preview(e.observed, 60)} if e.observed is not None else {}),
    }


def _expectations_section(outcome: ValidationOutcome, suite_note: str | None) -> tuple[str, str]:
    """Each rule with its result, which rows the suite saw, and how long it took."""
    columns = ["expectation", "column", "rule", "reason", "success", "evaluated", "unexpected", "observed"]
    note = (
        suite_note or f"The suite ran over the {len(outcome.reasons)} rows that could be read and normalised."
    )
    body = (
        reports.table([_expectation_row(e) for e in outcome.expectations], columns)
        + f"<p>{html.escape(note)}</p>"
        + f"<p>Validation took {outcome.seconds:.1f} s (loading great-expectations: "
        f"{outcome.import_seconds:.1f} s).</p>"
    )
    return ("Expectations (great-expectations suite)", body)


def _samples_section(rejected: Sequence[Mapping[str, Any]], samples: int) -> tuple[str, str]:
    """Up to ``samples`` rejected rows per reason, reasons in alphabetical order."""
    by_reason: dict[str, list[Mapping[str, Any]]] = {}
    for r in rejected:
        for reason in r["reasons"]:
            by_reason.setdefault(reason, []).append(r)
    rows = [
        {
            "reason": reason,
            "file": r["file"],
            "row": r["row"],
            "detail": r.get("detail") or "",
            "record": _preview(r["record"]),
        }
        for reason, items in sorted(by_reason.items())
        for r in items[:samples]
    ]
    return (
        f"Sample rejected rows (up to {samples} per reason; all are in the rejected-rows artifact)",
        reports.table(rows, ["reason", "file", "row", "detail", "record"]),
    )


def render_report(
    title: str,
    *,
    source: str,
    metrics: Mapping[str, float],
    parameters: Mapping[str, Any],
    outcome: ValidationOutcome,
    rejected: Sequence[Mapping[str, Any]],
    skipped_files: Sequence[str] = (),
    samples: int = 10,
    warnings: Sequence[str] = (),
    sections_after: Sequence[tuple[str, str]] = (),
    suite_note: str | None = None,
) -> str:
    """The validation report as one self-contained HTML page (Kubeflow shows it in a sandboxed iframe).

    ``rejected`` are rejected-row records (``file``, ``row``, ``reasons``, optional ``detail``, ``record``).
    ``warnings`` are shown first (say, extreme label balance); ``sections_after`` are extra (title, HTML)
    sections placed after the summary; ``suite_note`` replaces the sentence under the expectations table.
    """
    summary = {
        "source": source,
        **parameters,
        **{k: v for k, v in metrics.items() if not k.startswith("rejected_")},
    }
    sections: list[tuple[str, str]] = [_warnings_section(warnings)] if warnings else []
    sections += [
        ("Summary", reports.key_values(summary)),
        *sections_after,
        _rejections_section(reason_counts(rejected)),
        _expectations_section(outcome, suite_note),
        _samples_section(rejected, samples),
    ]
    if skipped_files:
        sections.append(
            (
                "Files not read (hidden, or not jsonl / json / csv / tsv / parquet)",
                reports.table([{"file": f} for f in skipped_files], ["file"]),
            )
        )
    return reports.page(title, sections, intro=f"Validation of {source}.")
