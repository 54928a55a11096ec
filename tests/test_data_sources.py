"""Feedback at scale (issue 20): Hugging Face dataset ids and save_to_disk directories as sources (through a
pipeline run), hive partitions with ``since`` on S3 (moto) through pyarrow datasets, expectation suites as an
artifact users edit and pass back, and the parallel read giving exactly the serial result."""

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kfp import dsl, local
from kfp.components import load_component_from_file
from s3_server import S3Bucket

from preftune.data import buckets, checkpoints, parallel, sources, spill, suites
from preftune.data.ingest import ingest
from preftune.data.preferences import import_preferences
from preftune.orchestration import compilation

ROOT = compilation.source_root()


def _lines(*rows: Any) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _read(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    )


def _pairs(n: int, start: int = 0) -> list[dict[str, str]]:
    return [
        {"prompt": f"question {i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"}
        for i in range(start, start + n)
    ]


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network and no shared cache: the hub loading code runs on local repository directories only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _hub_repository(root: Path) -> Path:
    """A dataset repository laid out as on the Hub: a dataset card whose YAML names the splits' files."""
    repo = root / "org--feedback"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(_pairs(12)), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(_pairs(4, start=100)), repo / "data" / "test-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: test\n    path: data/test-*.parquet\n---\n# Feedback\n"
    )
    return repo


def _saved(root: Path) -> tuple[Path, Path]:
    """A save_to_disk directory of one dataset (SFT rows) and one of a dataset dict (pairs)."""
    import datasets

    sft = root / "sft-saved"
    rows = [{"prompt": f"say {i}", "completion": f"said {i}"} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(sft))
    pairs = root / "pairs-saved"
    splits = {
        "train": datasets.Dataset.from_list(_pairs(8)),
        "extra": datasets.Dataset.from_list(_pairs(3, 50)),
    }
    datasets.DatasetDict(splits).save_to_disk(str(pairs))
    return sft, pairs


# ---------------------------------------------------------------------------------------------- sources


def test_hub_ids_read_every_split_through_datasets_hub_loading_code(
    offline_hub: None, tmp_path: Path
) -> None:
    repo = _hub_repository(tmp_path)
    listing = sources.list_source(f"hf://{repo}")
    assert [(f.name, f.kind) for f in listing.files] == [("train", "hub"), ("test", "hub")]
    only = sources.list_source(f"hf://{repo}?split=test")
    assert [f.name for f in only.files] == ["test"]
    rows = list(only.files[0].rows())
    assert rows[0].record == _pairs(4, start=100)[0] and [r.row for r in rows] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"expected hf://<dataset id>"):
        sources.list_source("hf://org/name?splt=train")
    assert sources.fingerprint(f"hf://{repo}") == sources.fingerprint(str(repo))


def test_save_to_disk_directories_are_datasets_not_files(offline_hub: None, tmp_path: Path) -> None:
    sft, pairs = _saved(tmp_path)
    assert [(f.name, f.kind) for f in sources.list_source(str(sft)).files] == [("sft-saved", "saved")]
    listing = sources.list_source(str(pairs))
    assert [f.name for f in listing.files] == ["train", "extra"], (
        "dataset_dict.json and state.json are not rows"
    )
    paths = [str(tmp_path / "out" / n) for n in ("train", "eval", "rejected", "report.html")]
    metrics = import_preferences(str(pairs), *paths, eval_fraction=0.0)
    assert (metrics["rows_input"], metrics["pairs_train"], metrics["files_read"]) == (11, 11, 2)
    train = _read(tmp_path / "out" / "train")
    assert {(p["source"]["file"], p["source"]["row"]) for p in train} >= {("train", 1), ("extra", 3)}


@dsl.pipeline(name="datasets-sources")
def _sources_pipeline(hub: str, saved_pairs: str, saved_sft: str) -> None:
    importer = load_component_from_file(str(ROOT / "components" / "preference_import" / "component.yaml"))
    ingester = load_component_from_file(str(ROOT / "components" / "ingest" / "component.yaml"))
    importer(source=hub, eval_fraction=0.25).set_display_name("hub")
    importer(source=saved_pairs, eval_fraction=0.0).set_display_name("saved pairs")
    ingester(source=saved_sft, eval_fraction=0.2)


