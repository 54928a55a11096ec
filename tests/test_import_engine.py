"""The pieces every import shares (preftune.data.importing, spill, checkpoints) and the frontier's probe, tested
on their own."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.data import buckets, checkpoints, formats, records, spill, suites
from preftune.data.importing import (
    Items,
    Rejections,
    Units,
    Wanted,
    add_reason_metrics,
    emit,
    failure_texts,
    listed,
    meta_field,
    place,
    verdict,
    write_rejected,
)
from preftune.data.readers import RawRow
from preftune.data.sources import SourceFile
from preftune.eval.frontier import FrontierProbe, raw_sampling
from preftune.model.sampling import Generations


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


def test_sorted_spill_gives_entries_back_in_key_order_across_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spill, "RUN_ENTRIES", 7)  # several runs on disk plus the buffer
    keys = list(range(50))
    random.Random(0).shuffle(keys)
    entries = spill.SortedSpill(tmp_path, "t")
    for key in keys:
        entries.add(key, f"text {key}\twith a tab")
    assert len(list(tmp_path.glob("t-*.run"))) == 7
    assert list(entries) == [(k, f"text {k}\twith a tab") for k in range(50)]


def _columns(tmp_path: Path, ids: list[int], reverse: list[int]) -> spill.Columns:
    columns = spill.Columns(tmp_path, "t", id="Q", reverse="Q")
    for item_id, back in zip(ids, reverse, strict=True):
        columns.settle()
        columns["id"].append(item_id)
        columns["reverse"].append(back)
    return columns


def test_repeats_and_reverses_are_found_by_hash_bucket(tmp_path: Path) -> None:
    columns = _columns(tmp_path, [5, 3, 5, 9, 3, 5], [1, 9, 7, 4, 5, 2])
    repeats = buckets.Repeats(columns, tmp_path, reverse="reverse")
    repeated, reversed_ = repeats.masks(0, 6)
    assert repeated.tolist() == [False, False, True, False, True, True] and repeats.distinct == 3
    assert [repeats.first(i) for i in range(6)] == [0, 1, 0, 3, 1, 0]
    assert reversed_.tolist() == [False, True, False, False, True, False]


@settings(max_examples=20, deadline=None)
@given(
    ids=st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([7, 2**63, 2**64 - 1]), min_size=1, max_size=80),
    chunk=st.integers(1, 9),
    bucket=st.integers(1, 9),
    fraction=st.sampled_from([0.0, 0.1, 0.5]),
)
def test_bucketed_decisions_match_whole_array_ones_for_any_chunk_and_bucket_size(
    tmp_path_factory: pytest.TempPathFactory, ids: list[int], chunk: int, bucket: int, fraction: float
) -> None:
    """Chunks of a few rows and buckets of a few entries (many files) give what sorting every id at once does."""
    where = tmp_path_factory.mktemp("b")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spill, "COLUMN_ROWS", chunk)
        patch.setattr(buckets, "BUCKET_ROWS", bucket)
        reverse = [ids[(i * 7 + 3) % len(ids)] if i % 2 else i for i in range(len(ids))]
        columns = _columns(where, ids, reverse)
        repeats = buckets.Repeats(columns, where, reverse="reverse")
        found = [repeats.masks(start, len(part["id"])) for start, part in columns.chunks("id")]
        assert np.concatenate([f[0] for f in found]).tolist() == [v in ids[:i] for i, v in enumerate(ids)]
        assert np.concatenate([f[1] for f in found]).tolist() == [r in ids for r in reverse]
        assert [repeats.first(i) for i in range(len(ids))] == [ids.index(v) for v in ids]
        groups = sorted(set(ids))
        parts = (part["id"] for _, part in columns.chunks("id"))
        if fraction and len(groups) < 2:
            with pytest.raises(ValueError, match="cannot hold out"):
                buckets.cut(parts, len(ids), where, fraction)
            return
        cut, train, held = buckets.cut(parts, len(ids), where, fraction)
        expected = min(max(1, round(fraction * len(groups))), len(groups) - 1) if fraction else 0
        assert (train, held) == (len(groups) - expected, expected)
        assert cut == (groups[expected - 1] if expected else -1)


def test_wanted_rows_answer_ascending_queries_and_going_back() -> None:
    wanted = Wanted(np.array([2, 5, 9]))
    assert [n in wanted for n in range(1, 11)] == [n in (2, 5, 9) for n in range(1, 11)]
    assert 5 in wanted and 3 not in wanted and 9 in wanted, "queries may go back (a batch is checked twice)"


def _outcome(failed: list[int], reasons: tuple[str, ...]) -> checkpoints.SuiteResult:
    rules = [checkpoints.RuleResult("t", "c", r, r, f"fails {r}", True, 0, 0, "all rows") for r in reasons]
    column = spill.Columns(failed="Q")
    column["failed"].extend(failed)
    masks = Counter(f for f in failed if f)
    return checkpoints.SuiteResult("t", reasons, column, rules, 0.0, len(failed), 0, masks)


def test_emit_writes_accepted_items_rejects_units_of_failed_ones_and_stores_large_metas_once(
    tmp_path: Path,
) -> None:
    source = tmp_path / "rows.jsonl"
    rows = [{"n": n} for n in range(4)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    units = Units([SourceFile(str(source), "rows.jsonl")])
    for n in range(4):
        units.add(0, n + 1)
    units.formats[0] = "pairwise"
    rejections = Rejections(tmp_path)
    items = Items(tmp_path, "t")
    big = {"note": "x" * 600}
    items.new_block()  # unit 0: two items sharing a large meta, the first one failing
    token = meta_field(big, items, inner=False)
    assert token.startswith("\x01") and meta_field({"a": 1}, items, inner=True) == '"a": 1, '
    for n, item_id in enumerate(("aaaaaaaaaaaaaaa1", "aaaaaaaaaaaaaaa2", "aaaaaaaaaaaaaaa3")):
        items.add(f'{{"id": "{item_id}", "meta": {token}}}', "0", n, n, 0)
    for unit, item_id in ((1, "bbbbbbbbbbbbbbb1"), (2, "ccccccccccccccc1"), (3, "ddddddddddddddd1")):
        items.new_block()
        items.add(f'{{"id": "{item_id}"}}', str(unit), 0 if unit == 1 else 10 + unit, 10 + unit, unit)
    result = _outcome([1, 0, 0, 3, 0, 0], ("empty:prompt", "duplicate"))
    decided = verdict(items, result, buckets.Repeats(items.columns, tmp_path), 0.0)
    used = emit(items, decided, units, rejections, str(tmp_path / "train"), str(tmp_path / "eval"))
    train = [json.loads(line) for line in (tmp_path / "train").read_text().splitlines()]
    assert used == 3 and [t["id"] for t in train] == [
        "aaaaaaaaaaaaaaa2",
        "aaaaaaaaaaaaaaa3",
        "ccccccccccccccc1",
        "ddddddddddddddd1",
    ]
    assert train[0]["meta"] == big and train[1]["meta"] == {"meta_in": "aaaaaaaaaaaaaaa2"}
    write_rejected(str(tmp_path / "rejected"), rejections, units)
    rejected = [json.loads(line) for line in (tmp_path / "rejected").read_text().splitlines()]
    assert rejected == [
        {
            "file": "rows.jsonl",
            "row": 2,
            "reasons": ["empty:prompt", "duplicate"],
            "detail": "fails empty:prompt; fails duplicate (rows.jsonl, line 1)",
            "record": {"n": 1},  # read again from the source: only the rows needed
        }
    ]


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.integers(-3, 12), min_size=1, max_size=60),
    low=st.one_of(st.none(), st.integers(-2, 6)),
    high=st.one_of(st.none(), st.integers(0, 10)),
    strict=st.booleans(),
    condition=st.sampled_from(["", "x > 0", "x != 3", "x <= 8"]),
)
def test_the_row_evaluator_agrees_with_great_expectations(values, low, high, strict, condition) -> None:
    """Above SAMPLE_ROWS rows, preftune applies a suite's map rules itself; here both judge the same rows."""
    columns = {"x": np.array(values, dtype=np.int64), "flag": np.array([v % 3 == 0 for v in values])}
    rules = [
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {
                "column": "x",
                "min_value": low,
                "max_value": high,
                "strict_min": strict,
                "strict_max": not strict,
            },
            "meta": {"reason": "between"},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "flag", "value_set": [False]},
            "meta": {"reason": "flag"},
        },
        {
            "type": "expect_column_values_to_not_be_in_set",
            "kwargs": {"column": "x", "value_set": [1, 2]},
            "meta": {"reason": "not_in"},
        },
    ]
    if condition:
        for rule in rules:
            rule["kwargs"].update(row_condition=condition, condition_parser="pandas")
    if (low is None and high is None) or (low is not None and high is not None and low > high):
        rules = rules[1:]
    validator = checkpoints.Validator({"suites": {"t": {"expectations": rules}}}, {})
    result = validator.run("t", columns)  # great-expectations judges every row: fewer than SAMPLE_ROWS
    for rule, outcome in zip(rules, result.rules, strict=True):
        mask, evaluated, _ = checkpoints.evaluate(rule["type"], rule["kwargs"], columns, {})
        bit = 1 << result.reasons.index(rule["meta"]["reason"])
        assert mask.tolist() == [bool(int(f) & bit) for f in result.failed_array()], rule
        assert evaluated == outcome.evaluated


