"""Feedback collection: the labeling batch, its round trip through the preference import, and the component."""

import json
from pathlib import Path

import pytest
from kfp import dsl, local
from kfp.dsl import Model

from preftune.components.collect.component import collect as collect_op
from preftune.data.preferences import import_preferences
from preftune.data.records import read_jsonl
from preftune.eval import collect
from preftune.io import storage
from preftune.orchestration import runner

TINY = str(runner.project_root() / "examples" / "tiny-llama")
PROMPTS = [
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}],
]
RESPONSES = [["Blue.", "Seven apples.", "Blue."], ["Four.", "Twenty-two.", "It is four."]]


def _import(source: str, fmt: str, tmp_path: Path) -> tuple[dict, list[dict]]:
    out = tmp_path / f"import-{fmt}"
    out.mkdir()
    metrics = import_preferences(
        source,
        str(out / "train.jsonl"),
        str(out / "eval.jsonl"),
        str(out / "rejected.jsonl"),
        str(out / "report.html"),
        format=fmt,
        eval_fraction=0.0,
    )
    return metrics, read_jsonl(out / "train.jsonl")


def _written(tmp_path: Path) -> Path:
    batch = collect.build_batch(PROMPTS, RESPONSES, "b1", seed=3)
    uri = collect.write_batch(str(tmp_path / "batches"), "b1", batch, {"batch_id": "b1"})
    return Path(uri)


def test_batch_files_and_their_shape(tmp_path: Path) -> None:
    batch_dir = _written(tmp_path)
    assert sorted(p.name for p in batch_dir.iterdir()) == [
        "labelstudio_config.xml",
        "labelstudio_tasks.json",
        "manifest.json",
        "ranked.jsonl",
        "ratings.jsonl",
    ]
    ranked = read_jsonl(batch_dir / "ranked.jsonl")
    assert [r["responses"] for r in ranked] == RESPONSES
    assert ranked[0]["prompt"] == "Name a colour." and ranked[1]["prompt"] == PROMPTS[1]  # lossless
    assert all(r["ranks"] is None and r["batch_id"] == "b1" for r in ranked)
    assert len({r["item_id"] for r in ranked}) == 2
    ratings = read_jsonl(batch_dir / "ratings.jsonl")
    assert len(ratings) == 6 and len({r["response_id"] for r in ratings}) == 6
    assert all(r["score"] is None and r["rater"] is None for r in ratings)
    tasks = json.loads((batch_dir / "labelstudio_tasks.json").read_text())
    assert len(tasks) == 1 + 3  # "Blue." twice: neither the identical pair nor the same pair again
    assert {t["data"]["prompt_text"] for t in tasks} == {
        "Name a colour.",
        "system: Be brief.\nuser: What is two plus two?",
    }
    manifest = json.loads((batch_dir / "manifest.json").read_text())
    assert "manifest.json" in manifest["files"]
    # the same seed and batch give the same left/right order
    again = collect.build_batch(PROMPTS, RESPONSES, "b1", seed=3)["labelstudio_tasks"]
    assert again == tasks


