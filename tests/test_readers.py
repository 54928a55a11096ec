"""readers and records: every format, every malformed-input case names its file, line and field."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import records
from preftune.data.readers import DataFormatError, RawRow, data_files, read_file, read_rows


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return str(path)


def _parquet(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_error_message_format() -> None:
    err = DataFormatError(
        "expected text or chat messages, got int", file="prefs.jsonl", row=12, field="chosen"
    )
    assert str(err) == "prefs.jsonl, line 12, field 'chosen': expected text or chat messages, got int"
    assert (err.file, err.row, err.field) == ("prefs.jsonl", 12, "chosen")
    assert isinstance(err, ValueError)
    assert str(DataFormatError("bad", file="d.csv", row=3)) == "d.csv, row 3: bad"
    assert str(DataFormatError("unreadable", file="d.parquet")) == "d.parquet: unreadable"


def test_jsonl_rows_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"x": 1}\n\n  \r\n{"x": 2}\r\n')
    rows = list(read_rows(path))
    assert rows == [RawRow("a.jsonl", 1, {"x": 1}), RawRow("a.jsonl", 4, {"x": 2})]


def test_bad_json_line_is_rejected_or_raised(tmp_path: Path) -> None:
    path = _write(tmp_path / "prefs.jsonl", '{"x": 1}\n{"x": 2}\n{"x": oops}\n[1, 2]\n{"x": 5}\n')
    rows = list(read_rows(path))
    assert [(r.row, r.error) for r in rows] == [
        (1, None),
        (2, None),
        (3, "invalid_json"),
        (4, "not_an_object"),
        (5, None),
    ]
    assert rows[2].raw == '{"x": oops}' and rows[2].record is None
    assert "expected a JSON object, got list" in rows[3].detail
    with pytest.raises(DataFormatError) as info:
        list(read_rows(path, on_error="raise"))
    assert (info.value.file, info.value.row) == ("prefs.jsonl", 3)
    assert str(info.value).startswith("prefs.jsonl, line 3: invalid JSON")


def test_bad_lines_before_the_first_good_one_keep_their_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", 'nope\n{"x": 1}\n')
    assert [(r.row, r.error) for r in read_rows(path)] == [(1, "invalid_json"), (2, None)]


def test_non_utf8_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "sft.jsonl", b'{"p": "ok"}\n{"p": "caf\xe9"}\n')
    rows = list(read_rows(path))
    assert rows[1].error == "invalid_utf8" and rows[1].row == 2
    assert "0xe9" in rows[1].detail and "\ufffd" in rows[1].raw
    with pytest.raises(DataFormatError, match=r"sft.jsonl, line 2: not valid UTF-8 \(byte 0xe9"):
        list(read_rows(path, on_error="raise"))


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notjson.jsonl", "a,b\n1,2\n", "no line of this file is a JSON object"),
        ("binary.jsonl", b"\x00\xff\xfe\x80garbage\n\x81\x82\n", "no line of this file is a JSON object"),
        ("table.jsonl", b"PAR1\x00\x00", "holds parquet data"),
        ("zipped.jsonl", gzip.compress(b'{"x": 1}\n'), "gzip-compressed"),
        ("wide.jsonl", '{"x": 1}\n'.encode("utf-16"), "UTF-16"),
        ("fake.parquet", '{"x": 1}\n', "not a parquet file"),
        ("broken.parquet", b"PAR1" + b"\x00" * 20 + b"PAR1", "not a readable parquet file"),
        ("array.json", '[{"x": 1},\n {"x": }]', "invalid JSON array"),
        ("noheader.csv", "", "missing header"),
        ("dupheader.csv", "a,a\n1,2\n", "duplicate"),
        ("notes.txt", "hello", "unsupported file type"),
    ],
)
def test_whole_file_problems_raise(tmp_path: Path, name: str, data: bytes | str, message: str) -> None:
    path = _write(tmp_path / name, data)
    with pytest.raises(DataFormatError, match=message) as info:
        list(read_rows(path))
    assert info.value.file == name
    assert name in str(info.value)


def test_json_array_and_json_lines_named_json(tmp_path: Path) -> None:
    array = _write(tmp_path / "a.json", '[{"x": 1}, 7, {"x": 3}]')
    rows = list(read_rows(array))
    assert [(r.row, r.error) for r in rows] == [(1, None), (2, "not_an_object"), (3, None)]
    lines = _write(tmp_path / "b.json", '{"x": 1}\n{"x": 2}\n')
    assert [r.record for r in read_rows(lines)] == [{"x": 1}, {"x": 2}]


def test_csv_rows(tmp_path: Path) -> None:
    messages = json.dumps([{"role": "user", "content": "hi, there"}])
    text = (
        "prompt,completion,note\n"
        f'"{messages.replace(chr(34), chr(34) * 2)}",hello,\n'
        '"multi\nline",answer,x\n'
        "only,two\n"
        '"[1, 2]",text,y\n'
    )
    path = _write(tmp_path / "d.csv", text.encode("utf-8") + b"bad \xff row,a,b\n")
    rows = list(read_rows(path))
    assert rows[0].record == {
        "prompt": [{"role": "user", "content": "hi, there"}],
        "completion": "hello",
        "note": "",
    }
    assert (rows[1].row, rows[1].record["prompt"]) == (2, "multi\nline")
    assert (rows[2].row, rows[2].error, rows[2].detail) == (3, "malformed_row", "expected 3 fields, got 2")
    assert rows[3].record["prompt"] == "[1, 2]", "only JSON lists of chat messages are parsed"
    assert (rows[4].row, rows[4].error) == (5, "invalid_utf8")
    with pytest.raises(DataFormatError, match="d.csv, row 3: expected 3 fields, got 2"):
        list(read_rows(path, on_error="raise"))


def test_tsv_and_gzip(tmp_path: Path) -> None:
    tsv = _write(tmp_path / "d.tsv", "prompt\tcompletion\nq, with comma\ta\n")
    assert [r.record for r in read_rows(tsv)] == [{"prompt": "q, with comma", "completion": "a"}]
    gz = _write(tmp_path / "d.jsonl.gz", gzip.compress(b'{"x": 1}\n'))
    assert [r.record for r in read_rows(gz)] == [{"x": 1}]


def test_parquet_rows_keep_nested_values(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "score": 1.5},
        {
            "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
            "score": None,
        },
    ]
    path = _parquet(tmp_path / "d.parquet", rows)
    assert list(read_rows(path)) == [RawRow("d.parquet", 1, rows[0]), RawRow("d.parquet", 2, rows[1])]


def test_directory_reads_supported_files_sorted(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "b.jsonl", '{"f": "b"}\n')
    _write(tmp_path / "d" / "a" / "z.csv", "f\na\n")
    _parquet(tmp_path / "d" / "c.parquet", [{"f": "c"}])
    _write(tmp_path / "d" / "README.md", "docs")
    _write(tmp_path / "d" / "_SUCCESS", "")
    _write(tmp_path / "d" / ".hidden.jsonl", '{"f": "hidden"}\n')
    files, skipped = data_files(str(tmp_path / "d"))
    assert [name for _, name in files] == ["a/z.csv", "b.jsonl", "c.parquet"]
    assert skipped == [".hidden.jsonl", "README.md", "_SUCCESS"]
    assert [(r.file, r.record["f"]) for r in read_rows(str(tmp_path / "d"))] == [
        ("a/z.csv", "a"),
        ("b.jsonl", "b"),
        ("c.parquet", "c"),
    ]
    _write(tmp_path / "empty" / "notes.txt", "x")
    with pytest.raises(DataFormatError, match="no data files"):
        data_files(str(tmp_path / "empty"))


def test_artifact_path_without_extension_is_sniffed(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "train_data", '{"x": 1}\n')
    assert [r.record for r in read_rows(jsonl)] == [{"x": 1}]
    table = _parquet(tmp_path / "pq_data", [{"x": 2}])
    assert [r.record for r in read_file(table)] == [{"x": 2}]


# ---------------------------------------------------------------------------------------------- records


def test_to_messages() -> None:
    assert records.to_messages("hi", "f.jsonl", 1, "prompt") == [{"role": "user", "content": "hi"}]
    convo = [
        {"role": "system", "content": "s", "name": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert records.to_messages(convo, "f.jsonl", 1, "prompt") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "a\nb"},
    ]
    cases = [
        (5, "invalid:prompt", "expected text or chat messages, got int"),
        (None, "missing:prompt", "missing"),
        ([{"role": "robot", "content": "x"}], "invalid:prompt", "role must be one of"),
        ([{"role": "user", "content": None}], "invalid:prompt", "content must be text, got null"),
        (["text"], "invalid:prompt", "got a list containing str"),
    ]
    for value, reason, message in cases:
        with pytest.raises(DataFormatError, match=message) as info:
            records.to_messages(value, "f.jsonl", 4, "prompt")
        assert (info.value.reason, info.value.file, info.value.row, info.value.field) == (
            reason,
            "f.jsonl",
            4,
            "prompt",
        )


def test_completion_text() -> None:
    assert records.completion_text("a", "f", 1, "completion") == "a"
    assert records.completion_text({"role": "assistant", "content": "a"}, "f", 1, "completion") == "a"
    assert records.completion_text([{"role": "assistant", "content": "a"}], "f", 1, "completion") == "a"
    with pytest.raises(DataFormatError, match="roles"):
        records.completion_text([{"role": "user", "content": "a"}], "f", 1, "completion")
    with pytest.raises(DataFormatError, match="got float"):
        records.completion_text(1.5, "f", 1, "completion")


def test_record_id_is_sha1_of_canonical_json() -> None:
    payload = {"prompt": [{"role": "user", "content": "é"}], "completion": "x"}
    canonical = '{"completion":"x","prompt":[{"content":"é","role":"user"}]}'
    assert records.canonical_json(payload) == canonical
    assert records.record_id(payload) == hashlib.sha1(canonical.encode("utf-8")).hexdigest()[:16]
    assert records.record_id(dict(reversed(list(payload.items())))) == records.record_id(payload)


def test_write_and_read_jsonl(tmp_path: Path) -> None:
    rows = [{"a": 1, "t": "é"}, {"a": float("nan"), "b": {1: (1, 2)}}]
    assert records.write_jsonl(tmp_path / "artifact", rows) == 2
    text = (tmp_path / "artifact").read_text(encoding="utf-8")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "artifact").stat().st_mode & 0o777 == 0o666 & ~umask, "readable like any new file"
    assert text == '{"a": 1, "t": "é"}\n{"a": null, "b": {"1": [1, 2]}}\n'
    assert records.read_jsonl(tmp_path / "artifact") == [{"a": 1, "t": "é"}, {"a": None, "b": {"1": [1, 2]}}]
    _write(tmp_path / "dir" / "2.jsonl", '{"n": 2}\n')
    _write(tmp_path / "dir" / "1.jsonl", '{"n": 1}\n')
    _write(tmp_path / "dir" / "other.txt", "ignored")
    assert records.read_jsonl(tmp_path / "dir") == [{"n": 1}, {"n": 2}]
    _write(tmp_path / "bad.jsonl", '{"n": 1}\n{oops\n')
    with pytest.raises(DataFormatError, match="bad.jsonl, line 2"):
        records.read_jsonl(tmp_path / "bad.jsonl")


def test_jsonable() -> None:
    import datetime

    assert records.jsonable({"d": datetime.date(2024, 1, 2), "b": b"hi", "x": b"\xff", "inf": math.inf}) == {
        "d": "2024-01-02",
        "b": "hi",
        "x": "/w==",
        "inf": None,
    }