def test_suites_judge_every_row_above_the_sample_size(monkeypatch) -> None:
    monkeypatch.setattr(checkpoints, "SAMPLE_ROWS", 50)
    rng = np.random.default_rng(0)
    columns = {
        "prompt_chars": rng.integers(0, 40, 400).astype("int32"),
        "completion_chars": rng.integers(0, 40, 400).astype("int32"),
        "is_duplicate": rng.random(400) < 0.1,
    }
    document = suites.default_document("ingest")
    result = checkpoints.Validator(document, {"min_chars": 5, "max_chars": 30}).run("examples", columns)
    assert result.sampled == 50 and result.rows == 400
    empty = result.reasons.index("empty:prompt")
    assert [bool(int(f) >> empty & 1) for f in result.failed_array()] == (
        columns["prompt_chars"] < 1
    ).tolist()
    assert all(r.scope.startswith("all rows (preftune); great-expectations found") for r in result.rules)


def test_a_rule_that_fails_to_run_is_a_suite_error() -> None:
    rules = [
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "x", "min_value": 3, "max_value": 1},
        }
    ]
    with pytest.raises(suites.SuiteError, match="failed to run"):
        checkpoints.Validator({"suites": {"t": {"expectations": rules}}}, {}).run("t", {"x": np.arange(5)})


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
    def __init__(self) -> None:
        self.calls = 0

    def score(self, policy: Any) -> dict[str, float]:
        self.calls += 1
        return {"implicit_reward_accuracy": 0.75}


