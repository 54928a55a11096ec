"""Content rules for normalised rows, run as a great-expectations suite, and the HTML validation report.

The rules run over a pandas frame of computed columns (trimmed lengths, duplicate and identical-pair flags), one
frame row per normalised row, in an ephemeral GE context. Results are requested with ``result_format=COMPLETE``
so each failing expectation's ``unexpected_index_list`` maps straight back to rows; every expectation carries the
rejection reason it stands for in its ``meta``. great-expectations is imported lazily (it takes seconds to load),
with its progress bars and analytics off.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune import reports
from preftune.data.records import text_length

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


def _specs(fields: Sequence[str], min_chars: int, max_chars: int) -> list[tuple[Any, str, str, str]]:
    """(expectation, reason, rule description, failure text) for each rule of the suite."""
    import great_expectations.expectations as gxe

    specs: list[tuple[Any, str, str, str]] = []
    for f in fields:
        column = f"{f}_chars"
        specs.append(
            (
                gxe.ExpectColumnValuesToBeBetween(column=column, min_value=1),
                f"empty:{f}",
                f"{f} is not empty",
                f"{f} is empty",
            )
        )
        if min_chars > 1:
            specs.append(
                (
                    gxe.ExpectColumnValuesToBeBetween(
                        column=column,
                        min_value=min_chars,
                        row_condition=f"{column} > 0",
                        condition_parser="pandas",
                    ),
                    f"too_short:{f}",
                    f"{f} has at least {min_chars} characters",
                    f"{f} has fewer than {min_chars} characters",
                )
            )
        specs.append(
            (
                gxe.ExpectColumnValuesToBeBetween(column=column, max_value=max_chars),
                f"too_long:{f}",
                f"{f} has at most {max_chars} characters",
                f"{f} has more than {max_chars} characters",
            )
        )
    if "chosen" in fields:
        specs.append(
            (
                gxe.ExpectColumnValuesToBeInSet(column="identical_pair", value_set=[False]),
                "identical_pair",
                "chosen and rejected differ",
                "chosen and rejected are the same text",
            )
        )
    specs.append(
        (
            gxe.ExpectColumnValuesToBeInSet(column="is_duplicate", value_set=[False]),
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
    import great_expectations as gx

    imported = time.perf_counter()
    frame = _frame(rows, fields)
    context = _context()
    batch_definition = (
        context.data_sources.add_pandas("rows")
        .add_dataframe_asset(name)
        .add_batch_definition_whole_dataframe(name)
    )
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    specs = _specs(fields, min_chars, max_chars)
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
                f"validation rule {reason!r} failed to run: {res.exception_info.get('exception_message')}"
            )
        indices = [int(i) for i in res.result.get("unexpected_index_list") or []]
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
                evaluated=int(res.result.get("element_count") or 0),
                unexpected=int(res.result.get("unexpected_count") or 0),
                rows=indices,
            )
        )
    finished = time.perf_counter()
    log.debug("great-expectations: import %.1fs, suite %.1fs", imported - started, finished - imported)
    return ValidationOutcome(
        reasons=reasons,
        expectations=outcomes,
        success=bool(result.success),
        seconds=finished - imported,
        import_seconds=imported - started,
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


def _preview(record: Any, limit: int = 300) -> str:
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
) -> str:
    """The validation report as one self-contained HTML page (Kubeflow shows it in a sandboxed iframe).

    ``rejected`` are rejected-row records (``file``, ``row``, ``reasons``, optional ``detail``, ``record``).
    """
    counts = Counter(reason for r in rejected for reason in r["reasons"])
    summary = {
        "source": source,
        **parameters,
        **{k: v for k, v in metrics.items() if not k.startswith("rejected_")},
    }
    sections: list[tuple[str, str]] = [("Summary", reports.key_values(summary))]
    if counts:
        chart = reports.bar_chart(dict(counts.most_common()), "Rejected rows by reason", "rows")
        table = reports.table([{"reason": k, "rows": v} for k, v in counts.most_common()], ["reason", "rows"])
        sections.append(("Rejections by reason", chart + table))
    else:
        sections.append(("Rejections by reason", "<p>No row was rejected.</p>"))
    sections.append(
        (
            "Expectations (great-expectations suite)",
            reports.table(
                [
                    {
                        "expectation": e.expectation,
                        "column": e.column,
                        "rule": e.description,
                        "reason": e.reason,
                        "success": e.success,
                        "evaluated": e.evaluated,
                        "unexpected": e.unexpected,
                    }
                    for e in outcome.expectations
                ]
            )
            + f"<p>The suite ran over the {len(outcome.reasons)} rows that could be read and normalised, in "
            f"{outcome.seconds:.1f} s (loading great-expectations: {outcome.import_seconds:.1f} s).</p>",
        )
    )
    by_reason: dict[str, list[Mapping[str, Any]]] = {}
    for r in rejected:
        for reason in r["reasons"]:
            by_reason.setdefault(reason, []).append(r)
    sample_rows = [
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
    sections.append(
        (
            f"Sample rejected rows (up to {samples} per reason; all are in the rejected-rows artifact)",
            reports.table(sample_rows, ["reason", "file", "row", "detail", "record"]),
        )
    )
    if skipped_files:
        sections.append(
            (
                "Files not read (hidden, or not jsonl / json / csv / tsv / parquet)",
                reports.table([{"file": f} for f in skipped_files], ["file"]),
            )
        )
    return reports.page(title, sections, intro=f"Validation of {source}.")
