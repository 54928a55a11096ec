"""Self-contained HTML reports for the Kubeflow UI.

Kubeflow shows an HTML artifact in a sandboxed iframe with no access to other files, so every chart is
embedded as a base64 PNG (:mod:`preftune.report.charts`, re-exported here) and every style is inline in the page.
Importing this module costs no plotting library; matplotlib loads with the first chart.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.report.charts import bar_chart, line_chart, scatter_path

__all__ = ["bar_chart", "escape", "key_values", "line_chart", "page", "scatter_path", "table", "write"]

_STYLE = """
body { font-family: -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
pre { white-space: pre-wrap; margin: 0; font-size: 12px; }
.chart { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; }
"""


def escape(value: Any) -> str:
    """HTML-escape any value for a cell or paragraph."""
    return html.escape("" if value is None else str(value))


def _format_cell(value: Any) -> tuple[str, bool]:
    if isinstance(value, bool):
        return ("<span class='ok'>yes</span>" if value else "<span class='bad'>no</span>"), False
    if isinstance(value, float):
        return f"{value:.4g}", True
    if isinstance(value, int):
        return str(value), True
    text = escape(value)
    if "\n" in text or len(text) > 80:
        return f"<pre>{text}</pre>", False
    return text, False


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, max_rows: int = 500
) -> str:
    """An HTML table of dict rows; long texts keep their line breaks."""
    if not rows:
        return "<p><em>(none)</em></p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows[:max_rows]:
        cells = []
        for col in columns:
            text, numeric = _format_cell(row.get(col))
            cells.append(f"<td class='num'>{text}</td>" if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p><em>{len(rows) - max_rows} more rows not shown.</em></p>" if len(rows) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def key_values(values: Mapping[str, Any]) -> str:
    """A two-column table of names and values (metrics, parameters)."""
    return table([{"name": k, "value": v} for k, v in values.items()], ["name", "value"])


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A full HTML page: a title, an optional intro paragraph, then (heading, html body) sections."""
    parts = [f"<h1>{escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{escape(intro)}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{escape(heading)}</h2>{body}")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "".join(parts)
        + "</body></html>"
    )


def write(path: str | Path, content: str) -> None:
    """Write a report where a KFP HTML artifact expects it (its path is a file)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content, encoding="utf-8")
