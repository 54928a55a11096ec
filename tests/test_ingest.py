"""ingest: exact outputs, every rejection reason, row accounting, deterministic split, csv/parquet/s3 inputs."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import S3Bucket

from preftune.data.ingest import SFT_REASONS, ingest, metric_name
from preftune.data.readers import DataFormatError


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(
    source: str | Path, out: Path, **kwargs: Any
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    paths = {name: out / name for name in ("train", "eval", "rejected")}
    metrics = ingest(
        str(source),
        str(paths["train"]),
        str(paths["eval"]),
        str(paths["rejected"]),
        str(out / "report.html"),
        **kwargs,
    )
    return metrics, {name: _read(path) for name, path in paths.items()}


def _sha1_16(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _balanced(metrics: dict[str, float]) -> bool:
    return metrics["rows_input"] == metrics["rows_train"] + metrics["rows_eval"] + metrics["rows_rejected"]


def test_exact_output_for_both_row_formats(tmp_path: Path) -> None:
    source = tmp_path / "sft.jsonl"
    source.write_text(
        _lines(
            {"prompt": "What is 2+2?", "completion": "4", "topic": "math"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris"},
                ],
                "meta": {"lang": "en"},
            },
            {"prompt": "What is 2+2?", "completion": "4"},
            {"prompt": "Say hi", "completion": "   "},
        ),
        encoding="utf-8",
    )
    metrics, out = _run(source, tmp_path / "out", eval_fraction=0.0)
    assert out["train"] == [
        {
            "id": _sha1_16('{"completion":"4","prompt":[{"content":"What is 2+2?","role":"user"}]}'),
            "prompt": [{"role": "user", "content": "What is 2+2?"}],
            "completion": "4",
            "meta": {"topic": "math"},
            "source": {"file": "sft.jsonl", "row": 1},
        },
        {
            "id": _sha1_16(
                '{"completion":"Paris","prompt":[{"content":"Be brief.","role":"system"},'
                '{"content":"Capital of France?","role":"user"}]}'
            ),
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "completion": "Paris",
            "meta": {"lang": "en"},
            "source": {"file": "sft.jsonl", "row": 2},
        },
    ]
    assert out["eval"] == []
    assert out["rejected"] == [
        {
            "file": "sft.jsonl",
            "row": 3,
            "reasons": ["duplicate"],
            "detail": "same id as an earlier row (sft.jsonl, line 1)",
            "record": {"prompt": "What is 2+2?", "completion": "4"},
        },
        {
            "file": "sft.jsonl",
            "row": 4,
            "reasons": ["empty:completion"],
            "detail": "completion is empty",
            "record": {"prompt": "Say hi", "completion": "   "},
        },
    ]
    assert metrics["rows_input"] == 4 and metrics["rows_train"] == 2 and metrics["rows_rejected"] == 2
    assert metrics["rejected_duplicate"] == 1 and metrics["rejected_empty_completion"] == 1
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_every_rejection_reason_and_accounting(tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    good = {"prompt": "prompt one", "completion": "answer one"}
    jsonl = _lines(
        good,  # 1
        '{"prompt": "broken',  # 2 invalid_json
        "@UTF8@",  # 3 invalid_utf8
        "[1, 2]",  # 4 not_an_object
        {"completion": "answer"},  # 5 missing:prompt
        {"prompt": "prompt"},  # 6 missing:completion
        {"other": 1},  # 7 missing:prompt + missing:completion
        {"prompt": 5, "completion": "answer"},  # 8 invalid:prompt
        {"prompt": "prompt", "completion": {"x": 1}},  # 9 invalid:completion
        {"messages": [{"role": "user", "content": "unanswered"}]},  # 10 invalid:messages
        {"prompt": "  ", "completion": "answer 11"},  # 11 empty:prompt
        {"prompt": "prompt 12", "completion": ""},  # 12 empty:completion
        {"prompt": "ab", "completion": "answer 13"},  # 13 too_short:prompt
        {"prompt": "prompt 14", "completion": "xy"},  # 14 too_short:completion
        {"prompt": "p" * 31, "completion": "answer 15"},  # 15 too_long:prompt
        {"prompt": "prompt 16", "completion": "c" * 31},  # 16 too_long:completion
        good,  # 17 duplicate
        {
            "messages": [
                {"role": "user", "content": "prompt 18"},
                {"role": "assistant", "content": "answer 18"},
            ]
        },
        {"prompt": "prompt 19", "completion": "answer 19"},
        '{"prompt": "p", "completion": "c", "prompt": "q"}',  # 20 duplicate_key
    )
    (src / "a.jsonl").write_bytes(jsonl.replace("@UTF8@", "\udcff").encode("utf-8", "surrogateescape"))
    (src / "b.csv").write_text(
        "prompt,completion\nprompt 20,answer 20\nonly one field\nprompt 21,answer 21\n"
    )
    metrics, out = _run(src, tmp_path / "out", eval_fraction=0.2, min_chars=3, max_chars=30)

    expected = {reason: 1 for reason in SFT_REASONS}
    expected.update({"missing:prompt": 2, "missing:completion": 2})
    assert {reason: metrics[metric_name(reason)] for reason in SFT_REASONS} == expected
    assert (metrics["rows_input"], metrics["rows_train"], metrics["rows_eval"], metrics["rows_rejected"]) == (
        23,
        4,
        1,
        18,
    )
    assert _balanced(metrics)
    rejected = {(r["file"], r["row"]): r for r in out["rejected"]}
    assert len(rejected) == 18
    assert rejected[("a.jsonl", 20)]["reasons"] == ["duplicate_key"]
    assert "'prompt' appears twice" in rejected[("a.jsonl", 20)]["detail"]
    assert rejected[("a.jsonl", 7)]["reasons"] == ["missing:prompt", "missing:completion"]
    assert rejected[("a.jsonl", 2)]["record"] == {"raw": '{"prompt": "broken'}
    assert rejected[("a.jsonl", 8)]["detail"] == "field 'prompt': expected text or chat messages, got int"
    assert rejected[("b.csv", 2)]["reasons"] == ["malformed_row"]
    assert rejected[("a.jsonl", 15)]["detail"] == "prompt has more than 30 characters"
    accepted = sorted((r["source"]["file"], r["source"]["row"]) for r in out["train"] + out["eval"])
    assert accepted == [("a.jsonl", 1), ("a.jsonl", 18), ("a.jsonl", 19), ("b.csv", 1), ("b.csv", 3)]

    report = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    for text in (
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "too_long:prompt",
    ):
        assert text in report
    assert "a.jsonl" in report and "<img" in report


def _many(n_prompts: int, per_prompt: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"question {p}", "completion": f"answer {p}.{k}"}
        for p in range(n_prompts)
        for k in range(per_prompt)
    ]


def test_split_is_deterministic_by_seed_and_by_prompt(tmp_path: Path) -> None:
    rows = _many(30, 2)
    (tmp_path / "in.jsonl").write_text(_lines(*rows))
    (tmp_path / "shuffled.jsonl").write_text(_lines(*reversed(rows)))
    m0, a = _run(tmp_path / "in.jsonl", tmp_path / "a", eval_fraction=0.2, seed=0)
    _, b = _run(tmp_path / "in.jsonl", tmp_path / "b", eval_fraction=0.2, seed=0)
    _, c = _run(tmp_path / "in.jsonl", tmp_path / "c", eval_fraction=0.2, seed=1)
    _, d = _run(tmp_path / "shuffled.jsonl", tmp_path / "d", eval_fraction=0.2, seed=0)
    assert a == b
    assert (tmp_path / "a" / "train").read_bytes() == (tmp_path / "b" / "train").read_bytes()

    def prompts(rows: list[dict[str, Any]]) -> set[str]:
        return {r["prompt"][0]["content"] for r in rows}

    assert len(prompts(a["eval"])) == 6 and len(a["eval"]) == 12 and m0["rows_eval"] == 12
    assert m0["prompts_eval"] == 6 and m0["prompts_train"] == 24
    assert not prompts(a["eval"]) & prompts(a["train"])
    assert prompts(c["eval"]) != prompts(a["eval"])
    assert prompts(d["eval"]) == prompts(a["eval"]), "the split depends on content, not on row order"


def test_eval_split_needs_two_prompts_and_usable_rows(tmp_path: Path) -> None:
    (tmp_path / "one.jsonl").write_text(
        _lines({"prompt": "only", "completion": "a"}, {"prompt": "only", "completion": "b"})
    )
    with pytest.raises(ValueError, match="eval split"):
        _run(tmp_path / "one.jsonl", tmp_path / "o1", eval_fraction=0.1)
    metrics, out = _run(tmp_path / "one.jsonl", tmp_path / "o2", eval_fraction=0.0)
    assert metrics["rows_train"] == 2 and out["eval"] == []

    (tmp_path / "bad.jsonl").write_text(
        _lines({"prompt": "x", "completion": ""}, "not json", {"prompt": "y"})
    )
    out_dir = tmp_path / "o3"
    with pytest.raises(ValueError, match="no usable rows") as info:
        _run(tmp_path / "bad.jsonl", out_dir)
    assert not isinstance(info.value, DataFormatError)
    assert [r["row"] for r in _read(out_dir / "rejected")] == [1, 2, 3], "rejections are still written"
    assert (out_dir / "report.html").is_file()


@pytest.mark.parametrize(
    "kwargs", [{"eval_fraction": 1.0}, {"eval_fraction": -0.1}, {"min_chars": 10, "max_chars": 5}]
)
def test_bad_parameters(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    (tmp_path / "in.jsonl").write_text(_lines(*_many(3, 1)))
    with pytest.raises(ValueError):
        _run(tmp_path / "in.jsonl", tmp_path / "out", **kwargs)


def test_whole_file_problem_raises_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "good.jsonl").write_text(_lines(*_many(5, 1)))
    (tmp_path / "d" / "broken.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    with pytest.raises(DataFormatError, match=r"^broken.parquet: not a readable parquet file"):
        _run(tmp_path / "d", tmp_path / "out")


def test_csv_and_parquet_inputs(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    convo = [{"role": "user", "content": "parquet q"}, {"role": "assistant", "content": "parquet a"}]
    pq.write_table(pa.Table.from_pylist([{"messages": convo, "rating": 4}]), tmp_path / "d" / "a.parquet")
    messages = json.dumps([{"role": "user", "content": "csv q"}]).replace('"', '""')
    (tmp_path / "d" / "b.csv").write_text(f'prompt,completion,annotator\n"{messages}",csv a,ann1\n')
    metrics, out = _run(tmp_path / "d", tmp_path / "out", eval_fraction=0.0)
    assert [(r["prompt"], r["completion"], r["meta"], r["source"]) for r in out["train"]] == [
        (
            [{"role": "user", "content": "parquet q"}],
            "parquet a",
            {"rating": 4},
            {"file": "a.parquet", "row": 1},
        ),
        ([{"role": "user", "content": "csv q"}], "csv a", {"annotator": "ann1"}, {"file": "b.csv", "row": 1}),
    ]
    assert metrics["files_read"] == 2


def test_logs_one_summary_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "in.jsonl").write_text(_lines(*_many(4, 1), "oops"))
    with caplog.at_level(logging.INFO):
        _run(tmp_path / "in.jsonl", tmp_path / "out", eval_fraction=0.25)
    lines = [r.getMessage() for r in caplog.records if r.name == "preftune.data.ingest"]
    assert len(lines) == 1
    assert "5 rows in -> 3 train, 1 eval, 1 rejected (invalid_json 1)" in lines[0]
    assert not [
        r for r in caplog.records if r.name.startswith("great_expectations") and r.levelno < logging.WARNING
    ]


def test_ingest_from_s3_prefix(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put("incoming/part-1.jsonl", _lines(*_many(6, 1)[:3], "not json"))
    s3.put("incoming/part-2.csv", "prompt,completion\nquestion 3,answer 3.0\nquestion 4,answer 4.0\n")
    table = pa.Table.from_pylist([{"prompt": "question 5", "completion": "answer 5.0"}])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    s3.put("incoming/sub/part-3.parquet", sink.getvalue().to_pybytes())
    s3.put("incoming/_SUCCESS", "")
    s3.put("incoming-other/ignored.jsonl", _lines({"prompt": "never", "completion": "read"}))
    out = tmp_path / "out"
    metrics = ingest(
        s3.uri("incoming"),
        s3.uri("outputs/train.jsonl"),
        str(out / "eval"),
        str(out / "rejected"),
        str(out / "report.html"),
        eval_fraction=0.2,
    )
    assert (metrics["rows_input"], metrics["rows_train"], metrics["rows_eval"], metrics["rows_rejected"]) == (
        7,
        5,
        1,
        1,
    )
    assert (metrics["files_read"], metrics["files_skipped"]) == (3, 1)
    train = [json.loads(line) for line in s3.get("outputs/train.jsonl").decode().splitlines()]
    files = {r["source"]["file"] for r in train + _read(out / "eval")}
    assert files == {"part-1.jsonl", "part-2.csv", "sub/part-3.parquet"}
    assert _read(out / "rejected")[0]["file"] == "part-1.jsonl" and _read(out / "rejected")[0]["row"] == 4
