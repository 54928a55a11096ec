"""The column-wise pairwise path (preftune.data.pairbatch, blocks) gives exactly what the row path gives."""

from __future__ import annotations

import gzip
import json
import math
import re
from json.encoder import encode_basestring
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import blocks, importing, pairbatch, readers, records, sources, textio
from preftune.data.preferences import import_preferences

_TEXTS = [
    "plain answer",
    '  quoted "text" and a back\\slash ',
    "line one\nline two\r\n\ttabbed",
    "nul \x00 bell \x07 escape \x1b and del \x7f",
    "unicode: caf\u00e9 \u4e2d\u6587 \U0001f600",
    "   ",
    "\u200b\u200d\ufeff",
    "\u3000wide space\u3000",
    "",
    "same",
    "same ",
]


def _row_facts(record: dict, file_json: str, row: int) -> records.PairFacts | None:
    facts = records.fast_pair(record, file_json, row)
    if facts is None:
        try:
            return records.pair_facts(records.normalize_preference(records.RawRow("f.parquet", row, record)))
        except records.RowError:
            return None
    return facts


def test_the_character_sets_are_pythons_own() -> None:
    space = {chr(c) for c in range(0x110000) if chr(c).isspace()}
    assert set(pairbatch.WHITESPACE) == space
    visible = re.compile(records._VISIBLE.pattern)
    hidden = {chr(c) for c in range(0x110000) if not visible.match(chr(c))}
    assert set(pairbatch.INVISIBLE) == hidden


def _mixed_table() -> pa.Table:
    rows = []
    for n in range(400):
        row = {
            "prompt": _TEXTS[n % len(_TEXTS)] + f" {n // 7}",
            "chosen": _TEXTS[(n * 3) % len(_TEXTS)],
            "rejected": _TEXTS[(n * 5 + 1) % len(_TEXTS)],
            "margin": [None, 0.0, 1.5, -1.0, float("nan"), float("inf"), 2.0**60, 1e-300, 0.1][n % 9],
            "user": None if n % 4 else f"user-{n}",
            "tags": [n, n + 1] if n % 3 else None,
        }
        if n % 11 == 0:
            row["chosen"] = None
        rows.append(row)
    return pa.Table.from_pylist(rows)


def test_a_batch_gives_the_row_paths_lines_and_numbers_for_the_rows_it_takes() -> None:
    table = _mixed_table()
    file_json = encode_basestring("f.parquet")
    built = pairbatch.build(table, np.arange(1, table.num_rows + 1), 10, file_json, 3)
    lines = built.lines.to_pylist()
    taken = np.flatnonzero(built.taken).tolist()
    assert 0 < len(taken) < table.num_rows  # nulls, negative and non-finite margins are left to the row path
    for k, index in enumerate(taken):
        facts = _row_facts(table.slice(index, 1).to_pylist()[0], file_json, index + 1)
        assert facts is not None
        assert lines[k] == facts.line + "\n"
        margin = math.nan if facts.margin is None else facts.margin
        expected = (facts.id, facts.reverse, importing.rank_key(3, facts.prompt_key), index + 10)
        got = tuple(int(built.columns[c][k]) for c in ("id", "reverse", "rank", "lead"))
        assert got == expected
        chars = (facts.prompt_chars, facts.chosen_chars, facts.rejected_chars, facts.flags)
        assert (
            tuple(
                int(built.columns[c][k]) for c in ("prompt_chars", "chosen_chars", "rejected_chars", "flags")
            )
            == chars
        )
        assert np.array_equal(built.columns["margin"][k], margin, equal_nan=True)
    for index in sorted(set(range(table.num_rows)) - set(taken)):
        record = table.slice(index, 1).to_pylist()[0]
        margin = record["margin"]
        assert record["chosen"] is None or margin is None or not (0 <= margin < 2**53)


