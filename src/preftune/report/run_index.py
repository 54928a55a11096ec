"""``index.html`` of a local run: every step with its status, metrics and links to its reports and artifacts.

KFP's local runner names each output after the component's output, so an HTML report is a file called
``report`` with no extension, which a browser shows as text. The index therefore links to a copy of every HTML
artifact under ``<run dir>/reports/<step>.html`` (a hard link where the file system allows it), and to every
other artifact as it is. Links are relative, so a run directory can be moved or archived whole; artifacts a
step took from the cache of an earlier run are linked where that run keeps them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from preftune.report.html import escape, key_values, page, table, write

INDEX = "index.html"
REPORTS = "reports"
HTML_TYPE = "system.HTML"
_STATUS_CLASS = {"SUCCEEDED": "ok", "FAILED": "bad", "INTERRUPTED": "bad"}


def _link(target: Path, base: Path, text: str) -> str:
    href = quote(os.path.relpath(target, base).replace(os.sep, "/"))
    return f"<a href='{href}'>{escape(text)}</a>"


def _publish_report(source: Path, dest: Path) -> bool:
    """Put an HTML artifact where a browser opens it as a page (``.html``); False when it is not there."""
    if not source.is_file():
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
    return True


def report_pages(summary: Mapping[str, Any], run_dir: Path) -> dict[str, dict[str, Path]]:
    """Publish every HTML artifact of the run as ``reports/<step>[-<output>].html``; by step, then output."""
    pages: dict[str, dict[str, Path]] = {}
    for name, step in summary["steps"].items():
        html_outputs = [k for k, kind in step.get("artifact_types", {}).items() if kind == HTML_TYPE]
        for output in html_outputs:
            uri = step["artifacts"].get(output, "")
            if not uri or "://" in uri:
                continue
            stem = name if len(html_outputs) == 1 else f"{name}-{output}"
            dest = run_dir / REPORTS / f"{stem}.html"
            if _publish_report(Path(uri), dest):
                pages.setdefault(name, {})[output] = dest
    return pages


def _status(status: str) -> str:
    css = _STATUS_CLASS.get(status)
    return f"<span class='{css}'>{escape(status)}</span>" if css else escape(status)


def _artifact_links(step: Mapping[str, Any], pages: Mapping[str, Path], run_dir: Path) -> str:
    links = [_link(path, run_dir, f"{output} (report)") for output, path in pages.items()]
    for output, uri in step.get("artifacts", {}).items():
        if output in pages or not uri:
            continue
        if "://" in uri:
            links.append(f"{escape(output)}: <code>{escape(uri)}</code>")
        elif Path(uri).exists():  # Metrics live in the table below, not in a file
            links.append(_link(Path(uri), run_dir, output))
    return " &middot; ".join(links) or "<em>(no files)</em>"


def _headline(step: Mapping[str, Any], keys: Sequence[str]) -> str:
    values = [
        (k, step["metrics"][k]) for k in keys if isinstance(step.get("metrics", {}).get(k), int | float)
    ]
    return ", ".join(f"{escape(k)} {v:.4g}" for k, v in values[:4])


def _overview(
    summary: Mapping[str, Any],
    pages: Mapping[str, Mapping[str, Path]],
    run_dir: Path,
    headline: Mapping[str, Sequence[str]],
) -> str:
    rows = []
    for name, step in summary["steps"].items():
        seconds = step.get("seconds")
        note = (
            "cached"
            if step.get("cached")
            else (f"{seconds:.0f} s" if isinstance(seconds, int | float) else "")
        )
        reports = " ".join(_link(p, run_dir, "report") for p in pages.get(name, {}).values())
        rows.append(
            f"<tr><td><a href='#step-{escape(name)}'>{escape(name)}</a></td><td>{escape(step['display_name'])}"
            f"</td><td>{_status(step['status'])}</td><td class='num'>{escape(note)}</td><td>{reports}</td>"
            f"<td>{_headline(step, headline.get(name, []))}</td></tr>"
        )
    head = "<tr><th>step</th><th>what</th><th>status</th><th>time</th><th>report</th><th>headline</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _step_section(name: str, step: Mapping[str, Any], pages: Mapping[str, Path], run_dir: Path) -> str:
    parts = [
        f"<p id='step-{escape(name)}'>{_status(step['status'])} &middot; {escape(step['display_name'])}</p>"
    ]
    if step.get("error"):
        parts.append(f"<p class='bad'>{escape(step['error'])}</p>")
    parts.append(f"<p>{_artifact_links(step, pages, run_dir)}</p>")
    if step.get("log") and Path(step["log"]).exists():
        parts.append(f"<p>{_link(Path(step['log']), run_dir, 'step log')}</p>")
    outputs = {k: v for k, v in step.get("outputs", {}).items() if v not in ("", None)}
    if outputs:
        parts.append(table([{"output": k, "value": v} for k, v in outputs.items()], ["output", "value"]))
    if step.get("metrics"):
        parts.append(key_values(step["metrics"]))
    return "".join(parts)


def write_run_index(
    summary: Mapping[str, Any], run_dir: str | Path, headline: Mapping[str, Sequence[str]] | None = None
) -> Path:
    """Write ``<run dir>/index.html`` (and the ``reports/`` pages it links to); returns its path.

    ``headline`` names, by step, the metrics shown in the overview (every metric is in the step's section)."""
    run_dir = Path(run_dir)
    pages = report_pages(summary, run_dir)
    seconds = summary.get("duration_seconds") or 0
    intro = (
        f"{summary['status']} in {seconds:.0f} s, finished {summary.get('finished', '')}. "
        f"Run directory: {run_dir}"
    )
    sections = [("Steps", _overview(summary, pages, run_dir, headline or {}))]
    for name, step in summary["steps"].items():
        sections.append((name, _step_section(name, step, pages.get(name, {}), run_dir)))
    sections.append(("Parameters", key_values(summary.get("parameters", {}))))
    files = [_link(run_dir / "summary.json", run_dir, "summary.json")]
    if (run_dir / "logs").is_dir():
        files.append(_link(run_dir / "logs", run_dir, "step logs"))
    sections.append(("Files", " &middot; ".join(files)))
    path = run_dir / INDEX
    write(path, page(f"{summary['pipeline']} run {run_dir.name}", sections, intro=intro))
    return path
