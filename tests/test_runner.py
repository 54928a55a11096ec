"""The local runner on tiny pipelines of trivial components: the summary.json contract, one directory per run,
refusals before anything runs, failures said and not retried when deterministic, resume, and the steps dying
with the runner."""

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from preftune.orchestration import run_dirs
from preftune.orchestration.runner import (
    FAILED,
    INTERRUPTED,
    NOT_RUN,
    SUCCEEDED,
    RunDirError,
    format_summary,
    run_pipeline,
)

TESTS = Path(__file__).resolve().parent


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


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def flaky(marker: str, error: str, metrics: Output[Metrics]):
    """Fails with ``error`` (a builtin exception name) until ``marker`` exists; counts its attempts there."""
    import builtins
    import os

    attempts = 1
    if os.path.exists(marker + ".count"):
        with open(marker + ".count") as f:
            attempts += int(f.read())
    with open(marker + ".count", "w") as f:
        f.write(str(attempts))
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(attempts))
        raise getattr(builtins, error)(f"attempt {attempts} failed on purpose")
    metrics.log_metric("attempts", attempts)


@dsl.pipeline(name="retry-test")
def retry_pipeline(marker: str, error: str = "ValueError"):
    task = flaky(marker=marker, error=error)
    task.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def gated(gate: str, metrics: Output[Metrics]):
    """Fails (a data error) while the file ``gate`` is missing."""
    import os

    if not os.path.exists(gate):
        raise FileNotFoundError(f"{gate} is missing")
    metrics.log_metric("opened", 1.0)


@dsl.pipeline(name="resume-test")
def resume_pipeline(count: int = 2, gate: str = ""):
    made = make_rows(count=count)
    gated(gate=gate).after(made)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def sleeper(pid_file: str, metrics: Output[Metrics]):
    """Records its pid, then sleeps far longer than any test."""
    import os
    import time

    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    metrics.log_metric("slept", 1.0)


@dsl.pipeline(name="sleep-test")
def sleep_pipeline(pid_file: str):
    sleeper(pid_file=pid_file)


@dsl.pipeline(name="oneof-test")
def oneof_pipeline(big: bool = True):
    """Rows from whichever branch ran, through dsl.OneOf artifacts (kfp.local alone refuses these)."""
    with dsl.If(big == True):  # noqa: E712 - a KFP condition
        many = make_rows(count=5)
    with dsl.Else():
        few = make_rows(count=2)
    check_rows(rows=dsl.OneOf(many.outputs["rows"], few.outputs["rows"]), fail=False)


@pytest.mark.parametrize(("big", "lines"), [(True, 5), (False, 2)])
def test_artifacts_pass_through_oneof_from_the_branch_that_ran(tmp_path: Path, big: bool, lines: int) -> None:
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    before = inspect.getattr_static(OrchestratorUtils, "get_dag_output_artifacts")
    summary = run_pipeline(oneof_pipeline, {"big": big}, tmp_path)
    assert summary["status"] == SUCCEEDED, format_summary(summary)
    assert summary["steps"]["check-rows"]["metrics"] == {"lines": lines}
    assert inspect.getattr_static(OrchestratorUtils, "get_dag_output_artifacts") is before  # put back


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
    assert (run_dir / "index.html").is_file() and summary["index"] == str(run_dir / "index.html")
    assert "make-rows" in (run_dir / "logs" / "make-rows.log").read_text()  # each step's output, in its log


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
    # the reason reaches summary.json and the printed summary, with the step's log
    assert steps["check-rows"]["error"] == "ValueError: asked to fail"
    printed = format_summary(summary)
    assert "error: ValueError: asked to fail" in printed
    assert f"log: {steps['check-rows']['log']}" in printed and "resume with:" in printed


def test_a_deterministic_failure_is_not_retried(tmp_path: Path) -> None:
    """set_retry(3, backoff 60 s) is for preempted pods: a configuration or data error fails at once."""
    marker = tmp_path / "marker"
    summary = run_pipeline(retry_pipeline, {"marker": str(marker), "error": "ValueError"}, tmp_path / "runs")
    step = summary["steps"]["flaky"]
    assert step["status"] == FAILED and step["attempts"] == 1
    assert (tmp_path / "marker.count").read_text() == "1"  # the component ran once
    assert step["error"] == "ValueError: attempt 1 failed on purpose"
    assert step["seconds"] < 60  # no backoff was waited


