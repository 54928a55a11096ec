"""End to end: a newcomer's first `preftune run dpo`, with every default: a short output with step counters and
the index's path, and an index that opens in a browser and leads to every report."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from e2e import PREFTUNE

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def _path(href: str) -> Path:
    return Path(unquote(urlparse(href).path))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("first-run") / "runs"
    done = subprocess.run(
        [PREFTUNE, "run", "dpo", "--pipeline-root", str(root)], capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = root.glob("preftune-dpo-*")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {"stdout": done.stdout, "stderr": done.stderr, "run_dir": run_dir, "summary": summary}


@pytest.mark.slow
def test_a_default_run_prints_a_short_account_with_step_counters(first_run: dict) -> None:
    lines = first_run["stdout"].splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    counters = [line for line in lines if re.match(r"\[\d+/\d+\] \S+ \.\.\. ", line)]
    ran = [name for name, step in first_run["summary"]["steps"].items() if step["status"] != "SKIPPED"]
    assert len(counters) == len(ran)
    total = int(counters[0].split("/")[1].split("]")[0])
    assert [line.split("]")[0] for line in counters] == [f"[{k}/{total}" for k in range(1, len(ran) + 1)]
    assert any(
        re.match(r"\[\d+/\d+\] dpo \.\.\. \d+ s|\[\d+/\d+\] dpo \.\.\. \d+ min", line) for line in lines
    )
    index = first_run["run_dir"] / "index.html"
    assert f"reports:       {index}" in first_run["stdout"]
    # no executor JSON, no tracebacks, no warnings that do not apply to a local run
    assert '"executor_input"' not in first_run["stdout"] and "Traceback" not in first_run["stdout"]
    assert "have no effect in the current local runner" not in first_run["stdout"] + first_run["stderr"]
    assert "is_gradient_checkpointing" not in first_run["stdout"] + first_run["stderr"]
    assert (first_run["run_dir"] / "logs" / "dpo.log").stat().st_size > 0  # everything else is in the logs


@pytest.mark.slow
def test_the_run_index_opens_in_chromium_and_links_to_every_report(first_run: dict) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium package is needed (make test installs it)"
    run_dir, summary = first_run["run_dir"], first_run["summary"]
    expected = {
        name
        for name, step in summary["steps"].items()
        if "system.HTML" in step.get("artifact_types", {}).values()
    }
    assert {"ingest", "preference-import", "sft", "dpo", "evaluate", "gate"} <= expected
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto((run_dir / "index.html").as_uri())
            assert page.title().startswith("preftune-dpo run ")
            links = page.eval_on_selector_all("a", "els => els.map(e => [e.textContent, e.href])")
            reports = sorted({href for text, href in links if text.endswith("report")})
            visited = {}
            for href in reports:
                page.goto(href)
                # rendered as a page (a heading and, where there are charts, decoded images), not as text
                visited[href] = (page.title(), page.locator("h1").count(), page.evaluate(
                    "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
                ))  # fmt: skip
        finally:
            browser.close()
    reached = {_path(href).stem for href in reports}
    assert reached == expected
    for href, (title, headings, images_ok) in visited.items():
        assert title and headings >= 1 and images_ok, (href, title)
    metric_links = [href for text, href in links if text == "metrics"]
    assert metric_links and all(json.loads(_path(h).read_text()) for h in metric_links)
