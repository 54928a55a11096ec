"""Finding runs and models after the fact: `preftune runs`, `preftune registry list`, `preftune generate`, the run
index, and the step lines a run prints."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from preftune.io import registry
from preftune.orchestration import cli, run_dirs
from preftune.orchestration.console import STEP_ENV, Console, parse_progress
from preftune.orchestration.generate_command import policy_of_run
from preftune.report.run_index import write_run_index

TESTS = Path(__file__).resolve().parent
TINY = str(TESTS.parent / "examples" / "tiny-llama")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run that succeeded and one whose step failed, in one root."""
    sys.path.insert(0, str(TESTS))
    from test_runner import tiny_pipeline

    from preftune.orchestration.runner import run_pipeline

    root = tmp_path_factory.mktemp("runs")
    run_pipeline(tiny_pipeline, {"count": 2}, root, out=io.StringIO())
    run_pipeline(tiny_pipeline, {"fail": True}, root, out=io.StringIO())
    return root


def test_runs_lists_each_run_with_status_and_headline(
    two_runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["runs", "--pipeline-root", str(two_runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN", "STATUS", "STARTED", "(UTC)", "TIME", "HEADLINE"]
    succeeded, failed = out[1], out[2]
    assert succeeded.startswith("runner-test-") and " SUCCEEDED " in succeeded
    assert " FAILED " in failed and failed.endswith("check-rows failed: ValueError: asked to fail")
    failed_id = failed.split()[0]
    assert out[-1] == f"resume {failed_id} with: preftune run runner-test --resume {two_runs / failed_id}"


def test_a_run_holding_its_lock_is_running(two_runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = next(run_dirs.runs_under(two_runs))
    lock = run_dirs.RunLock(run.path)
    lock.acquire()
    try:
        assert run_dirs.read_run(run.path).status == "RUNNING"
        cli.main(["runs", "--pipeline-root", str(two_runs)])
        assert " RUNNING " in capsys.readouterr().out.splitlines()[1]
    finally:
        lock.release()
    assert run_dirs.read_run(run.path).status == "SUCCEEDED"


def test_runs_under_a_missing_root_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", "--pipeline-root", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def _candidate(path: Path, tag: str) -> str:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(tag.encode() * 64)
    (path / "lineage.json").write_text('{"stage": "dpo", "base_model": "tiny", "chain": []}')
    return str(path)


def test_registry_list_shows_versions_and_the_champion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = str(tmp_path / "registry")
    metrics = {"win_rate_vs_reference": 0.8, "kl_candidate_reference": 2.0}
    registry.promote(_candidate(tmp_path / "a", "a"), uri, "policy", metrics, run_id="run-1")
    registry.promote(
        _candidate(tmp_path / "b", "b"), uri, "policy", {**metrics, "kl_candidate_reference": 1.5}
    )
    registry.set_champion(uri, "policy", 1, reason="rollback")
    registry.promote(_candidate(tmp_path / "c", "c"), uri, "other", metrics)
    assert cli.main(["registry", "list", "--registry", uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "other: 1 version(s), champion: v1"
    assert out[2] == "policy: 2 version(s), champion: v1"
    assert out[3].startswith("  * v1 ") and "win vs SFT 0.8, KL 2" in out[3]
    assert out[4].startswith("    v2 ") and "KL 1.5" in out[4]
    assert cli.main(["registry", "list", "--registry", uri, "policy"]) == 0
    assert capsys.readouterr().out.startswith("policy: 2 version(s)")
    assert cli.main(["registry", "list", "--registry", uri, "nope"]) == 0
    assert "nope: 0 version(s), champion: none yet" in capsys.readouterr().out


def test_generate_answers_with_a_model_and_with_a_registry_champion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--prompt",
        "What is 3 plus 4?",
        "--prompt",
        "Say hello.",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    assert cli.main(["generate", TINY, *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model: {TINY}") and "\n> What is 3 plus 4?\n" in out and "\n> Say hello.\n" in out
    uri = str(tmp_path / "registry")
    registry.promote(TINY, uri, "tiny", {"kl_candidate_reference": 0.0})
    assert cli.main(["generate", "registry:tiny", "--registry", uri, *argv]) == 0
    from_registry = capsys.readouterr().out
    # the same weights answer the same (greedy)
    assert from_registry.split("\n", 1)[1] == out.split("\n", 1)[1]
    assert cli.main(["generate", "registry:tiny@2", "--registry", uri, *argv]) == 2
    assert "has no version 2" in capsys.readouterr().err
    assert cli.main(["generate", TINY, "--prompt", "x", "--top-p", "0"]) == 2


def test_the_policy_of_a_run_is_the_evaluated_candidate() -> None:
    summary = {
        "steps": {
            "evaluate": {"status": "SUCCEEDED", "inputs_from": {"candidate": "ppo"}, "artifacts": {}},
            "ppo": {"status": "SUCCEEDED", "artifacts": {"model": "/runs/r/ppo/model"}},
            "sft": {"status": "SUCCEEDED", "artifacts": {"model": "/runs/r/sft/model"}},
        }
    }
    assert policy_of_run(summary) == "/runs/r/ppo/model"
    with pytest.raises(ValueError, match="no trained model"):
        policy_of_run({"run_id": "x", "steps": {}})


def test_the_run_index_links_reports_as_pages_and_says_why_a_step_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "preftune-dpo-1"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "sft" / "report").write_text("<html><h1>SFT</h1></html>")
    (run_dir / "sft" / "model").mkdir()
    summary = {
        "pipeline": "preftune-dpo",
        "status": "FAILED",
        "duration_seconds": 3.0,
        "parameters": {"seed": 0},
        "steps": {
            "sft": {
                "display_name": "Supervised fine-tuning",
                "status": "SUCCEEDED",
                "metrics": {"eval_loss": 0.4},
                "artifacts": {
                    "report": str(run_dir / "sft" / "report"),
                    "model": str(run_dir / "sft" / "model"),
                },
                "artifact_types": {"report": "system.HTML", "model": "system.Model"},
                "seconds": 2.0,
            },
            "dpo": {
                "display_name": "DPO",
                "status": "FAILED",
                "metrics": {},
                "artifacts": {},
                "error": "ConfigError: DPOConfig.beta must be > 0",
            },
        },
    }
    index = write_run_index(summary, run_dir)
    page = index.read_text()
    assert (run_dir / "reports" / "sft.html").read_text() == "<html><h1>SFT</h1></html>"
    assert "href='reports/sft.html'" in page and "href='sft/model'" in page  # relative: the run can move
    assert "ConfigError: DPOConfig.beta must be &gt; 0" in page and "eval_loss" in page
    write_run_index(summary, run_dir)  # again (a resumed run): the pages are replaced, not duplicated
    assert sorted(p.name for p in (run_dir / "reports").iterdir()) == ["sft.html"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_step_lines_and_progress() -> None:
    plain = io.StringIO()
    console = Console(2, plain)
    label = console.start("sft")
    console.progress("sft", 3, 10)  # not a terminal: no bar
    console.finish(label, "42 s")
    console.finish(console.start("dpo"), "FAILED after 1 s: ValueError: no")
    assert plain.getvalue() == "[1/2] sft ... 42 s\n[2/2] dpo ... FAILED after 1 s: ValueError: no\n"

    terminal = _Terminal()
    console = Console(1, terminal)
    label = console.start("dpo")
    console.progress("dpo", 12, 48)
    console.finish(label, "5 s")
    shown = terminal.getvalue()
    assert "12/48" in shown and shown.endswith("[1/1] dpo ... 5 s\n")


def test_step_progress_lines_are_parsed_from_tqdm() -> None:
    """A step's tqdm bar, with the environment a run gives its steps, comes out as lines the runner reads."""
    import os
    import subprocess

    code = "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='dpo', mininterval=0): pass\n"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **STEP_ENV},
        check=True,
    )
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines() if line]
    parsed = [parse_progress(line) for line in lines]
    assert parsed[0] == ("dpo", 0.0, 3.0) and parsed[-1] == ("dpo", 3.0, 3.0)
    assert parse_progress("plain output") is None


def test_the_summary_shows_skipped_branches_on_one_line_and_headlines_of_any_branch() -> None:
    """A method chosen by dsl.If leaves the other methods' steps SKIPPED: one line for all of them, and the
    chosen branch's evaluate-2 shows the headline metrics an evaluate step shows."""
    from preftune.orchestration.run_summary import format_summary

    def step(status: str, **metrics: float) -> dict:
        return {"status": status, "metrics": metrics, "outputs": {}}

    summary = {
        "pipeline": "preftune-dpo",
        "status": "SUCCEEDED",
        "duration_seconds": 12,
        "run_dir": "/tmp/run",
        "steps": {
            "kto": step("SUCCEEDED"),
            "evaluate-2": step("SUCCEEDED", kl_candidate_reference=0.5),
            "dpo": step("SKIPPED"),
            "evaluate": step("SKIPPED"),
            "promote": step("SKIPPED"),
        },
    }
    lines = format_summary(summary, {"evaluate": ["kl_candidate_reference"]}).splitlines()
    assert [line for line in lines if "SKIPPED" in line] == [
        "  SKIPPED     dpo, evaluate, promote (their condition was false)"
    ]
    assert any(line.strip() == "kl_candidate_reference = 0.5" for line in lines)