def test_a_failure_that_may_pass_is_retried_at_once(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    summary = run_pipeline(
        retry_pipeline, {"marker": str(marker), "error": "ConnectionError"}, tmp_path / "runs"
    )
    step = summary["steps"]["flaky"]
    assert summary["status"] == SUCCEEDED
    assert step["attempts"] == 2 and step["metrics"] == {"attempts": 2} and step["error"] is None
    assert step["seconds"] < 60  # locally without the cluster's backoff
    assert "attempt 2" in Path(step["log"]).read_text()


def test_two_runs_into_one_root_each_get_their_own_directory(tmp_path: Path) -> None:
    """Started together, in two processes: two directories, each summary its own run's."""
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_runner import tiny_pipeline
        from preftune.orchestration.runner import run_pipeline
        summary = run_pipeline(tiny_pipeline, {{"count": int(sys.argv[1])}}, {str(tmp_path)!r}, cache=False)
        print(json.dumps({{"run_dir": summary["run_dir"], "count": summary["parameters"]["count"]}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(n)], stdout=subprocess.PIPE, text=True)
        for n in (5, 7)
    ]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    dirs = [Path(r["run_dir"]) for r in results]
    assert dirs[0] != dirs[1] and all(d.parent == tmp_path.resolve() for d in dirs)
    for result, run_dir in zip(results, dirs, strict=True):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["parameters"]["count"] == result["count"]
        rows = Path(summary["steps"]["make-rows"]["artifacts"]["rows"])
        assert rows.is_relative_to(run_dir) and len(rows.read_text().splitlines()) == result["count"]


def _unwritable(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked / "runs"
    return Path("/sys/preftune-runs")  # root may write anywhere but sysfs


@pytest.mark.parametrize("kind", ["file", "device", "through-a-file", "unwritable", "blank"])
def test_an_unusable_pipeline_root_is_refused_before_anything_runs(tmp_path: Path, kind: str) -> None:
    (tmp_path / "afile").write_text("x")
    root = {
        "file": tmp_path / "afile",
        "device": Path("/dev/null"),
        "through-a-file": tmp_path / "afile" / "runs",
        "unwritable": _unwritable(tmp_path),
        "blank": " ",
    }[kind]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(RunDirError, match="pipeline-root"):
        run_pipeline(tiny_pipeline, {}, root)
    assert sorted(tmp_path.rglob("*")) == before


def test_resume_reuses_finished_steps_and_reruns_the_failed_one_in_the_same_directory(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = run_pipeline(resume_pipeline, {"gate": str(gate)}, tmp_path / "runs")
    assert first["status"] == FAILED and first["steps"]["gated"]["error"].startswith("FileNotFoundError")
    assert first["resume"].endswith(f"--resume {first['run_dir']}")
    gate.write_text("open")
    again = run_pipeline(resume_pipeline, {}, tmp_path / "runs", resume=first["run_id"])
    assert again["status"] == SUCCEEDED and again["run_dir"] == first["run_dir"]
    assert again["steps"]["make-rows"]["cached"] and not again["steps"]["gated"]["cached"]
    assert again["parameters"] == first["parameters"] and again["attempt"] == 2
    log = Path(again["steps"]["make-rows"]["log"]).read_text()
    assert log.count("==== make-rows: attempt") == 1  # it ran once, in the first attempt
    assert [r.status for r in run_dirs.runs_under(tmp_path / "runs")] == [SUCCEEDED]


def test_resume_refusals(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = run_pipeline(resume_pipeline, {"gate": str(gate)}, tmp_path / "runs")
    with pytest.raises(RunDirError, match="keeps its own parameters"):
        run_pipeline(resume_pipeline, {"count": 3}, tmp_path / "runs", resume=first["run_dir"])
    with pytest.raises(RunDirError, match="not of runner-test"):
        run_pipeline(tiny_pipeline, {}, tmp_path / "runs", resume=first["run_dir"])
    with pytest.raises(RunDirError, match="no run 'nope'"):
        run_pipeline(resume_pipeline, {}, tmp_path / "runs", resume="nope")
    lock = run_dirs.RunLock(Path(first["run_dir"]))
    lock.acquire()  # as a live `preftune run` holds it
    try:
        with pytest.raises(RunDirError, match="still running"):
            run_pipeline(resume_pipeline, {}, tmp_path / "runs", resume=first["run_dir"])
    finally:
        lock.release()


def _start_sleeper(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    """A runner process whose only step sleeps; returns it, the step's pid and the run root."""
    pid_file, root = tmp_path / "step.pid", tmp_path / "runs"
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from test_runner import sleep_pipeline
        from preftune.orchestration.runner import run_pipeline
        summary = run_pipeline(sleep_pipeline, {{"pid_file": {str(pid_file)!r}}}, {str(root)!r})
        print("STATUS", summary["status"])
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            return runner, int(pid_file.read_text()), root
        time.sleep(0.1)
    runner.kill()
    raise AssertionError("the step never started")


def _gone(pid: int, seconds: float = 20.0) -> bool:
    """Whether process ``pid`` ended (a zombie left to a non-reaping init counts as ended)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_killing_the_runner_stops_its_step(tmp_path: Path) -> None:
    runner, step_pid, root = _start_sleeper(tmp_path)
    runner.kill()  # SIGKILL: the runner cannot clean up; the step must notice by itself
    runner.wait()
    assert _gone(step_pid), "the step outlived the runner"
    (run,) = run_dirs.runs_under(root)
    assert run.status == INTERRUPTED  # its lock went with it


def test_sigterm_stops_the_step_and_still_writes_the_summary(tmp_path: Path) -> None:
    runner, step_pid, root = _start_sleeper(tmp_path)
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert "STATUS INTERRUPTED" in out
    assert _gone(step_pid)
    (run,) = run_dirs.runs_under(root)
    assert run.status == INTERRUPTED and run.summary["steps"]["sleeper"]["status"] == INTERRUPTED
    assert "--resume" in run.summary["resume"]


def test_quiet_by_default_and_every_detail_with_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_pipeline(tiny_pipeline, {"count": 2}, tmp_path / "quiet", cache=False)
    quiet = capsys.readouterr().out.splitlines()
    assert len(quiet) == 4 and quiet[0].startswith("runner-test: run runner-test-")
    for k, (line, task) in enumerate(
        zip(quiet[1:], ["make-rows", "check-rows", "after-check"], strict=True), 1
    ):
        assert line.startswith(f"[{k}/3] {task} ... ") and line.endswith(" s")
    summary = run_pipeline(tiny_pipeline, {"count": 2}, tmp_path / "verbose", cache=False, verbose=True)
    verbose = capsys.readouterr().out
    assert "[KFP Executor" in verbose and "Executing task" in verbose  # the steps' and KFP's own output
    assert "[3/3] after-check ... " in verbose
    kfp_log = Path(summary["run_dir"]) / "logs" / "kfp.log"
    assert not kfp_log.exists() or "Executing task" not in kfp_log.read_text()  # shown, not hidden
