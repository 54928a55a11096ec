"""The local runner's summary.json contract, on a tiny pipeline of trivial components."""

import json
from pathlib import Path

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from preftune.orchestration.runner import FAILED, NOT_RUN, SUCCEEDED, format_summary, run_pipeline


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def make_rows(count: int, rows: Output[Dataset], metrics: Output[Metrics]):
    with open(rows.path, "w") as f:
        f.write("\n".join(str(i) for i in range(count)))
    metrics.log_metric("rows", count)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def check_rows(rows: Input[Dataset], fail: bool, metrics: Output[Metrics]):
    if fail:
        raise ValueError("asked to fail")
    with open(rows.path) as f:
        metrics.log_metric("lines", len(f.read().splitlines()))


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def after_check(rows: Input[Dataset], metrics: Output[Metrics]):
    metrics.log_metric("ok", 1.0)


@dsl.pipeline(name="runner-test")
def tiny_pipeline(count: int = 3, fail: bool = False):
    made = make_rows(count=count)
    checked = check_rows(rows=made.outputs["rows"], fail=fail)
    checked.set_display_name("Check the rows")
    after_check(rows=made.outputs["rows"]).after(checked)


def test_summary_of_a_successful_run(tmp_path: Path) -> None:
    summary = run_pipeline(tiny_pipeline, {"count": 4}, tmp_path)
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent == tmp_path.resolve()
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == SUCCEEDED
    assert summary["parameters"] == {"count": 4, "fail": False}
    steps = summary["steps"]
    assert {name: s["status"] for name, s in steps.items()} == {
        "make-rows": SUCCEEDED,
        "check-rows": SUCCEEDED,
        "after-check": SUCCEEDED,
    }
    assert list(steps) == ["make-rows", "check-rows", "after-check"]  # in the order they ran
    assert steps["make-rows"]["metrics"] == {"rows": 4}
    assert steps["check-rows"]["metrics"] == {"lines": 4}
    assert steps["check-rows"]["display_name"] == "Check the rows"
    rows_uri = steps["make-rows"]["artifacts"]["rows"]
    assert Path(rows_uri).read_text().splitlines() == ["0", "1", "2", "3"]
    assert set(steps["make-rows"]["artifacts"]) == {"rows", "metrics"}
    assert "SUCCEEDED" in format_summary(summary)


def test_summary_of_a_failed_run(tmp_path: Path) -> None:
    summary = run_pipeline(tiny_pipeline, {"fail": True}, tmp_path)
    steps = summary["steps"]
    assert summary["status"] == FAILED
    assert steps["make-rows"]["status"] == SUCCEEDED
    assert steps["check-rows"]["status"] == FAILED
    assert steps["after-check"]["status"] == NOT_RUN
    assert list(steps) == ["make-rows", "check-rows", "after-check"]  # what never ran comes last
    assert steps["check-rows"]["metrics"] == {}
    assert (Path(summary["run_dir"]) / "summary.json").is_file()
