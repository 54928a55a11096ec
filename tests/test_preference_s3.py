"""Preference import from an s3:// prefix of daily partitions, through the moto server on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from s3_server import S3Bucket

from preftune.data.preferences import import_preferences


def _lines(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_s3_prefix_with_date_partitions_honours_since(s3: S3Bucket, tmp_path: Path) -> None:
    for day in ("2024-06-01", "2024-06-02", "2024-06-03"):
        s3.put(
            f"feedback/date={day}/ratings.jsonl",
            _lines(
                {"prompt": f"P {day}", "response": "good", "score": 5, "rater": "a"},
                {"prompt": f"P {day}", "response": "bad", "score": 1, "rater": "a"},
            ),
        )
    s3.put("feedback/date=2024-06-03/_SUCCESS", "")
    out = tmp_path / "out"
    paths = [str(out / name) for name in ("train", "eval", "rejected", "report.html")]
    metrics = import_preferences(s3.uri("feedback/"), *paths, since="2024-06-02", eval_fraction=0.0)
    train = [json.loads(line) for line in (out / "train").read_text().splitlines()]
    assert sorted(p["prompt"][0]["content"] for p in train) == ["P 2024-06-02", "P 2024-06-03"]
    assert all((p["chosen"], p["rejected"]) == ("good", "bad") for p in train)
    assert train[0]["source"]["file"].startswith("date=2024-06-0")
    assert (metrics["rows_input"], metrics["rows_used"], metrics["rows_rejected"]) == (4, 4, 0)
    assert (metrics["files_read"], metrics["files_skipped_since"], metrics["files_skipped"]) == (2, 1, 1)

    everything = import_preferences(s3.uri("feedback"), *paths, eval_fraction=0.0)
    counts = [everything[k] for k in ("files_read", "files_skipped_since", "pairs_train")]
    assert counts == [3, 0, 3]