def test_a_hub_repository_and_save_to_disk_directories_import_through_a_pipeline_run(
    offline_hub: None, tmp_path: Path
) -> None:
    repo = _hub_repository(tmp_path)
    sft, pairs = _saved(tmp_path)
    root = tmp_path / "pipeline-root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    run = _sources_pipeline(hub=f"hf://{repo}", saved_pairs=str(pairs), saved_sft=str(sft))
    assert run is not None
    steps = {
        p.parent.name: json.loads(p.read_text())["artifacts"] for p in root.rglob("executor_output.json")
    }
    metrics = {step: artifacts["metrics"]["artifacts"][0]["metadata"] for step, artifacts in steps.items()}
    assert sorted(metrics) == ["ingest", "preference-import", "preference-import-2"]
    by_rows = {m["rows_input"]: m for m in metrics.values()}
    assert (
        by_rows[16]["pairs_train"] + by_rows[16]["pairs_eval"] == 16 and by_rows[16]["files_read"] == 2
    )  # hub
    assert by_rows[11]["pairs_train"] == 11  # save_to_disk dataset dict: both splits
    assert by_rows[10]["rows_train"] + by_rows[10]["rows_eval"] == 10  # save_to_disk dataset: SFT rows
    for step in steps:
        run_dir = next(root.rglob(f"{step}/expectation_suite"))
        assert json.loads(run_dir.read_text())["preftune_expectation_suites"] == 1
    hub_step = next(s for s, m in metrics.items() if m["rows_input"] == 16)
    pairs = _read(next(root.rglob(f"{hub_step}/train_pairs")))
    assert {p["source"]["file"] for p in pairs} <= {"train", "test"} and pairs[0]["chosen"].startswith("good")


# ---------------------------------------------------------------------------------------------- S3 partitions


def test_hive_partitions_on_s3_with_since_go_through_pyarrow_datasets(s3: S3Bucket, tmp_path: Path) -> None:
    for day, kind in (("2024-06-01", "jsonl"), ("2024-06-02", "parquet"), ("2024-06-03", "jsonl.gz")):
        rows = [{"prompt": f"P {day}", "chosen": "good", "rejected": "bad", "day": day}]
        if kind == "parquet":
            local_file = tmp_path / "part.parquet"
            pq.write_table(pa.Table.from_pylist(rows), local_file)
            s3.put(f"feedback/region=eu/date={day}/part-0.parquet", local_file.read_bytes())
        elif kind == "jsonl.gz":
            s3.put(f"feedback/region=eu/date={day}/part-0.jsonl.gz", gzip.compress(_lines(*rows).encode()))
        else:
            s3.put(f"feedback/region=eu/date={day}/part-0.jsonl", _lines(*rows))
    s3.put("feedback/seed.jsonl", _lines({"prompt": "seed", "chosen": "good", "rejected": "bad"}))
    out = tmp_path / "out"
    paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
    metrics = import_preferences(s3.uri("feedback"), *paths, since="2024-06-02", eval_fraction=0.0)
    train = _read(out / "train")
    assert sorted(p["prompt"][0]["content"] for p in train) == ["P 2024-06-02", "P 2024-06-03", "seed"]
    assert [metrics[k] for k in ("files_read", "files_skipped_since", "files_unpartitioned")] == [3, 1, 1]
    report = (out / "report.html").read_text()
    assert "not read: partition before since=2024-06-02" in report and "seed.jsonl" in report
    minio = import_preferences(
        s3.uri("feedback").replace("s3://", "minio://"), *paths, since="2024-06-02", eval_fraction=0.0
    )  # KFP's MinIO artifact URIs name the same objects
    assert minio == metrics and _read(out / "train") == train


# ---------------------------------------------------------------------------------------------- suites