def test_json_text_blocks_with_other_columns_are_left_to_the_row_path() -> None:
    table = pa.Table.from_pylist([{"prompt": "p", "chosen": "a", "rejected": "b", "user": None}])
    assert not pairbatch.build(table, np.array([1]), 0, '"f"', 0, meta_exact=False).taken.any()
    assert pairbatch.build(table, np.array([1]), 0, '"f"', 0, meta_exact=True).taken.all()


def test_pyarrow_reads_margins_as_python_does() -> None:
    rng = np.random.default_rng(5)
    values = [float(v) for v in rng.random(2000) * 10.0 ** rng.integers(-8, 12, 2000)]
    lines = "".join(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "margin": v}) + "\n" for v in values
    )
    block = blocks._json_block("f.jsonl", 0, lines.encode())
    assert block.table is not None
    assert block.table.column("margin").to_pylist() == values


def test_line_chunks_keep_line_numbers_and_the_line_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    data = b'{"a": 1}\n\n\n{"a": 2}\r\n   \n{"a": 3}'
    chunks = list(textio.line_chunks(io.BufferedReader(io.BytesIO(data)), size=7))
    assert b"".join(c for _, c in chunks) == data + b"\n"
    assert [n for n, _ in chunks][0] == 0
    block = blocks._json_block("f.jsonl", 0, data + b"\n")
    assert block.rows.tolist() == [1, 4, 6]
    assert block.table.column("a").to_pylist() == [1, 2, 3]
    monkeypatch.setattr(textio, "MAX_LINE_BYTES", 10)
    with pytest.raises(textio.TextFormatError, match="line longer"):
        list(textio.line_chunks(io.BufferedReader(io.BytesIO(b"x" * 50 + b"\n")), size=8))


def _hostile_lines() -> list[str]:
    good = [
        json.dumps({"prompt": f"Question {n // 3}", "chosen": _TEXTS[n % len(_TEXTS)], "rejected": f"r{n}"})
        for n in range(120)
    ]
    good[5] = good[2]  # a duplicate
    first = json.loads(good[9])
    good[40] = json.dumps({**first, "chosen": first["rejected"], "rejected": first["chosen"]})  # reversed
    good[50] = '{"prompt": "p", "chosen": "a", "chosen": "b", "rejected": "c"}'  # a repeated key
    good[51] = '{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}'  # a lone surrogate
    good[52] = '{"prompt": "p", "chosen": "a", "rejected": "b"} {"x": 1}'  # two objects on a line
    good[53] = "[1, 2]"
    good[54] = "{broken"
    good[55] = '{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}'
    good[56] = '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -2}'
    good[57] = '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}'
    good[58] = '{"prompt": "p", "chosen": "a", "rejected": "b", "user": "u1", "meta": {"k": [1, 2]}}'
    good[59] = ""
    good[60] = '{"prompt": "p2", "chosen": "a", "rejected": "b", "margin": 3}\r'
    good[61] = '{"prompt": "p3", "chosen": 5, "rejected": "b"}'
    good[62] = '{"prompt": "p4", "chosen": "a", "rejected": "b", "margin": 1' + "0" * 5000 + "}"
    return good


def _parquet_rows(lines: list[str]) -> list[dict]:
    """The readable pairs of the hostile lines, with other columns (some null) and a nested meta."""
    good: list[dict] = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        texts = [row.get(k) for k in ("prompt", "chosen", "rejected")] if isinstance(row, dict) else [0]
        if not all(isinstance(t, str) and "\ud800" not in t for t in texts):
            continue
        margin = row.get("margin")
        plain = isinstance(margin, (int, float)) and not isinstance(margin, bool) and abs(margin) < 1e300
        row["margin"] = float(margin) if plain else None
        row["user"] = f"u{len(good)}" if len(good) % 3 else None
        row["meta"] = {"k": len(good)} if len(good) % 5 == 0 else None
        good.append(row)
    return good