@dataclass
class _Probe(FrontierProbe):
    """A probe whose sampling and KL estimate are counted instead of run on a model."""

    samples = Generations(
        prompt_ids=[[1], [2]], response_ids=[[3], [4]], texts=["a b", "a b c"], lengths=[2, 4]
    )

    generated: list[tuple[str, bool]] = field(default_factory=list)

    def generate(self, policy: Any, label: str, raw: bool = False) -> Generations:
        self.generated.append((label, raw))
        return self.samples

    def _kl(self, policy: Any, samples: Generations) -> tuple[float, float]:
        assert samples is self.samples
        return 0.5, 0.25


def test_frontier_probe_reuses_what_is_known() -> None:
    """Display responses already drawn are not drawn again; they double as the KL samples when the display
    settings already are temperature 1 and top-p 1; each judge scores a point once; the reference is the
    baseline of every later point's gains and diversity ratio."""
    sampling = {"temperature": 0.7, "top_p": 0.9, "batch_size": 2}
    assert raw_sampling(sampling) == {"temperature": 1.0, "top_p": 1.0, "batch_size": 2}
    judge = _Judge()
    probe = _Probe(None, None, [[], []], ["p1", "p2"], sampling, judges={"judge": judge})  # type: ignore[arg-type]
    reference = probe.measure(object(), label="reference", step=0, display=probe.samples, is_reference=True)
    assert reference.point == {
        "label": "reference",
        "step": 0,
        "kl": 0.0,
        "kl_per_token": 0.0,
        "distinct_1": 3 / 5,
        "distinct_2": 2 / 3,
        "mean_length": 3.0,
        "reward": 4.0,
    }
    assert probe.generated == [] and probe.baseline is reference
    final = probe.measure(object(), label="final", step=9, display=probe.samples)
    assert probe.generated == [("final", True)]  # only the temperature-1 samples of the KL estimate
    assert (final.point["kl"], final.point["kl_per_token"]) == (0.5, 0.25)
    assert final.point["diversity_ratio"] == 1.0 and final.point["reward_gain"] == 0.0
    assert judge.calls == 2
    # at temperature 1 and top-p 1 the display responses are the KL samples: nothing more is drawn
    pairs = _Pairs()
    raw = _Probe(None, None, [[], []], ["p1", "p2"], raw_sampling(sampling), pairs=pairs)  # type: ignore[arg-type]
    raw.measure(object(), label="reference", step=0, display=raw.samples, is_reference=True)
    point = raw.measure(object(), label="step 3", step=3, display=raw.samples).point
    assert raw.generated == [] and point["implicit_reward_accuracy"] == 0.75 and pairs.calls == 1