def test_the_suite_artifact_round_trips_and_an_edited_suite_changes_the_verdict(tmp_path: Path) -> None:
    rows = [
        {"prompt": "short q", "chosen": "an answer of medium length", "rejected": "no", "margin": 0.5},
        {"prompt": "another q", "chosen": "ok", "rejected": "not ok", "margin": 3.0},
        {"prompt": "third q", "chosen": "fine", "rejected": "bad"},
    ]
    (tmp_path / "p.jsonl").write_text(_lines(*rows))

    def run(name: str, **kwargs: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        out = tmp_path / name
        paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
        metrics = import_preferences(
            str(tmp_path / "p.jsonl"),
            *paths,
            eval_fraction=0.0,
            suite_path=str(out / "suite.json"),
            max_rejected_fraction=1.0,
            **kwargs,
        )
        return metrics, _read(out / "rejected")

    metrics, rejected = run("default")
    assert metrics["rows_rejected"] == 0
    document = json.loads((tmp_path / "default" / "suite.json").read_text())
    assert document == suites.check_document(document, "preferences", "here")
    pairs = document["suites"]["pairs"]["expectations"]
    too_long = next(r for r in pairs if r["meta"]["reason"] == "too_long:chosen")
    assert too_long["kwargs"]["max_value"] == {"$PARAMETER": "max_chars"}
    too_long["kwargs"]["max_value"] = 10  # a literal: no longer follows max_chars
    pairs.append(
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "margin", "max_value": 2.0},
            "meta": {
                "reason": "margin_too_high",
                "description": "margin at most 2",
                "failure": "margin over 2",
            },
        }
    )
    (tmp_path / "edited.json").write_text(json.dumps(document))
    metrics, rejected = run("edited", expectation_suite_uri=str(tmp_path / "edited.json"))
    assert [(r["row"], r["reasons"], r["detail"]) for r in rejected] == [
        (1, ["too_long:chosen"], "chosen has more than 10 characters"),
        (2, ["margin_too_high"], "margin over 2"),
    ]
    assert metrics["rejected_margin_too_high"] == 1
    report = (tmp_path / "edited" / "report.html").read_text()
    assert "margin at most 2" in report and "all rows (great-expectations)" in report

    pairs.append({"type": "expect_column_values_to_be_between", "kwargs": {"column": "chosen_text"}})
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(
        suites.SuiteError, match=r"unknown column\(s\) \['chosen_text'\]; the pairs columns are"
    ):
        run("bad", expectation_suite_uri=str(tmp_path / "bad.json"))
    with pytest.raises(suites.SuiteError, match="holds the suites of the 'preferences' import, not 'ingest'"):
        ingest(
            str(tmp_path / "p.jsonl"),
            *(str(tmp_path / "x" / n) for n in "tera"),
            expectation_suite_uri=str(tmp_path / "edited.json"),
        )


def test_the_report_is_rendered_from_the_validation_results(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(_lines(*_pairs(6), _pairs(1)[0]))
    paths = [str(tmp_path / "out" / n) for n in ("train", "eval", "rejected", "report.html")]
    import_preferences(str(tmp_path / "p.jsonl"), *paths, eval_fraction=0.0)
    report = (tmp_path / "out" / "report.html").read_text()
    for text in (
        "Expectations (great-expectations suites)",
        "judged",
        "all rows (great-expectations)",
        "Checkpoints",
        "expect_column_values_to_be_in_set",
        "duplicate",
    ):
        assert text in report, text
    assert "loading great-expectations:" in report or "already loaded" in report


# ---------------------------------------------------------------------------------------------- parallel


def _mixed_source(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    """Four files of three formats, with a duplicate, a reversed pair, a broken line and a file not pairwise."""
    source = tmp_path / "parts"
    source.mkdir()
    rows = _pairs(300)
    rows[7] = dict(rows[3])  # a duplicate across nothing but rows
    rows[250] = {"prompt": rows[10]["prompt"], "chosen": rows[10]["rejected"], "rejected": rows[10]["chosen"]}
    rows[260] = dict(rows[11], chosen="")
    (source / "part-0.jsonl").write_text(_lines(*rows[:120]) + "{broken\n")
    pq.write_table(pa.Table.from_pylist(rows[120:200]), source / "part-1.parquet")
    (source / "part-2.jsonl.gz").write_bytes(gzip.compress(_lines(*rows[200:]).encode()))
    (source / "part-3.jsonl").write_text(_lines({"prompt": "P", "response": "r", "score": 1}))  # not pairwise
    return source, rows


def test_a_parallel_read_gives_exactly_the_serial_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = _mixed_source(tmp_path)
    results = {}
    for workers in ("0", "2"):
        monkeypatch.setenv("PREFTUNE_IMPORT_WORKERS", workers)
        monkeypatch.setattr(parallel, "MIN_BYTES", 0)
        out = tmp_path / f"out-{workers}"
        paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
        metrics = import_preferences(str(source), *paths, eval_fraction=0.2, max_rejected_fraction=1.0)
        results[workers] = (metrics, *(_read(out / n) for n in ("train", "eval", "rejected")))
    assert results["0"] == results["2"]
    metrics, train, held, rejected = results["2"]
    assert metrics["rows_input"] == 302 and {r["row"] for r in rejected if r["file"] == "part-0.jsonl"} >= {
        121
    }
    assert parallel.workers_for(str(source), sources.list_source(str(source)).files, "pairwise") == 2


def _default_and_small(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, run: Callable[[Path], Any]
) -> dict[bool, Any]:
    """``run(out)`` twice: with the default chunk, bucket and sample sizes, and with chunks of 16 rows, hash
    buckets of 8 ids and a great-expectations sample of 40 rows; results keyed by ``small``."""
    results = {}
    for small in (False, True):
        with monkeypatch.context() as patch:
            if small:
                patch.setattr(spill, "COLUMN_ROWS", 16)
                patch.setattr(buckets, "BUCKET_ROWS", 8)
                patch.setattr(checkpoints, "SAMPLE_ROWS", 40)
            results[small] = run(tmp_path / f"out-{small}")
    return results


@pytest.mark.parametrize("workers", ["0", "2"])
def test_chunks_and_buckets_of_a_few_rows_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: str
) -> None:
    """Columns on disk in chunks of 16 rows, hash buckets of 8 ids and a great-expectations sample of 40 rows:
    the import streams through dozens of chunk and bucket files (and, with workers, adopts theirs) and writes
    exactly what a single chunk writes."""
    source, _ = _mixed_source(tmp_path)
    monkeypatch.setenv("PREFTUNE_IMPORT_WORKERS", workers)
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)

    def run(out: Path) -> tuple[Any, ...]:
        paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
        metrics = import_preferences(str(source), *paths, eval_fraction=0.2, max_rejected_fraction=1.0)
        return (metrics, *(_read(out / n) for n in ("train", "eval", "rejected")))

    results = _default_and_small(monkeypatch, tmp_path, run)
    assert results[False] == results[True]
    metrics, train, held, rejected = results[True]
    reasons = {r for row in rejected for r in row["reasons"]}
    assert {"duplicate", "contradiction", "empty:chosen", "invalid_json"} <= reasons, reasons
    assert metrics["pairs_train"] > 0 and metrics["pairs_eval"] > 0
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"]