def test_filled_ranked_and_rated_batches_import_as_pairs(tmp_path: Path) -> None:
    batch_dir = _written(tmp_path)
    filled = tmp_path / "filled"
    filled.mkdir()
    ranked = read_jsonl(batch_dir / "ranked.jsonl")
    ranked[0]["ranks"] = [1, 2, 1]  # the two "Blue." tie
    ranked[1]["ranks"] = [1, 3, 2]
    (filled / "ranked.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ranked))
    metrics, pairs = _import(str(filled / "ranked.jsonl"), "ranked", tmp_path)
    assert metrics["rows_rejected"] == 0
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("Blue.", "Seven apples."),
        ("Four.", "Twenty-two."),
        ("Four.", "It is four."),
        ("It is four.", "Twenty-two."),
    }
    assert all(p["meta"]["batch_id"] == "b1" for p in pairs)
    assert next(p for p in pairs if p["chosen"] == "Four.")["prompt"] == PROMPTS[1]

    ratings = read_jsonl(batch_dir / "ratings.jsonl")
    for row, score in zip(ratings, [5, 1, 5, 5, 1, 3], strict=True):
        row["score"], row["rater"] = score, "r1"
    (filled / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
    metrics, pairs = _import(str(filled / "ratings.jsonl"), "rating", tmp_path)
    assert metrics["rows_rejected"] == 0
    assert ("Blue.", "Seven apples.") in {(p["chosen"], p["rejected"]) for p in pairs}
    assert ("Four.", "Twenty-two.") in {(p["chosen"], p["rejected"]) for p in pairs}


def test_label_studio_export_of_the_tasks_imports_as_pairs(tmp_path: Path) -> None:
    tasks = json.loads((_written(tmp_path) / "labelstudio_tasks.json").read_text())
    export = []
    for number, task in enumerate(tasks, start=1):  # what Label Studio's JSON export looks like after rating
        data = task["data"]
        better = min((data["answer1"], "left"), (data["answer2"], "right"), key=lambda a: len(a[0]))
        export.append(
            {
                "id": number,
                "data": data,
                "annotations": [
                    {
                        "id": 100 + number,
                        "completed_by": 7,
                        "was_cancelled": False,
                        "result": [
                            {
                                "type": "pairwise",
                                "from_name": "pw",
                                "to_name": "answer1,answer2",
                                "value": {"selected": better[1]},
                            },
                            {
                                "type": "textarea",
                                "from_name": "comment",
                                "to_name": "prompt",
                                "value": {"text": ["shorter is better"]},
                            },
                        ],
                    }
                ],
            }
        )
    source = tmp_path / "export.json"
    source.write_text(json.dumps(export))
    metrics, pairs = _import(str(source), "auto", tmp_path)
    assert metrics["rows_input"] == len(tasks) and metrics["rows_rejected"] == 0
    assert len(pairs) == len(tasks)
    assert all(len(p["chosen"]) <= len(p["rejected"]) for p in pairs)
    assert {p["meta"]["item_id"] for p in pairs} == {t["data"]["item_id"] for t in tasks}
    conversation = next(p for p in pairs if p["chosen"] == "Four.")
    assert conversation["prompt"] == PROMPTS[1]  # the task keeps the whole conversation, not its display text


def test_batch_goes_to_s3(s3, tmp_path: Path) -> None:
    batch = collect.build_batch(PROMPTS, RESPONSES, "b2")
    uri = collect.write_batch(s3.uri("feedback/todo"), "b2", batch, {"batch_id": "b2"})
    assert uri == s3.uri("feedback/todo/b2")
    assert len(read_jsonl_bytes(storage.read_bytes(f"{uri}/ratings.jsonl"))) == 6
    assert s3.list_keys("feedback/todo/b2/")[-1].endswith("ratings.jsonl")


def read_jsonl_bytes(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1}, "k must be >= 2"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"batch_id": "../x"}, "invalid batch_id"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_parameters_fail_before_loading_the_model(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        collect.collect("/nonexistent-model", "/nonexistent-prompts", str(tmp_path), **kwargs)


def test_prompts_are_read_in_any_format_and_deduplicated(tmp_path: Path) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "a"}\n{"prompt": [{"role": "user", "content": "a"}]}\n{"prompt": "b"}\n')
    assert collect.read_prompts(str(source)) == [
        [{"role": "user", "content": "a"}],
        [{"role": "user", "content": "b"}],
    ]
    assert len(collect.read_prompts(str(source), max_prompts=1)) == 1
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="missing field 'prompt'"):
        collect.read_prompts(str(tmp_path / "bad.jsonl"))


def test_sampling_is_seeded() -> None:
    settings = {"k": 3, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "batch_size": 4}
    first = collect.sample_responses(TINY, PROMPTS, seed=1, **settings)
    assert [len(r) for r in first] == [3, 3]
    assert collect.sample_responses(TINY, PROMPTS, seed=1, **settings) == first


@dsl.pipeline(name="collect-local")
def collect_pipeline(model_dir: str, prompts: str, out_uri: str):
    model = dsl.importer(artifact_uri=model_dir, artifact_class=Model, reimport=True)
    collect_op(
        model=model.output,
        prompts=prompts,
        out_uri=out_uri,
        k=2,
        max_new_tokens=6,
        batch_id="nightly-1",
    )


def test_collect_component_runs_locally(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    summary = runner.run_pipeline(
        collect_pipeline,
        {"model_dir": TINY, "prompts": str(prompts), "out_uri": str(tmp_path / "batches")},
        tmp_path / "runs",
    )
    step = summary["steps"]["collect"]
    assert step["status"] == runner.SUCCEEDED, summary
    assert step["metrics"]["num_prompts"] == 2 and step["metrics"]["num_responses"] == 4
    batch = tmp_path / "batches" / "nightly-1"
    manifest = json.loads((batch / "manifest.json").read_text())
    assert manifest["sampling"]["k"] == 2 and manifest["model"].endswith("tiny-llama")
    assert [len(r["responses"]) for r in read_jsonl(batch / "ranked.jsonl")] == [2, 2]
