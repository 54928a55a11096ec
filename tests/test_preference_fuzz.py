"""Property-based fuzzing of the preference import: random rows, hostile JSON (deep nesting, huge integers, lone
surrogates, repeated keys), random bytes and compressed files never crash it with anything but a clear, located
error, and every row is accounted for; random Arrow batches streamed from parquet give what the same rows give as
JSON Lines."""

from __future__ import annotations

import gzip
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
#: Raw JSON lines that a single hostile row may be: each must reject that row only.
HOSTILE = st.one_of(
    st.integers(60, 3000).map(
        lambda d: '{"prompt": "p", "chosen": ' + "[" * d + "]" * d + ', "rejected": "r"}'
    ),
    st.integers(300, 6000).map(
        lambda n: '{"prompt": "p", "chosen": "c", "rejected": "r", "margin": 1' + "0" * n + "}"
    ),
    st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y"]).map(
        lambda u: '{"prompt": "p", "chosen": "' + u + '", "rejected": "r"}'
    ),
    st.sampled_from(["prompt", "chosen", "rejected", "margin"]).map(
        lambda k: '{"prompt": "p", "chosen": "c", "rejected": "r", "' + k + '": "again"}'
    ),
)
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
@given(
    rows=st.lists(st.one_of(ROW, ROW, HOSTILE), min_size=1, max_size=8), fmt=FORMAT, compress=st.booleans()
)
def test_random_rows_are_accounted_for(rows: list[Any], fmt: str, compress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / ("fuzz.jsonl.gz" if compress else "fuzz.jsonl")
        text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")
        source.write_bytes(gzip.compress(text) if compress else text)
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
        st.binary(max_size=200).map(gzip.compress),  # valid gzip of anything
        st.lists(HOSTILE, min_size=1, max_size=3).map(lambda rows: "\n".join(rows).encode()),
    ),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz"]),
    fmt=FORMAT,
)
def test_random_bytes_never_crash(data: bytes, suffix: str, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"fuzz{suffix}"
        source.write_bytes(data)
        _import(source, Path(tmp) / "out", fmt)


PLAIN = st.text(alphabet=st.sampled_from(["a", "b", " ", "\u200b", "\x00", "\u00e9", "\ud800"]), max_size=5)
PAIR = st.fixed_dictionaries(
    {
        "prompt": st.one_of(st.none(), PLAIN),
        "chosen": st.one_of(st.none(), PLAIN, st.sampled_from(["same", "x"])),
        "rejected": st.one_of(st.none(), PLAIN, st.sampled_from(["same", "y"])),
        "margin": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 3)),
        "note": st.one_of(st.none(), PLAIN),
    }
)


def _arrow_safe(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet holds only valid UTF-8: a lone surrogate is replaced (the JSON copy gets the same text)."""
    return {
        k: v.encode("utf-8", "replace").decode("utf-8") if isinstance(v, str) else v for k, v in row.items()
    }


def _rows_of(out: Path) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for name in ("train", "eval", "rejected"):
        path = out / name
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        for row in rows:
            row.pop("file", None)
            row.pop("detail", None)
            if isinstance(row.get("source"), dict):
                row["source"].pop("file", None)
        found[name] = rows
    return found


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.lists(PAIR, max_size=6), min_size=1, max_size=5),
    eval_fraction=st.sampled_from([0.0, 0.3]),
)
def test_random_arrow_batches_stream_like_json_lines(
    batches: list[list[dict[str, Any]]], eval_fraction: float
) -> None:
    """Rows in random record batches (one parquet row group each) go through the streaming path and give exactly
    what the same rows give as JSON Lines: the same pairs, the same rejections, the same accounting."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("margin", pa.float64()),
            ("note", pa.string()),
        ]
    )
    batches = [[_arrow_safe(r) for r in batch] for batch in batches]
    rows = [r for batch in batches for r in batch]
    with tempfile.TemporaryDirectory() as tmp:
        parquet, jsonl = Path(tmp) / "fuzz.parquet", Path(tmp) / "fuzz.jsonl"
        with pq.ParquetWriter(parquet, schema) as writer:
            for batch in batches:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        jsonl.write_text("".join(json.dumps({**r, "margin": _as_float(r["margin"])}) + "\n" for r in rows))
        results = []
        for source in (parquet, jsonl):
            out = Path(tmp) / f"out-{source.suffix}"
            paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
            try:
                metrics = import_preferences(
                    str(source), *paths, eval_fraction=eval_fraction, max_rejected_fraction=1
                )
            except ValueError as err:  # nothing usable, or no eval split: the same for both
                assert str(err).startswith(CLEAR) or "no line of this file" in str(err), err
                results.append((type(err), _rows_of(out)["rejected"]))
                continue
            assert metrics["rows_input"] == len(rows) == metrics["rows_used"] + metrics["rows_rejected"]
            results.append((metrics["pairs_train"], metrics["pairs_eval"], _rows_of(out)))
        if not rows:
            return
        assert results[0] == results[1]


def _as_float(value: Any) -> Any:
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