def test_sft_ingest_in_chunks_of_a_few_rows_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"prompt": f"question {n // 3}", "completion": f"answer {n % 7}"} for n in range(200)]
    rows[50], rows[60] = dict(rows[5]), {"prompt": "", "completion": "x"}
    (tmp_path / "sft.jsonl").write_text(_lines(*rows) + "{broken\n")

    def run(out: Path) -> tuple[Any, ...]:
        paths = [str(out / n) for n in ("train", "eval", "rejected", "report.html")]
        metrics = ingest(str(tmp_path / "sft.jsonl"), *paths, eval_fraction=0.2)
        return (metrics, *(_read(out / n) for n in ("train", "eval", "rejected")))

    results = _default_and_small(monkeypatch, tmp_path, run)
    assert results[False] == results[True]
    metrics, train, held, rejected = results[True]
    assert {r for row in rejected for r in row["reasons"]} == {"duplicate", "empty:prompt", "invalid_json"}
    assert metrics["rows_input"] == len(train) + len(held) + len(rejected) == 201


def test_thumbs_ratings_and_ranked_rows_in_chunks_of_a_few_rows_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The formats grouped by prompt keep their row columns on disk too, and a passed flag per row as one bit."""
    source = tmp_path / "feedback"
    source.mkdir()
    thumbs = [
        {"prompt": f"T{n % 23}", "response": f"answer {n % 5}", "label": ["up", "down", True, 0][n % 4]}
        for n in range(150)
    ]
    thumbs[40]["response"] = ""
    ratings = [
        {
            "prompt": f"R{n % 17}",
            "response": f"reply {n % 6}",
            "score": (n * 7) % 10 / 2,
            "rater": f"u{n % 3}",
        }
        for n in range(150)
    ]
    ratings[9]["score"] = float("nan")
    ranked = [
        {"prompt": f"K{n}", "responses": [f"a{n}", f"b{n}", f"c{n}"], "ranks": [1 + n % 3, 2, 3 - n % 2]}
        for n in range(40)
    ]
    for name, rows in (("thumbs", thumbs), ("ratings", ratings), ("ranked", ranked)):
        (source / f"{name}.jsonl").write_text(_lines(*rows))

    def run(out: Path) -> tuple[Any, ...]:
        names = ("train", "eval", "rejected", "report.html", "suites.json", "utrain", "ueval")
        paths = {n: str(out / n) for n in names}
        metrics = import_preferences(
            str(source),
            *(paths[n] for n in names[:4]),
            suite_path=paths["suites.json"],
            unpaired_train_path=paths["utrain"],
            unpaired_eval_path=paths["ueval"],
            eval_fraction=0.2,
            max_rejected_fraction=1.0,
        )
        kept = ("train", "eval", "rejected", "utrain", "ueval")
        return (metrics, *(_read(out / n) for n in kept))

    results = _default_and_small(monkeypatch, tmp_path, run)
    assert results[False] == results[True]
    metrics, train, held, rejected, utrain, ueval = results[True]
    reasons = {r for row in rejected for r in row["reasons"]}
    assert {"empty:response", "nonfinite:score"} <= reasons, reasons
    assert metrics["raters"] == 3 and 0 < metrics["label_up_fraction"] < 1
    assert len(utrain) + len(ueval) > 100 and train and held
    assert metrics["rows_input"] == metrics["rows_used"] + metrics["rows_rejected"] == 340
