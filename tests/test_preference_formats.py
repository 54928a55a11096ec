"""Every feedback format with hand-made rows and the exact pairs (margins, scores, meta) they must give."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from preftune.data import records
from preftune.data.preferences import RejectedFractionError, import_preferences


def _lines(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(source: Path, out: Path, **kwargs: Any) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    kwargs.setdefault("eval_fraction", 0.0)
    paths = {name: out / name for name in ("train", "eval", "rejected")}
    metrics = import_preferences(
        str(source),
        *(str(paths[n]) for n in ("train", "eval", "rejected")),
        str(out / "report.html"),
        **kwargs,
    )
    result = {name: _read(path) for name, path in paths.items()}
    _check_accounting(metrics, result)
    return metrics, result


def _check_accounting(metrics: dict[str, float], out: dict[str, list[dict[str, Any]]]) -> None:
    """rows in = rows used + rows rejected; every rejected row has a reason; pairs counted apart."""
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"]
    assert metrics["rows_rejected"] == len(out["rejected"])
    assert all(r["reasons"] and r["detail"] for r in out["rejected"])
    assert (metrics["pairs_train"], metrics["pairs_eval"]) == (len(out["train"]), len(out["eval"]))


def _p(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _simple(pairs: list[dict[str, Any]]) -> list[tuple[str, str, str, Any]]:
    return [(p["prompt"][-1]["content"], p["chosen"], p["rejected"], p["margin"]) for p in pairs]


# ---------------------------------------------------------------------------------------------- ranked

RANKED = [
    {"prompt": "Q", "responses": ["a", "b", "c", "d"], "ranks": [1, 2, 2, 4], "annotator": "ann1"},
    {"prompt": "T", "responses": ["x", "y"], "ranks": [1, 1]},
]


def test_ranked_all_pairs_with_ties(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text(_lines(*RANKED))
    metrics, out = _run(tmp_path / "r.jsonl", tmp_path / "out")
    assert _simple(out["train"]) == [
        ("Q", "a", "b", 1.0),
        ("Q", "a", "c", 1.0),
        ("Q", "a", "d", 3.0),
        ("Q", "b", "d", 2.0),
        ("Q", "c", "d", 2.0),
    ]
    first = out["train"][0]
    assert first["id"] == records.record_id({"prompt": _p("Q"), "chosen": "a", "rejected": "b"})
    assert first["meta"] == {"annotator": "ann1", "ranks": {"chosen": 1, "rejected": 2}}
    assert first["source"] == {"file": "r.jsonl", "row": 1}
    assert out["rejected"] == [
        {
            "file": "r.jsonl",
            "row": 2,
            "reasons": ["unpaired"],
            "detail": "all 2 responses share one rank (ties make no pair)",
            "record": RANKED[1],
        }
    ]
    assert (metrics["rows_used"], metrics["pairs_tied"], metrics["rejected_unpaired"]) == (1, 2, 1)


def test_ranked_adjacent_levels(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text(_lines(*RANKED))
    metrics, out = _run(tmp_path / "r.jsonl", tmp_path / "out", ranked_pairs="adjacent")
    assert _simple(out["train"]) == [
        ("Q", "a", "b", 1.0),
        ("Q", "a", "c", 1.0),
        ("Q", "b", "d", 2.0),
        ("Q", "c", "d", 2.0),
    ]
    assert metrics["pairs_train"] == 4 and metrics["rows_rejected"] == 1


def test_ranked_row_problems(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 2]},
        {"prompt": "Q2", "responses": ["a"], "ranks": [1]},
        {"prompt": "Q3", "responses": ["a", "b"], "ranks": [1]},
        {"prompt": "Q4", "responses": ["a", ""], "ranks": [1, 2]},
        {"prompt": "Q5", "responses": ["a", "b"], "ranks": ["first", 2]},
    ]
    (tmp_path / "r.jsonl").write_text(_lines(*rows))
    _, out = _run(tmp_path / "r.jsonl", tmp_path / "out", max_rejected_fraction=1.0)
    assert [(r["row"], r["reasons"]) for r in out["rejected"]] == [
        (2, ["invalid:responses"]),
        (3, ["invalid:ranks"]),
        (4, ["empty:responses"]),
        (5, ["invalid:ranks"]),
    ]


# ---------------------------------------------------------------------------------------------- ratings


def test_ratings_without_rater_whole_import_zscores_and_threshold(tmp_path: Path) -> None:
    rows = [
        {"prompt": "P1", "response": "r1", "score": 1},
        {"prompt": "P1", "response": "r2", "score": 3},
        {"prompt": "P1", "response": "r3", "score": 5, "comment": "best"},
        {"prompt": "P2", "response": "r4", "score": 3},
    ]
    (tmp_path / "s.jsonl").write_text(_lines(*rows))
    z = math.sqrt(2)  # scores 1, 3, 5, 3: mean 3, std sqrt(2)
    metrics, out = _run(tmp_path / "s.jsonl", tmp_path / "a", min_score_gap=1.5, max_rejected_fraction=1.0)
    assert out["train"] == [
        {
            "id": records.record_id({"prompt": _p("P1"), "chosen": "r3", "rejected": "r1"}),
            "prompt": _p("P1"),
            "chosen": "r3",
            "rejected": "r1",
            "margin": pytest.approx(2 * z),
            "scores": {"chosen": pytest.approx(z), "rejected": pytest.approx(-z)},
            "meta": {"chosen": [{"comment": "best", "score": 5}], "rejected": [{"score": 1}]},
            "source": {
                "file": "s.jsonl",
                "row": 3,
                "chosen": [{"file": "s.jsonl", "row": 3}],
                "rejected": [{"file": "s.jsonl", "row": 1}],
            },
        }
    ]
    assert [(r["row"], r["reasons"]) for r in out["rejected"]] == [(2, ["unpaired"]), (4, ["unpaired"])]
    assert "less than min_score_gap=1.5" in out["rejected"][0]["detail"]
    assert out["rejected"][1]["detail"] == "the only response to its prompt"
    assert (metrics["rows_used"], metrics["pairs_below_gap"]) == (2, 2)

    metrics, out = _run(tmp_path / "s.jsonl", tmp_path / "b", min_score_gap=1.0)
    assert _simple(out["train"]) == [
        ("P1", "r2", "r1", pytest.approx(z)),
        ("P1", "r3", "r1", pytest.approx(2 * z)),
        ("P1", "r3", "r2", pytest.approx(z)),
    ]
    assert metrics["rows_used"] == 3 and metrics["rows_rejected"] == 1


def test_ratings_per_rater_zscores_averaged_per_response(tmp_path: Path) -> None:
    rows = [
        {"prompt": "P", "response": "r1", "score": 1, "rater": "A"},
        {"prompt": "P", "response": "r2", "score": 2, "rater": "A"},
        {"prompt": "P", "response": "r3", "score": 6, "rater": "B"},
        {"prompt": "P", "response": "r1", "score": 8, "rater": "B"},
        {"prompt": "P", "response": "r2", "score": 10, "rater": "B"},
    ]
    (tmp_path / "s.csv").write_text(
        "prompt,response,score,rater\n"
        + "".join(f"P,{r['response']},{r['score']},{r['rater']}\n" for r in rows)
    )
    b = math.sqrt(8 / 3)  # rater B: 6, 8, 10 -> mean 8
    r1, r2, r3 = (-1 + 0) / 2, (1 + 2 / b) / 2, -2 / b
    metrics, out = _run(tmp_path / "s.csv", tmp_path / "out", min_score_gap=0.5)
    assert _simple(out["train"]) == [
        ("P", "r2", "r1", pytest.approx(r2 - r1)),
        ("P", "r1", "r3", pytest.approx(r1 - r3)),
        ("P", "r2", "r3", pytest.approx(r2 - r3)),
    ]
    first = out["train"][0]
    assert first["scores"] == {"chosen": pytest.approx(r2), "rejected": pytest.approx(r1)}
    assert first["meta"] == {
        "chosen": [{"score": "2", "rater": "A"}, {"score": "10", "rater": "B"}],
        "rejected": [{"score": "1", "rater": "A"}, {"score": "8", "rater": "B"}],
    }
    assert (metrics["rows_input"], metrics["rows_used"], metrics["raters"]) == (5, 5, 2)


def test_ratings_bad_scores(tmp_path: Path) -> None:
    text = (
        _lines({"prompt": "P", "response": "a", "score": 1}, {"prompt": "P", "response": "b", "score": 4})
        + '{"prompt": "P", "response": "c", "score": NaN}\n'
        + _lines({"prompt": "P", "response": "d", "score": "high"}, {"prompt": "P", "response": "e"})
    )
    (tmp_path / "s.jsonl").write_text(text)
    metrics, out = _run(tmp_path / "s.jsonl", tmp_path / "out", max_rejected_fraction=1.0)
    assert [(r["row"], r["reasons"]) for r in out["rejected"]] == [
        (3, ["nonfinite:score"]),
        (4, ["invalid:score"]),
        (5, ["missing:score"]),
    ]
    assert _simple(out["train"]) == [("P", "b", "a", pytest.approx(2.0))]


# ---------------------------------------------------------------------------------------------- binary


def test_binary_label_spellings_cap_and_unpaired(tmp_path: Path) -> None:
    rows = [
        {"prompt": "P", "response": "good1", "label": "up", "rater": "u1"},
        {"prompt": "P", "response": "good2", "label": True},
        {"prompt": "P", "response": "bad1", "label": "thumbs_down"},
        {"prompt": "P", "response": "bad2", "label": 0},
        {"prompt": "Q", "response": "only", "label": "thumbs_up"},
        {"prompt": "R", "response": "x", "label": 1},
        {"prompt": "R", "response": "x", "label": "DOWN"},
        {"prompt": "R", "response": "y", "label": "false"},
        {"prompt": "S", "response": "s", "label": "maybe"},
    ]
    (tmp_path / "b.jsonl").write_text(_lines(*rows))
    metrics, out = _run(
        tmp_path / "b.jsonl", tmp_path / "a", max_pairs_per_prompt=0, max_rejected_fraction=1.0
    )
    assert _simple(out["train"]) == [
        ("P", "good1", "bad1", None),
        ("P", "good1", "bad2", None),
        ("P", "good2", "bad1", None),
        ("P", "good2", "bad2", None),
    ]
    assert out["train"][0]["meta"] == {
        "chosen": [{"rater": "u1", "label": "up"}],
        "rejected": [{"label": "thumbs_down"}],
    }
    assert [(r["row"], r["reasons"]) for r in out["rejected"]] == [
        (5, ["unpaired"]),
        (6, ["contradiction"]),
        (7, ["contradiction"]),
        (8, ["unpaired"]),
        (9, ["invalid:label"]),
    ]
    assert metrics["label_up_fraction"] == pytest.approx(4 / 8)

    capped, out2 = _run(
        tmp_path / "b.jsonl", tmp_path / "b", max_pairs_per_prompt=2, max_rejected_fraction=1.0, seed=3
    )
    again, out3 = _run(
        tmp_path / "b.jsonl", tmp_path / "c", max_pairs_per_prompt=2, max_rejected_fraction=1.0, seed=3
    )
    assert out2 == out3 and len(out2["train"]) == 2 and capped["pairs_capped"] == 2
    covered = {p["chosen"] for p in out2["train"]} | {p["rejected"] for p in out2["train"]}
    assert covered == {"good1", "good2", "bad1", "bad2"}  # the cap keeps every response in some pair
    assert capped["rows_used"] == metrics["rows_used"] == 4


def test_binary_extreme_balance_is_reported(tmp_path: Path) -> None:
    rows = [{"prompt": "P", "response": f"good {i}", "label": "up"} for i in range(12)]
    rows.append({"prompt": "P", "response": "bad", "label": "down"})
    (tmp_path / "b.jsonl").write_text(_lines(*rows))
    metrics, _ = _run(tmp_path / "b.jsonl", tmp_path / "out", max_pairs_per_prompt=0)
    assert metrics["label_up_fraction"] == pytest.approx(12 / 13)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "extremely unbalanced" in report and "92% of rows are up-votes" in report


# ---------------------------------------------------------------------------------------------- pairwise


def test_pairwise_csv_with_margin_and_annotations(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        "prompt,chosen,rejected,margin,comment,annotator,created_at\n"
        "Q,good,bad,1.5,clear win,ann7,2024-05-01T10:00:00Z\n"
        "Q2,fine,poor,,,ann8,2024-05-02T10:00:00Z\n"
    )
    _, out = _run(tmp_path / "p.csv", tmp_path / "out")
    assert _simple(out["train"]) == [("Q", "good", "bad", 1.5), ("Q2", "fine", "poor", None)]
    assert out["train"][0]["meta"] == {
        "comment": "clear win",
        "annotator": "ann7",
        "created_at": "2024-05-01T10:00:00Z",
    }


def test_chat_messages_wherever_text_is(tmp_path: Path) -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hi"}
    rows = [
        {"prompt": [system, user], "response": [{"role": "assistant", "content": "Hello"}], "score": 5},
        {"response": [system, user, {"role": "assistant", "content": "Go away"}], "score": 1},
    ]
    (tmp_path / "s.jsonl").write_text(_lines(*rows))
    _, out = _run(tmp_path / "s.jsonl", tmp_path / "out")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in out["train"]] == [
        ([system, user], "Hello", "Go away")
    ]


# ---------------------------------------------------------------------------------------------- Label Studio


def _task(task_id: int, data: dict[str, Any], *annotations: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "data": data, "annotations": list(annotations), "predictions": []}


def _choice(selected: str, to_name: str = "answer1,answer2") -> dict[str, Any]:
    return {"from_name": "pw", "to_name": to_name, "type": "pairwise", "value": {"selected": selected}}


def test_label_studio_export(tmp_path: Path) -> None:
    comment = {
        "from_name": "why",
        "to_name": "prompt",
        "type": "textarea",
        "value": {"text": ["more precise"]},
    }
    export = [
        _task(
            1,
            {"prompt": "Q1", "answer1": "left answer", "answer2": "right answer", "batch": "b1"},
            {"id": 11, "completed_by": 3, "result": [_choice("left"), comment], "was_cancelled": False},
            {"id": 12, "completed_by": 4, "result": [], "was_cancelled": True},
        ),
        _task(
            2,
            {"question": "Q2", "text1": "first", "text2": "second"},
            {"id": 21, "completed_by": 3, "result": [_choice("right", "text1,text2")]},
        ),
        _task(3, {"prompt": "Q3", "answer1": "a", "answer2": "b"}),
        _task(4, {"prompt": "Q4", "answer1": "a", "answer2": "b"}, {"id": 41, "result": []}),
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    metrics, out = _run(tmp_path / "export.json", tmp_path / "out", max_rejected_fraction=1.0)
    assert _simple(out["train"]) == [
        ("Q1", "left answer", "right answer", None),
        ("Q2", "second", "first", None),
    ]
    assert out["train"][0]["meta"] == {
        "batch": "b1",
        "task_id": 1,
        "annotation_id": 11,
        "annotator": 3,
        "selected": "left",
        "why": {"text": ["more precise"]},
    }
    assert out["train"][0]["source"] == {"file": "export.json", "row": 1, "annotation": 1}
    assert [(r["row"], r.get("annotation"), r["reasons"]) for r in out["rejected"]] == [
        (1, 2, ["skipped"]),
        (3, None, ["unannotated"]),
        (4, 1, ["no_choice"]),
    ]
    assert (metrics["rows_input"], metrics["rows_used"], metrics["rejected_skipped"]) == (5, 2, 1)


def test_label_studio_disagreeing_annotators_contradict(tmp_path: Path) -> None:
    export = [
        _task(
            1,
            {"prompt": "Q", "answer1": "A", "answer2": "B"},
            {"id": 1, "result": [_choice("left")]},
            {"id": 2, "result": [_choice("right")]},
        ),
        _task(2, {"prompt": "Q2", "answer1": "C", "answer2": "D"}, {"id": 3, "result": [_choice("left")]}),
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    _, out = _run(tmp_path / "export.json", tmp_path / "out", max_rejected_fraction=1.0)
    assert [(r["annotation"], r["reasons"]) for r in out["rejected"]] == [
        (1, ["contradiction"]),
        (2, ["contradiction"]),
    ]
    assert _simple(out["train"]) == [("Q2", "C", "D", None)]


# ---------------------------------------------------------------------------------------------- detection, since


def test_auto_detects_each_file_and_named_format_overrides(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_pairs.jsonl").write_text(_lines({"prompt": "P", "chosen": "x", "rejected": "y"}))
    (src / "b_ranked.jsonl").write_text(_lines({"prompt": "R", "responses": ["u", "v"], "ranks": [2, 1]}))
    (src / "c_thumbs.jsonl").write_text(
        _lines(
            {"prompt": "T", "response": "t1", "label": "up"},
            {"prompt": "T", "response": "t2", "label": "down"},
        )
    )
    metrics, out = _run(src, tmp_path / "out")
    assert _simple(out["train"]) == [("P", "x", "y", None), ("R", "v", "u", 1.0), ("T", "t1", "t2", None)]
    assert metrics["rows_used"] == 4

    with pytest.raises(ValueError, match="no usable pairs"):
        _run(src / "a_pairs.jsonl", tmp_path / "named", format="binary")
    assert _read(tmp_path / "named" / "rejected")[0]["reasons"] == ["missing:response", "missing:label"]


def test_unknown_format_is_a_located_error(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text(_lines({"question": "?", "answer": "!"}))
    with pytest.raises(
        ValueError, match=r"^x.jsonl: cannot tell the feedback format.*\['answer', 'question'\]"
    ):
        _run(tmp_path / "x.jsonl", tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "thumbs"}, "format must be one of"),
        ({"ranked_pairs": "some"}, "ranked_pairs must be one of"),
        ({"min_score_gap": -1.0}, "min_score_gap"),
        ({"max_pairs_per_prompt": -1}, "max_pairs_per_prompt"),
        ({"since": "2024/01/01"}, "YYYY-MM-DD"),
        ({"max_rejected_fraction": 1.5}, "max_rejected_fraction"),
        ({"truncation_chars": -1}, "truncation_chars"),
    ],
)
def test_bad_parameters(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    (tmp_path / "p.jsonl").write_text(_lines({"prompt": "P", "chosen": "x", "rejected": "y"}))
    with pytest.raises(ValueError, match=message):
        _run(tmp_path / "p.jsonl", tmp_path / "out", **kwargs)


def test_since_selects_date_partitions_and_keeps_unpartitioned_files(tmp_path: Path) -> None:
    src = tmp_path / "feedback"
    for day in ("2024-05-01", "2024-05-02", "2024-05-03"):
        (src / f"date={day}").mkdir(parents=True)
        (src / f"date={day}" / "part-0.jsonl").write_text(
            _lines({"prompt": f"P {day}", "chosen": "good", "rejected": "bad"})
        )
    (src / "seed.jsonl").write_text(_lines({"prompt": "seed", "chosen": "good", "rejected": "bad"}))
    metrics, out = _run(src, tmp_path / "out", since="2024-05-02")
    assert sorted(p["prompt"][0]["content"] for p in out["train"]) == ["P 2024-05-02", "P 2024-05-03", "seed"]
    assert (metrics["files_read"], metrics["files_skipped_since"], metrics["files_unpartitioned"]) == (
        3,
        1,
        1,
    )
    assert "no date=YYYY-MM-DD partition" in (tmp_path / "out" / "report.html").read_text()


def test_truncation_share_is_reported_not_rejected(tmp_path: Path) -> None:
    rows = [{"prompt": f"P{i}", "chosen": "c" * (50 if i < 3 else 5), "rejected": "r"} for i in range(4)]
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    metrics, out = _run(tmp_path / "p.jsonl", tmp_path / "out", truncation_chars=20)
    assert (metrics["pairs_truncated"], metrics["truncated_fraction"], len(out["train"])) == (3, 0.75, 4)
    assert "training at that length would truncate them" in (tmp_path / "out" / "report.html").read_text()


def test_too_many_rejections_fail_after_writing(tmp_path: Path) -> None:
    rows = [{"prompt": "P", "chosen": "a", "rejected": "b"}] + [
        {"prompt": "", "chosen": "a", "rejected": "b"}
    ] * 2
    (tmp_path / "p.jsonl").write_text(_lines(*rows))
    out = tmp_path / "out"
    with pytest.raises(
        RejectedFractionError, match=r"2 of 3 rows \(67%\) were rejected.*max_rejected_fraction=0.5"
    ):
        _run(tmp_path / "p.jsonl", out)
    assert len(_read(out / "rejected")) == 2 and len(_read(out / "train")) == 1
    assert "the step fails" in (out / "report.html").read_text()
