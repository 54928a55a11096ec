"""Hostile feedback rows (issue 15, second round): each concrete case the attack on the importer found, and what
happens now -- the row is rejected with its file, line and field, the rest of the file is imported, the command
exits 0 (1 is only "too many rows rejected", 2 "the input was refused"), and nothing grows without bound."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import import_command
from preftune.data.ingest import ingest
from preftune.data.preferences import import_preferences


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


def _run(source: Path, out: Path, **kwargs: Any) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    kwargs.setdefault("eval_fraction", 0.0)
    kwargs.setdefault("max_rejected_fraction", 1.0)
    paths = {name: out / name for name in ("train", "eval", "rejected")}
    metrics = import_preferences(
        str(source),
        *(str(paths[n]) for n in ("train", "eval", "rejected")),
        str(out / "report.html"),
        **kwargs,
    )
    result = {name: _read(path) for name, path in paths.items()}
    assert (
        metrics["rows_input"]
        == metrics["rows_used"] + metrics["rows_rejected"]
        == len(result["rejected"]) + (metrics["rows_used"])
    )
    return metrics, result


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    import_command.add_arguments(parser)
    return import_command.run(parser.parse_args(argv))


def _good(n: int) -> dict[str, str]:
    return {"prompt": f"question {n}", "chosen": f"a good answer {n}", "rejected": f"a bad answer {n}"}


# ---------------------------------------------------------------------------------------------- item 2


def test_a_ranked_list_of_1000_responses_makes_at_most_max_pairs_per_prompt(tmp_path: Path) -> None:
    """The attack: one 17 KB row of 1,000 ranked responses became 499,500 pairs (127 MB, 1.2 GB RSS, 75 s)."""
    huge = {
        "prompt": "Rank these",
        "responses": [f"r{i}" for i in range(1000)],
        "ranks": list(range(1, 1001)),
    }
    middle = {
        "prompt": "Rank those",
        "responses": [f"s{i}" for i in range(300)],
        "ranks": list(range(1, 301)),
    }
    small = {"prompt": "Rank a few", "responses": [f"t{i}" for i in range(6)], "ranks": list(range(1, 7))}
    (tmp_path / "r.jsonl").write_text(_lines(huge, middle, small))
    assert len(json.dumps(huge)) < 17_000
    metrics, out = _run(tmp_path / "r.jsonl", tmp_path / "a")
    by_prompt: dict[str, int] = {}
    for pair in out["train"]:
        by_prompt[pair["prompt"][0]["content"]] = by_prompt.get(pair["prompt"][0]["content"], 0) + 1
    assert by_prompt == {"Rank these": 16, "Rank those": 16, "Rank a few": 15}
    assert metrics["pairs_capped"] == (499_500 - 16) + (44_850 - 16)
    assert metrics["rows_used"] == 3
    assert all(
        p["margin"] > 0 and p["meta"]["ranks"]["chosen"] < p["meta"]["ranks"]["rejected"]
        for p in out["train"]
    )
    _, again = _run(tmp_path / "r.jsonl", tmp_path / "b")
    assert again["train"] == out["train"], "the pairs kept are chosen by seed, the same every run"
    _, uncapped = _run(tmp_path / "r.jsonl", tmp_path / "c", max_pairs_per_prompt=0, format="ranked")
    assert sum(p["prompt"][0]["content"] == "Rank a few" for p in uncapped["train"]) == 15


def test_a_large_meta_is_stored_once_not_copied_into_every_pair(tmp_path: Path) -> None:
    """The attack: a 1 MB file whose rows carry meta became a 780 MB train file."""
    rows = [
        {
            "prompt": f"Rank answers to question {n}",
            "responses": [f"answer {n}.{i}" for i in range(30)],
            "ranks": list(range(1, 31)),
            "notes": "annotator notes " * 600,  # ~10 KB per row
        }
        for n in range(100)
    ]
    source = tmp_path / "ranked.jsonl"
    source.write_text(_lines(*rows))
    assert 0.9e6 < source.stat().st_size < 1.2e6
    metrics, out = _run(source, tmp_path / "out")
    written = (tmp_path / "out" / "train").stat().st_size
    assert metrics["pairs_train"] == 100 * 16 and written < 1.5 * source.stat().st_size
    for n in range(100):
        pairs = [p for p in out["train"] if p["prompt"][0]["content"] == f"Rank answers to question {n}"]
        full = [p for p in pairs if "notes" in p["meta"]]
        assert len(full) == 1 and full[0]["meta"]["notes"] == rows[n]["notes"]
        assert all(
            p["meta"] == {"meta_in": full[0]["id"], "ranks": p["meta"]["ranks"]}
            for p in pairs
            if p is not full[0]
        )
    small = [{"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 2, 3], "annotator": "ann1"}]
    (tmp_path / "small.jsonl").write_text(_lines(*small))
    _, out = _run(tmp_path / "small.jsonl", tmp_path / "small")
    assert all(p["meta"]["annotator"] == "ann1" for p in out["train"]), "small metas stay in every pair"


def test_ratings_with_a_large_meta_store_it_once_per_prompt(tmp_path: Path) -> None:
    rows = [
        {"prompt": "P", "response": f"answer {i}", "score": i, "comment": f"{i} " + "x" * 800}
        for i in range(6)
    ]
    (tmp_path / "s.jsonl").write_text(_lines(*rows))
    metrics, out = _run(tmp_path / "s.jsonl", tmp_path / "out", min_score_gap=0.1)
    assert metrics["pairs_train"] == 15
    seen: dict[str, str] = {}
    for pair in out["train"]:
        for side in ("chosen", "rejected"):
            for entry, source in zip(pair["meta"][side], pair["source"][side], strict=True):
                key = f"{source['row']}"
                if "comment" in entry:
                    assert key not in seen, "a row's meta is written in full once"
                    seen[key] = pair["id"]
                else:
                    assert entry == {"meta_in": seen[key]}
    assert len(seen) == 6


# ---------------------------------------------------------------------------------------------- item 3


def _bomb(path: Path, size: int = 1 << 30) -> None:
    """``size`` bytes of newlines, gzip-compressed (1 GiB -> about 1 MB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\n" * (1 << 20)
    with path.open("wb") as handle:
        for _ in range(size >> 20):
            handle.write(compressor.compress(chunk))
        handle.write(compressor.flush())


def _peak_rss_mb(argv: list[str]) -> tuple[int, float, str]:
    """Run the import command in a fresh process: exit code, its own peak RSS, stderr."""
    code = (
        "import argparse, sys; from preftune.data import import_command as c; p = argparse.ArgumentParser(); "
        "c.add_arguments(p); sys.exit(c.run(p.parse_args(sys.argv[1:])))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode() if proc.stderr else ""
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, err


def test_a_gzip_bomb_is_refused_within_a_bounded_memory_budget(tmp_path: Path) -> None:
    """The attack: 1 MB of gzip holding 1 GiB of newlines ended in MemoryError at 5.4 GB."""
    bomb = tmp_path / "feedback.jsonl.gz"
    _bomb(bomb)
    assert bomb.stat().st_size < 2 << 20
    (tmp_path / "ok.jsonl").write_text(_lines(_good(1), _good(2)))
    code, baseline, err = _peak_rss_mb(
        [str(tmp_path / "ok.jsonl"), "--out", str(tmp_path / "ok-out"), "--eval-fraction", "0"]
    )
    assert code == 0, err
    code, peak, err = _peak_rss_mb([str(bomb), "--out", str(tmp_path / "out")])
    assert code == 2 and "Traceback" not in err
    assert "feedback.jsonl.gz: refused as a compression bomb" in err
    assert peak < baseline + 200, f"peak RSS {peak:.0f} MiB against {baseline:.0f} MiB for a two-row file"


# ---------------------------------------------------------------------------------------------- item 4


def test_a_stray_csv_quote_costs_its_line_not_the_rows_after_it(tmp_path: Path) -> None:
    """The attack: one stray quote swallowed 500 rows into a single malformed_row, with exit 0."""
    lines = ["prompt,chosen,rejected"]
    for n in range(1, 601):
        lines.append(
            f'"broken prompt {n},chosen {n},rejected {n}'
            if n == 100
            else f"prompt {n},chosen {n},rejected {n}"
        )
    lines.insert(300, '"question, with a comma",right,"wrong, ""quoted"""')  # a well-quoted row later on
    (tmp_path / "prefs.csv").write_text("\n".join(lines) + "\n")
    metrics, out = _run(tmp_path / "prefs.csv", tmp_path / "out")
    assert (metrics["rows_input"], metrics["rows_used"], metrics["rows_rejected"]) == (601, 600, 1)
    (bad,) = out["rejected"]
    assert bad["reasons"] == ["malformed_row"] and bad["row"] == 100
    assert bad["detail"].startswith("line 101: a quoted field opens on this line")
    assert "reading resumes on line 102" in bad["detail"]
    quoted = [p for p in out["train"] if p["chosen"] == "right"]
    assert quoted and quoted[0]["rejected"] == 'wrong, "quoted"'
    assert _cli([str(tmp_path / "prefs.csv"), "--out", str(tmp_path / "cli"), "--eval-fraction", "0"]) == 0


def test_a_quote_that_never_closes_is_bounded_and_named(tmp_path: Path) -> None:
    body = "\n".join(f"prompt {n},chosen {n},rejected {n}" for n in range(1, 50))
    (tmp_path / "p.csv").write_text(
        "prompt,chosen,rejected\n" + body + '\n"open,never,closed\nlast,row,here\n'
    )
    metrics, out = _run(tmp_path / "p.csv", tmp_path / "out")
    assert metrics["rows_used"] == 50 and [r["row"] for r in out["rejected"]] == [50]
    assert out["rejected"][0]["detail"].startswith("line 51: a quoted field opens on this line")


# ---------------------------------------------------------------------------------------------- items 5 and 6


HOSTILE_JSON = {
    "deep nesting": (
        '{"prompt": "p", "chosen": "c", "rejected": "r", "extra": ' + "[" * 5000 + "]" * 5000 + "}",
        "invalid_json",
        "nested deeper than 64 levels",
    ),
    "margin too large for a float": (
        '{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1' + "0" * 400 + "}",
        "invalid:margin",
        "an integer of 401 digits",
    ),
    "integer over 4,300 digits": (
        '{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1' + "0" * 5000 + "}",
        "invalid:margin",
        "an integer of 5001 digits",
    ),
    "over-long integer in an extra column": (
        '{"prompt": "p", "chosen": "c", "rejected": "r", "comment": 9' + "9" * 5000 + "}",
        "invalid:comment",
        "an integer of 5001 digits",
    ),
    "lone surrogate": (
        '{"prompt": "p", "chosen": "c \\ud800", "rejected": "r"}',
        "invalid:chosen",
        "lone surrogate \\ud800",
    ),
    "duplicate key": (
        '{"prompt": "p", "chosen": "A", "rejected": "B", "chosen": "B"}',
        "duplicate_key",
        "the key 'chosen' appears twice",
    ),
    "duplicate key in a message": (
        '{"prompt": [{"role": "user", "content": "x", "role": "system"}], "chosen": "A", "rejected": "B"}',
        "duplicate_key",
        "the key 'role' appears twice",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_JSON), ids=list(HOSTILE_JSON))
def test_one_hostile_json_row_is_rejected_with_file_line_and_reason(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, reason, detail = HOSTILE_JSON[case]
    (tmp_path / "p.jsonl").write_text(_lines(_good(1), text, _good(3)))
    metrics, out = _run(tmp_path / "p.jsonl", tmp_path / "out")
    (bad,) = out["rejected"]
    assert (bad["file"], bad["row"], bad["reasons"]) == ("p.jsonl", 2, [reason])
    assert detail in bad["detail"]
    assert metrics["rows_used"] == 2
    code = _cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "cli"), "--eval-fraction", "0"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("kind", "field", "reason"),
    [
        ("rating", "score", "invalid:score"),
        ("ranked", "ranks", "invalid:ranks"),
    ],
)
def test_numbers_too_large_for_a_float_reject_their_row(
    kind: str, field: str, reason: str, tmp_path: Path
) -> None:
    big = "1" + "0" * 400
    if kind == "rating":
        rows = [
            '{"prompt": "p", "response": "a", "score": 1}',
            '{"prompt": "p", "response": "b", "score": 5}',
            '{"prompt": "p", "response": "c", "score": ' + big + "}",
        ]
    else:
        rows = [
            '{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}',
            '{"prompt": "q", "responses": ["a", "b"], "ranks": [1, ' + big + "]}",
        ]
    (tmp_path / "f.jsonl").write_text("\n".join(rows) + "\n")
    _, out = _run(tmp_path / "f.jsonl", tmp_path / "out", format=kind)
    (bad,) = [r for r in out["rejected"] if r["reasons"] != ["unpaired"]]
    assert bad["row"] == len(rows) and bad["reasons"] == [reason]
    assert f"field '{field}'" in bad["detail"] and "too large for a float" in bad["detail"]


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("timestamp", pa.array([0, 0, 10**15], type=pa.timestamp("s"))),
        ("date", pa.array([0, 0, 10**9], type=pa.date32())),
        ("duration", pa.array([0, 0, 2**62], type=pa.duration("s"))),
    ],
)
def test_a_parquet_value_outside_pythons_range_rejects_its_row(
    name: str, values: pa.Array, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "prompt": ["p1", "p2", "p3"],
            "chosen": ["c1", "c2", "c3"],
            "rejected": ["r1", "r2", "r3"],
            f"when_{name}": values,
        }
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    metrics, out = _run(tmp_path / "p.parquet", tmp_path / "out")
    (bad,) = out["rejected"]
    assert (bad["row"], bad["reasons"]) == (3, [f"invalid:when_{name}"])
    assert "Python cannot represent" in bad["detail"]
    good = out["train"][0]["meta"][f"when_{name}"]
    assert good in (
        datetime.datetime(1970, 1, 1).isoformat(),
        datetime.date(1970, 1, 1).isoformat(),
        "0:00:00",
    )
    assert _cli([str(tmp_path / "p.parquet"), "--out", str(tmp_path / "cli"), "--eval-fraction", "0"]) == 0