def _import(tmp_path: Path, source: Path, name: str) -> tuple:
    out = tmp_path / name
    paths = [str(out / n) for n in ("train.jsonl", "eval.jsonl", "rejected.jsonl", "report.html")]
    metrics = import_preferences(str(source), *paths, eval_fraction=0.2, max_rejected_fraction=1.0)
    return metrics, *((out / n).read_text() for n in ("train.jsonl", "eval.jsonl", "rejected.jsonl"))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet"])
def test_block_reading_gives_exactly_the_row_paths_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    lines = _hostile_lines()
    text = "\n".join(lines) + "\n"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(_parquet_rows(lines)), source / "a.parquet", row_group_size=17)
    elif kind == "jsonl.gz":
        (source / "a.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (source / "a.jsonl").write_text(text)
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 512)  # many blocks, some refused by pyarrow, some not
    monkeypatch.setattr(blocks, "PARQUET_ROWS", 7)
    with_blocks = _import(tmp_path, source, "blocks")
    monkeypatch.setattr(sources.SourceFile, "blocks", lambda self: None)
    by_rows = _import(tmp_path, source, "rows")
    assert with_blocks == by_rows
    metrics, train, held, rejected = with_blocks
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"]
    reasons = {r for line in rejected.splitlines() for r in json.loads(line)["reasons"]}
    assert "duplicate" in reasons and "contradiction" in reasons
    if kind != "parquet":
        assert {
            "duplicate_key",
            "invalid_json",
            "not_an_object",
            "invalid:prompt",
            "invalid:margin",
        } <= reasons


def test_a_gzip_bomb_is_refused_on_the_block_path(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.jsonl.gz"
    line = b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    with gzip.open(bomb, "wb", compresslevel=9) as handle:
        handle.write(line)
        handle.write(b"\n" * (64 << 20))
    with pytest.raises(readers.DataFormatError, match="compression bomb") as refused:
        for _ in blocks.file_blocks(str(bomb), "bomb.jsonl.gz"):  # type: ignore[union-attr]
            pass
    assert refused.value.file == "bomb.jsonl.gz"
    paths = [str(tmp_path / "out" / n) for n in ("train", "eval", "rejected", "report.html")]
    with pytest.raises(ValueError, match="compression bomb"):
        import_preferences(str(bomb), *paths, eval_fraction=0.0, format="pairwise")


def test_integer_margins_beyond_a_float_are_left_to_the_row_path() -> None:
    margins = pa.array([2**62, -1, 3, None, 2**53 - 1], type=pa.int64())
    table = pa.table({"prompt": ["p"] * 5, "chosen": ["a"] * 5, "rejected": ["b"] * 5, "margin": margins})
    built = pairbatch.build(table, np.arange(1, 6), 0, '"f"', 0)
    assert built.taken.tolist() == [False, False, True, True, True]
    for k, index in enumerate(np.flatnonzero(built.taken).tolist()):
        facts = _row_facts(table.slice(index, 1).to_pylist()[0], '"f"', index + 1)
        assert facts is not None and built.lines.to_pylist()[k] == facts.line + "\n"


def test_parquet_row_groups_are_pre_buffered_only_when_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coalesced reads of a whole row group (fewer S3 requests) unless a row group is larger than the bound; the
    rows read are the same either way."""
    from preftune.data import arrowrows

    table = pa.Table.from_pylist(
        [{"prompt": f"p{n}", "chosen": "a" * n, "rejected": "b"} for n in range(3000)]
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path, row_group_size=1000)
    metadata = pq.read_metadata(path)
    assert arrowrows._pre_buffer(metadata)
    whole = [b.to_pylist() for b in arrowrows.parquet_batches(str(path), 700)]
    monkeypatch.setattr(arrowrows, "PRE_BUFFER_BYTES", 1000)
    assert not arrowrows._pre_buffer(metadata)
    assert [b.to_pylist() for b in arrowrows.parquet_batches(str(path), 700)] == whole
    assert sum(len(b) for b in whole) == 3000
