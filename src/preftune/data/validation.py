"""The HTML validation report of an import, rendered from its suites' validation results.

One self-contained page (Kubeflow shows it in a sandboxed iframe): warnings first, the summary (source,
parameters, metrics), sections the import adds (files and formats, pairs), rejections by reason, every
expectation with its result -- which rows it judged and who judged them (:mod:`checkpoints`) -- and samples of
rejected rows.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from preftune.data.checkpoints import RuleResult, SuiteResult
from preftune.data.suites import LABEL_BALANCE, TRUNCATION_MOSTLY
from preftune.report import html as reports

__all__ = ["LABEL_BALANCE", "TRUNCATION_MOSTLY", "reason_counts", "render_report"]


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


def _rule_row(suite: str, r: RuleResult) -> dict[str, Any]:
    return {
        "suite": suite,
        "expectation": r.expectation,
        "column": r.column,
        "rule": r.description,
        "reason": r.reason or "(reported only)",
        "success": r.success,
        "evaluated": r.evaluated,
        "unexpected": r.unexpected,
        "judged": r.scope,
        **({"observed": _preview(r.observed, 60)} if r.observed is not None else {}),
    }


def _expectations_section(
    suites: Sequence[tuple[str, SuiteResult]], import_seconds: float, note: str
) -> tuple[str, str]:
    """Each rule with its result, which rows it judged, and how long validation took."""
    columns = [
        "suite",
        "expectation",
        "column",
        "rule",
        "reason",
        "success",
        "evaluated",
        "unexpected",
        "judged",
    ]
    rows = [_rule_row(label, rule) for label, result in suites for rule in result.rules]
    if any("observed" in r for r in rows):
        columns.append("observed")
    seconds = sum(result.seconds for _, result in suites)
    loading = (
        f"loading great-expectations: {import_seconds:.1f} s"
        if import_seconds
        else "great-expectations was already loaded"
    )
    body = (
        reports.table(rows, columns)
        + (f"<p>{html.escape(note)}</p>" if note else "")
        + f"<p>Validation took {seconds:.1f} s ({html.escape(loading)}). Suites ran through great-expectations "
        "Checkpoints; the suites are in the expectation_suite artifact.</p>"
    )
    return ("Expectations (great-expectations suites)", body)


def _samples_section(samples: Mapping[str, Sequence[Mapping[str, Any]]], limit: int) -> tuple[str, str]:
    """Up to ``limit`` rejected rows per reason, reasons in alphabetical order."""
    rows = [
        {
            "reason": reason,
            "file": r["file"],
            "row": r["row"],
            "detail": r.get("detail") or "",
            "record": _preview(r["record"]),
        }
        for reason, items in sorted(samples.items())
        for r in items[:limit]
    ]
    return (
        f"Sample rejected rows (up to {limit} per reason; all are in the rejected-rows artifact)",
        reports.table(rows, ["reason", "file", "row", "detail", "record"]),
    )


def render_report(
    title: str,
    *,
    source: str,
    metrics: Mapping[str, float],
    parameters: Mapping[str, Any],
    suites: Sequence[tuple[str, SuiteResult]],
    counts: Counter[str],
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    import_seconds: float = 0.0,
    skipped_files: Sequence[str] = (),
    limit: int = 10,
    warnings: Sequence[str] = (),
    sections_after: Sequence[tuple[str, str]] = (),
    suite_note: str = "",
) -> str:
    """The validation report as one self-contained HTML page.

    ``counts`` are the rejected rows per reason and ``samples`` some rejected-row records per reason (``file``,
    ``row``, ``reasons``, ``detail``, ``record``). ``warnings`` are shown first; ``sections_after`` are extra
    (title, HTML) sections placed after the summary; ``suite_note`` goes under the expectations table.
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
        _rejections_section(counts),
        _expectations_section(suites, import_seconds, suite_note),
        _samples_section(samples, limit),
    ]
    if skipped_files:
        sections.append(
            (
                "Files not read (hidden, or not jsonl / json / csv / tsv / parquet)",
                reports.table([{"file": f} for f in skipped_files], ["file"]),
            )
        )
    return reports.page(title, sections, intro=f"Validation of {source}.")