def test_an_internal_error_is_exit_3_never_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 means "too many rows rejected" (README); a bug must not look like that."""
    (tmp_path / "p.jsonl").write_text(_lines(_good(1), _good(2)))

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RecursionError("a bug")

    monkeypatch.setattr(import_command.preferences, "import_preferences", broken)
    assert _cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")]) == 3
    assert "internal error" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- also noted


def test_text_of_only_invisible_characters_is_empty(tmp_path: Path) -> None:
    rows = [
        _good(1),
        {"prompt": "\x00\x00", "chosen": "fine", "rejected": "also fine"},
        {"prompt": "q3", "chosen": "\u200b\u200b\u200d", "rejected": "fine"},
        {"prompt": "q4", "chosen": "fine", "rejected": "\u2060 \ufeff \u200e"},
        {"prompt": "q5 \u200b", "chosen": "x\u200by", "rejected": "fine"},  # visible text around them is kept
    ]
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    _, out = _run(tmp_path / "p.jsonl", tmp_path / "out")
    assert [(r["row"], r["reasons"]) for r in out["rejected"]] == [
        (2, ["empty:prompt"]),
        (3, ["empty:chosen"]),
        (4, ["empty:rejected"]),
    ]
    (tmp_path / "sft.jsonl").write_text(
        _lines({"prompt": "hello", "completion": "\u200b"}, {"prompt": "a", "completion": "b"})
    )
    paths = [str(tmp_path / "sft" / n) for n in ("t", "e", "r", "h.html")]
    metrics = ingest(str(tmp_path / "sft.jsonl"), *paths, eval_fraction=0.0)
    assert metrics["rejected_empty_completion"] == 1


@pytest.mark.parametrize("inside", ["subdirectory", "same directory"])
def test_the_out_directory_is_never_read_as_input(inside: str, tmp_path: Path) -> None:
    source = tmp_path / "feedback"
    source.mkdir()
    (source / "prefs.jsonl").write_text(_lines(*(_good(n) for n in range(8))))
    out = source / "imported" if inside == "subdirectory" else source
    argv = [str(source), "--out", str(out), "--eval-fraction", "0.25"]
    assert _cli(argv) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert _cli(argv) == 0  # train.jsonl, eval.jsonl, rejected.jsonl, metrics.json... now sit in the source
    second = json.loads((out / "metrics.json").read_text())
    assert first == second and second["rows_input"] == 8 and second["files_read"] == 1


def test_the_cli_documents_its_exit_codes() -> None:
    text = textwrap.dedent(import_command.__doc__ or "")
    for code in (
        "0 done",
        "1 more rows rejected",
        "2 the input or the parameters were refused",
        "3 an internal",
    ):
        assert code in text
