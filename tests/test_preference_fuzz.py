"""Property-based fuzzing of the preference import: random rows and random bytes never crash it with anything but
a clear, located error, and every row is accounted for."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.data.preferences import RejectedFractionError, import_preferences
from preftune.data.readers import DataFormatError

KEYS = [
    "prompt",
    "chosen",
    "rejected",
    "margin",
    "responses",
    "ranks",
    "response",
    "score",
    "rater",
    "label",
    "data",
    "annotations",
    "messages",
    "comment",
]
TEXT = st.text(alphabet=st.sampled_from("ab \n\u00e9"), max_size=6)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "bot"]),
        "content": st.one_of(TEXT, st.integers()),
    }
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.sampled_from(["up", "down", "thumbs_up", "left", "right", "1", "nan", "[1, 2]"]),
)
VALUE = st.recursive(
    st.one_of(SCALAR, st.lists(MESSAGE, max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(KEYS + ["result", "value", "selected", "type", "was_cancelled"]),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=8,
)
ROW = st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=6)
FORMAT = st.sampled_from(["auto", "pairwise", "ranked", "rating", "binary", "labelstudio"])
CLEAR = ("no usable pairs in", "cannot hold out an eval split")


def _import(source: Path, out: Path, fmt: str) -> dict[str, float] | None:
    """Run the import; None when it refused with a clear message (the rejected rows are still written)."""
    paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
    try:
        metrics = import_preferences(
            str(source), *paths, format=fmt, eval_fraction=0.0, max_pairs_per_prompt=3
        )
    except RejectedFractionError as err:
        metrics = err.metrics
    except DataFormatError as err:
        assert err.file and str(err).startswith(err.file)
        return None
    except ValueError as err:
        assert str(err).startswith(CLEAR), f"unclear error: {err!r}"
        return None
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"]
    rejected = [json.loads(line) for line in (out / "rejected").read_text().splitlines()]
    assert len(rejected) == metrics["rows_rejected"] and all(r["reasons"] for r in rejected)
    pairs = [json.loads(line) for n in ("train", "eval") for line in (out / n).read_text().splitlines()]
    assert len(pairs) == metrics["pairs_train"] + metrics["pairs_eval"] >= 1
    for pair in pairs:
        assert pair["chosen"].strip() != pair["rejected"].strip()
        assert pair["margin"] is None or (math.isfinite(pair["margin"]) and pair["margin"] >= 0)
    return metrics


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=8), fmt=FORMAT)
def test_random_rows_are_accounted_for(rows: list[dict[str, Any]], fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "fuzz.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        metrics = _import(source, Path(tmp) / "out", fmt)
        if metrics is None and (Path(tmp) / "out" / "rejected").exists():
            rejected = [
                json.loads(line) for line in (Path(tmp) / "out" / "rejected").read_text().splitlines()
            ]
            assert {r["row"] for r in rejected} == set(
                range(1, len(rows) + 1)
            )  # nothing usable: all rejected
        elif metrics is not None:
            assert metrics["rows_input"] >= len(rows)  # a Label Studio task may hold several annotations


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.lists(
            st.one_of(st.binary(max_size=30), st.just(b'{"prompt": "p", "chosen": "a", "rejected": "b"}')),
            max_size=5,
        ).map(b"\n".join),
        st.text(max_size=120).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz"]),
    fmt=FORMAT,
)
def test_random_bytes_never_crash(data: bytes, suffix: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"fuzz{suffix}"
        source.write_bytes(data)
        _import(source, Path(tmp) / "out", fmt)
