"""Preference import: pair shapes (text, messages, TRL conversations), every reason, split by prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from s3_server import S3Bucket

from preftune.data import records
from preftune.data.ingest import metric_name
from preftune.data.preferences import REASONS_BY_FORMAT, import_preferences
from preftune.data.readers import DataFormatError, RawRow


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(
    source: str | Path, out: Path, **kwargs: Any
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    paths = {name: out / name for name in ("train", "eval", "rejected")}
    metrics = import_preferences(
        str(source),
        str(paths["train"]),
        str(paths["eval"]),
        str(paths["rejected"]),
        str(out / "report.html"),
        **kwargs,
    )
    return metrics, {name: _read(path) for name, path in paths.items()}


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _pair(row: dict[str, Any]) -> dict[str, Any]:
    return records.normalize_preference(RawRow("p.jsonl", 1, row))


def test_exact_pair_output(tmp_path: Path) -> None:
    (tmp_path / "prefs.jsonl").write_text(
        _lines(
            {
                "prompt": "Name a colour",
                "chosen": "Blue",
                "rejected": "Seven",
                "margin": 2,
                "comment": "clear",
            },
            {"prompt": "Name a colour", "chosen": "Blue", "rejected": "Seven", "margin": 1},
        )
    )
    metrics, out = _run(tmp_path / "prefs.jsonl", tmp_path / "out", eval_fraction=0.0)
    prompt = [_user("Name a colour")]
    assert out["train"] == [
        {
            "id": records.record_id({"prompt": prompt, "chosen": "Blue", "rejected": "Seven"}),
            "prompt": prompt,
            "chosen": "Blue",
            "rejected": "Seven",
            "margin": 2.0,
            "meta": {"comment": "clear"},
            "source": {"file": "prefs.jsonl", "row": 1},
        }
    ]
    assert out["rejected"] == [
        {
            "file": "prefs.jsonl",
            "row": 2,
            "reasons": ["duplicate"],
            "detail": "same pair as an earlier row (prefs.jsonl, line 1)",
            "record": {"prompt": "Name a colour", "chosen": "Blue", "rejected": "Seven", "margin": 1},
        }
    ]
    assert metrics["rejected_duplicate"] == 1 and metrics["rows_input"] == 2


def test_trl_conversations_without_prompt() -> None:
    system = {"role": "system", "content": "Be kind."}
    pair = _pair(
        {
            "chosen": [system, _user("Hi"), _bot("Hello!")],
            "rejected": [system, _user("Hi"), _bot("Go away.")],
            "source_dataset": "hh",
        }
    )
    assert pair["prompt"] == [system, _user("Hi")]
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == ("Hello!", "Go away.", None)
    assert pair["meta"] == {"source_dataset": "hh"}


def test_trl_conversations_with_prompt_prefix_and_single_messages() -> None:
    by_prefix = _pair(
        {"prompt": [_user("Q")], "chosen": [_user("Q"), _bot("good")], "rejected": [_user("Q"), _bot("bad")]}
    )
    text_prompt = _pair(
        {"prompt": "Q", "chosen": [_user("Q"), _bot("good")], "rejected": [_user("Q"), _bot("bad")]}
    )
    explicit = _pair({"prompt": [_user("Q")], "chosen": [_bot("good")], "rejected": [_bot("bad")]})
    mixed = _pair({"chosen": [_user("Q"), _bot("good")], "rejected": "bad"})
    for pair in (by_prefix, text_prompt, explicit, mixed):
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ([_user("Q")], "good", "bad")
    assert len({p["id"] for p in (by_prefix, text_prompt, explicit, mixed)}) == 1


@pytest.mark.parametrize(
    ("row", "reasons", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, ["missing:prompt"], "missing"),
        ({"prompt": "q", "rejected": "b"}, ["missing:chosen"], "missing value"),
        ({"prompt": "q", "chosen": 3, "rejected": None}, ["invalid:chosen", "missing:rejected"], "got int"),
        ({"prompt": {"a": 1}, "chosen": "a", "rejected": "b"}, ["invalid:prompt"], "got dict"),
        (
            {"prompt": "q", "chosen": [_user("other"), _bot("a")], "rejected": "b"},
            ["invalid:chosen"],
            "start with",
        ),
        (
            {"chosen": [_user("x"), _bot("a")], "rejected": [_user("y"), _bot("b")]},
            ["invalid:chosen", "invalid:rejected"],
            "after the shared prompt",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -1}, ["invalid:margin"], "non-negative"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "lots"}, ["invalid:margin"], "'lots'"),
        (
            {"prompt": [_bot("no question")], "chosen": "a", "rejected": "b"},
            ["invalid:prompt"],
            "end with a user",
        ),
    ],
)
def test_row_problems(row: dict[str, Any], reasons: list[str], message: str) -> None:
    with pytest.raises(records.RowError, match=message) as info:
        _pair(row)
    assert info.value.reasons == reasons
    assert info.value.file == "p.jsonl" and info.value.row == 1


def test_every_rejection_reason_and_accounting(tmp_path: Path) -> None:
    ok = {"prompt": "prompt ok", "chosen": "chosen ok", "rejected": "rejected ok"}
    rows = [
        ok,
        "{broken",
        "@UTF8@",
        '"a string"',
        {"chosen": "chosen 5", "rejected": "rejected 5"},
        {"prompt": "prompt 6", "rejected": "rejected 6"},
        {"prompt": "prompt 7", "chosen": "chosen 7"},
        {"prompt": 7, "chosen": "chosen 8", "rejected": "rejected 8"},
        {"prompt": "prompt 9", "chosen": 9, "rejected": "rejected 9"},
        {"prompt": "prompt 10", "chosen": "chosen 10", "rejected": [_user("x")]},
        {"prompt": "prompt 11", "chosen": "chosen 11", "rejected": "rejected 11", "margin": float("nan")},
        {"prompt": "", "chosen": "chosen 12", "rejected": "rejected 12"},
        {"prompt": "prompt 13", "chosen": " ", "rejected": "rejected 13"},
        {"prompt": "prompt 14", "chosen": "chosen 14", "rejected": ""},
        {"prompt": "pr", "chosen": "chosen 15", "rejected": "rejected 15"},
        {"prompt": "prompt 16", "chosen": "ch", "rejected": "rejected 16"},
        {"prompt": "prompt 17", "chosen": "chosen 17", "rejected": "re"},
        {"prompt": "p" * 41, "chosen": "chosen 18", "rejected": "rejected 18"},
        {"prompt": "prompt 19", "chosen": "c" * 41, "rejected": "rejected 19"},
        {"prompt": "prompt 20", "chosen": "chosen 20", "rejected": "r" * 41},
        {"prompt": "prompt 21", "chosen": "same answer", "rejected": " same answer "},
        dict(ok, margin=0.5),
        {"prompt": "prompt ok", "chosen": "another chosen", "rejected": "rejected ok"},
        {"prompt": "prompt 24", "chosen": "chosen 24", "rejected": "rejected 24"},
        {"prompt": "prompt 26", "chosen": "answer x", "rejected": "answer y"},
        {"prompt": "prompt 26", "chosen": "answer y", "rejected": "answer x"},
        '{"prompt": "prompt 27", "chosen": "chosen 27", "rejected": "rejected 27", "chosen": "rejected 27"}',
    ]
    source = tmp_path / "src"
    source.mkdir()
    text = _lines(*rows).replace("@UTF8@", "\udcfe")  # json.dumps writes the NaN margin as NaN
    (source / "p.jsonl").write_bytes(text.encode("utf-8", "surrogateescape"))
    (source / "p.csv").write_text("prompt,chosen,rejected\nprompt 25,chosen 25,rejected 25\nshort,row\n")
    metrics, out = _run(
        source, tmp_path / "out", eval_fraction=0.34, min_chars=3, max_chars=40, max_rejected_fraction=1.0
    )
    reasons = REASONS_BY_FORMAT["pairwise"]
    counts = {reason: metrics[metric_name(reason)] for reason in reasons}
    assert counts == {reason: 2 if reason == "contradiction" else 1 for reason in reasons}
    assert (metrics["rows_input"], metrics["rows_rejected"], metrics["rows_used"]) == (29, 25, 4)
    assert metrics["rows_train"] + metrics["rows_eval"] == 4 and metrics["rows_eval"] >= 1
    accepted = sorted((r["source"]["file"], r["source"]["row"]) for r in out["train"] + out["eval"])
    assert accepted == [("p.csv", 1), ("p.jsonl", 1), ("p.jsonl", 23), ("p.jsonl", 24)]


def test_split_keeps_each_prompt_in_one_split(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"prompt {p}", "chosen": f"good {p}.{k}", "rejected": f"bad {p}.{k}"}
        for p in range(12)
        for k in range(3)
    ]
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    metrics, out = _run(tmp_path / "p.jsonl", tmp_path / "a", eval_fraction=0.25, seed=7)
    _, again = _run(tmp_path / "p.jsonl", tmp_path / "b", eval_fraction=0.25, seed=7)
    assert out == again
    train = {r["prompt"][0]["content"] for r in out["train"]}
    held = {r["prompt"][0]["content"] for r in out["eval"]}
    assert len(held) == 3 and len(out["eval"]) == 9 and not train & held
    assert metrics["rows_train"] == 27


def test_whole_file_error_names_file(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text("this is,not,jsonl\nat all\n")
    with pytest.raises(DataFormatError, match=r"^p.jsonl, line 1: no line of this file is a JSON object"):
        _run(tmp_path / "p.jsonl", tmp_path / "out")


def test_import_from_s3(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put(
        "feedback/day1.jsonl",
        _lines(*[{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(3)]),
    )
    s3.put("feedback/day2.jsonl", _lines({"prompt": "q9", "chosen": "same", "rejected": "same"}))
    metrics, out = _run(s3.uri("feedback/"), tmp_path / "out", eval_fraction=0.3)
    assert (metrics["rows_input"], metrics["rows_train"], metrics["rows_eval"], metrics["rows_rejected"]) == (
        4,
        2,
        1,
        1,
    )
    assert out["rejected"][0]["file"] == "day2.jsonl" and out["rejected"][0]["reasons"] == ["identical_pair"]


def _cli(argv: list[str]) -> int:
    import argparse

    from preftune.data import import_command

    parser = argparse.ArgumentParser(prog="preftune import-preferences")
    import_command.add_arguments(parser)
    return import_command.run(parser.parse_args(argv))


def test_cli_writes_outputs_and_prints_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    rows.append({"prompt": "q9", "chosen": "same", "rejected": "same"})
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    out = tmp_path / "out"
    assert _cli([str(tmp_path / "p.jsonl"), "--out", str(out), "--eval-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "rows: 5 in, 4 used, 1 rejected; pairs: 3 train, 1 eval" in printed
    assert "identical_pair" in printed and "1" in printed.split("identical_pair")[1]
    assert {p.name for p in out.iterdir()} == {
        "train.jsonl",
        "eval.jsonl",
        "rejected.jsonl",
        "report.html",
        "expectation_suite.json",
        "metrics.json",
    }
    assert json.loads((out / "metrics.json").read_text())["rejected_identical_pair"] == 1
    suite = json.loads((out / "expectation_suite.json").read_text())
    assert suite["preftune_expectation_suites"] == 1 and "pairs" in suite["suites"]


def test_cli_fails_when_too_many_rows_are_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q2"}, {"prompt": "q3"}]
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    code = _cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out"), "--eval-fraction", "0"])
    captured = capsys.readouterr()
    assert code == 1
    assert "max_rejected_fraction=0.5" in captured.err and "Traceback" not in captured.err
    assert "missing:chosen" in captured.out and (tmp_path / "out" / "rejected.jsonl").is_file()
    assert (
        _cli(
            [
                str(tmp_path / "p.jsonl"),
                "--out",
                str(tmp_path / "ok"),
                "--eval-fraction",
                "0",
                "--max-rejected-fraction",
                "0.7",
            ]
        )
        == 0
    )


def test_cli_bad_input_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.jsonl").write_bytes(b"PAR1 not really")
    assert _cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preftune import-preferences: error: p.jsonl: file holds parquet data")
    assert _cli([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert _cli([str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--since", "yesterday"]) == 2
