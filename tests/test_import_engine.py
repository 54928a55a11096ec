"""The pieces every import shares (preftune.data.ingest) and the frontier's probe, tested on their own."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from preftune.data import formats, records, validation
from preftune.data.ingest import (
    Publication,
    Split,
    add_reason_metrics,
    failure_texts,
    listed,
    place,
    sort_rejected,
    split_or_publish,
)
from preftune.data.readers import RawRow
from preftune.eval.frontier import FrontierProbe, raw_sampling
from preftune.model.sampling import Generations


def _row(prompt: str, n: int = 0) -> dict[str, Any]:
    return {"id": f"{prompt}-{n}", "prompt": [{"role": "user", "content": prompt}], "completion": "c"}


def _publication(tmp_path: Path, metrics: dict[str, float]) -> Publication:
    outcome = validation.ValidationOutcome(reasons=[], expectations=[], success=True, seconds=0.0)
    rejected = [{"file": "a.jsonl", "row": 2, "reasons": ["empty:prompt"], "detail": "d", "record": {}}]
    return Publication(
        title="t",
        source="src",
        rejected_path=str(tmp_path / "rejected.jsonl"),
        report_path=str(tmp_path / "report.html"),
        metrics=metrics,
        parameters={"seed": 0},
        outcome=outcome,
        rejected=rejected,
    )


def test_failure_texts_name_where_the_kept_duplicate_is() -> None:
    failures = {"duplicate": "same id as an earlier row", "empty:prompt": "prompt is empty"}
    texts = failure_texts(["empty:prompt", "duplicate", "odd"], failures, place("data.jsonl", 3))
    assert texts == ["prompt is empty", "same id as an earlier row (data.jsonl, line 3)", "odd"]
    assert place("t.csv", 4) == "t.csv, row 4" and place("t.json", 1) == "t.json, item 1"


def test_reason_metrics_list_known_reasons_first_then_the_others_sorted() -> None:
    metrics: dict[str, float] = {"rows_input": 5}
    add_reason_metrics(
        metrics, ["missing:prompt", "duplicate"], Counter({"zeta": 1, "duplicate": 2, "alpha": 3})
    )
    assert list(metrics.items()) == [
        ("rows_input", 5),
        ("rejected_missing_prompt", 0),
        ("rejected_duplicate", 2),
        ("rejected_alpha", 3),
        ("rejected_zeta", 1),
    ]
    counts = Counter({"b": 1, "a": 3, "c": 2})
    assert listed(counts) == "a: 3, c: 2, b: 1"
    assert listed(counts, 2, " ") == "a 3, c 2"
    assert listed(Counter()) == ""


def test_rejected_rows_sort_in_input_order() -> None:
    files = [("uri/b", "b.jsonl"), ("uri/a", "a.jsonl")]  # listed order, not alphabetical
    rejected = [
        {"file": "a.jsonl", "row": 1},
        {"file": "b.jsonl", "row": 2, "annotation": 2},
        {"file": "b.jsonl", "row": 2, "annotation": 1},
        {"file": "b.jsonl", "row": 1},
    ]
    sort_rejected(rejected, files)
    assert [(r["file"], r["row"], r.get("annotation")) for r in rejected] == [
        ("b.jsonl", 1, None),
        ("b.jsonl", 2, 1),
        ("b.jsonl", 2, 2),
        ("a.jsonl", 1, None),
    ]


def test_split_keeps_prompts_apart_and_counts_them(tmp_path: Path) -> None:
    rows = [_row(p, n) for p in ("p1", "p2", "p3", "p4") for n in range(2)]
    split = split_or_publish(rows, 0.25, 0, "unused", _publication(tmp_path, {}))
    assert len(split.train) + len(split.held) == 8 and len(split.held) == 2
    assert {r["prompt"][0]["content"] for r in split.held}.isdisjoint(
        r["prompt"][0]["content"] for r in split.train
    )
    assert split.metrics() == {"rows_train": 6, "rows_eval": 2, "prompts_train": 3, "prompts_eval": 1}
    assert not (tmp_path / "report.html").exists(), "a successful split writes nothing yet"
    assert Split([], []).metrics() == {"rows_train": 0, "rows_eval": 0, "prompts_train": 0, "prompts_eval": 0}


@pytest.mark.parametrize(
    ("rows", "match"), [([], "nothing usable"), ([_row("only", 0), _row("only", 1)], "cannot hold out")]
)
def test_a_failed_split_writes_rejections_and_report_first(
    tmp_path: Path, rows: list[dict[str, Any]], match: str
) -> None:
    publication = _publication(tmp_path, {"rows_input": 3})
    with pytest.raises(ValueError, match=match):
        split_or_publish(rows, 0.5, 0, "nothing usable", publication)
    written = [json.loads(x) for x in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert written == publication.rejected
    html = (tmp_path / "report.html").read_text()
    assert "<h1>t</h1>" in html and "rows_input" in html and "empty:prompt" in html


def test_missing_value_names_field_and_reason() -> None:
    error = records.missing_value("f.csv", 7, "score")
    assert (str(error), error.reason, error.field) == (
        "f.csv, row 7, field 'score': missing value",
        "missing:score",
        "score",
    )


def test_ranked_row_reports_every_problem() -> None:
    raw = RawRow("r.jsonl", 4, {"prompt": None, "responses": ["a", 5, "c"], "ranks": [1, "x", 3]})
    with pytest.raises(records.RowError) as info:
        formats.normalize_ranked(raw, 0)
    assert info.value.reasons == ["missing:prompt", "invalid:responses", "invalid:ranks"]
    assert "response 2:" in str(info.value)
    ok = formats.normalize_ranked(
        RawRow("r.jsonl", 5, {"prompt": "P", "responses": '["a", "b"]', "ranks": [2, 1]}), 3
    )
    assert (ok.unit, ok.responses, ok.ranks, ok.source) == (
        3,
        ["a", "b"],
        [2.0, 1.0],
        {"file": "r.jsonl", "row": 5},
    )


class _Judge:
    def __init__(self) -> None:
        self.calls = 0

    def score(self, prompts: list[Any], texts: list[str]) -> list[float]:
        self.calls += 1
        return [float(len(t)) for t in texts]


class _Pairs:
    def score(self, policy: Any) -> dict[str, float]:
        raise AssertionError("known values must not be measured again")


def test_frontier_probe_reuses_what_is_known() -> None:
    samples = Generations(
        prompt_ids=[[1], [2]], response_ids=[[3], [4]], texts=["ab", "abcd"], lengths=[2, 4]
    )
    sampling = {"temperature": 0.7, "top_p": 0.9, "batch_size": 2}
    assert raw_sampling(sampling) == {"temperature": 1.0, "top_p": 1.0, "batch_size": 2}
    judge = _Judge()
    probe = FrontierProbe(None, None, [[], []], ["p1", "p2"], sampling, judge=judge, pairs=_Pairs())  # type: ignore[arg-type]
    reference = probe.point(object(), label="reference", step=0, samples=samples, is_reference=True)
    assert reference == {
        "label": "reference",
        "step": 0,
        "kl": 0.0,
        "kl_per_token": 0.0,
        "mean_length": 3.0,
        "reward": 3.0,
    }
    known = {"kl": 0.5, "kl_per_token": 0.25, "implicit_reward_accuracy": 0.75}
    final = probe.point(object(), label="final", step=9, samples=samples, known=known)
    assert (final["kl"], final["kl_per_token"], final["implicit_reward_accuracy"]) == (0.5, 0.25, 0.75)
    assert judge.calls == 2
