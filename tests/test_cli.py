"""The preftune command line: parameters, help, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.orchestration import cli
from preftune.orchestration.parameters import ParameterError, parse_assignments, pipeline_parameters
from preftune.orchestration.runner import resolve_arguments
from preftune.pipelines import PIPELINES

DPO = PIPELINES["dpo"]
ROOT = Path(__file__).resolve().parents[1]


def test_every_pipeline_parameter_has_type_default_and_description() -> None:
    params = pipeline_parameters(DPO)
    for required in (
        "base_model",
        "sft_data",
        "preference_data",
        "eval_prompts",
        "use_lora",
        "lora_r",
        "max_length",
        "sft_epochs",
        "sft_learning_rate",
        "dpo_epochs",
        "dpo_learning_rate",
        "dpo_beta",
        "dpo_loss",
        "seed",
    ):
        assert required in params, required
    for p in params.values():
        assert p.type in {"str", "int", "float", "bool"}
        assert p.default is not None
        assert p.description, f"{p.name} has no description"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_help_lists_each_parameter_with_type_default_allowed_values_and_meaning(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", name, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps nothing in the epilog, but be safe
    for p in pipeline_parameters(PIPELINES[name]).values():
        allowed = f", allowed: {p.allowed}" if p.allowed else ""
        assert f"{p.name} ({p.type}, default: {p.default!r}{allowed})" in out
        assert " ".join(p.description.split()) in out


def test_help_shows_the_ranges_the_steps_enforce(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "dpo", "--help"])
    out = capsys.readouterr().out
    assert "dpo_label_smoothing (float, default: 0.0, allowed: in [0, 0.5))" in out
    assert "dpo_loss (str, default: 'sigmoid', allowed: one of sigmoid, ipo, hinge)" in out
    assert "eval_fraction (float, default: 0.1, allowed: in [0, 1))" in out
    assert "since (str, default: '', allowed: empty, or a date as YYYY-MM-DD)" in out


def test_top_level_and_compile_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["compile", "--help"], ["run", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
    out = capsys.readouterr().out
    assert "--check" in out and "--image" in out and "dpo" in out


def test_values_are_parsed_to_their_types() -> None:
    values = parse_assignments(
        DPO, ["seed=3", "dpo_beta=0.25", "use_lora=false", "dpo_loss=ipo", "sft-epochs=2"]
    )
    assert values == {"seed": 3, "dpo_beta": 0.25, "use_lora": False, "dpo_loss": "ipo", "sft_epochs": 2}


def test_unknown_parameter_gets_a_did_you_mean() -> None:
    with pytest.raises(ParameterError) as err:
        parse_assignments(DPO, ["learning_rate=1"])
    message = str(err.value)
    assert "unknown parameter 'learning_rate'; did you mean" in message
    assert "'dpo_learning_rate'" in message and "'sft_learning_rate'" in message
    with pytest.raises(ParameterError, match="unknown parameter 'dpo_bta'; did you mean 'dpo_beta'\\?"):
        parse_assignments(DPO, ["dpo_bta=0.2"])
    # nothing close: the whole list
    with pytest.raises(ParameterError, match="valid parameters: .*base_model, "):
        parse_assignments(DPO, ["nope=1"])


def test_unknown_commands_and_pipelines_get_a_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, hint in ((["rn"], "did you mean 'run' or 'runs'?"), (["run", "dop"], "did you mean 'dpo'?")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2 and hint in capsys.readouterr().err


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("seed=abc", "expects int, got 'abc'"),
        ("dpo_beta=high", "expects float"),
        ("use_lora=maybe", "use true or false"),
        ("seed", "NAME=VALUE"),
        ("sft_data=gs://bucket/sft.jsonl", "parameter 'sft_data': unsupported URI 'gs://bucket/sft.jsonl'"),
        ("registry_uri=http://example.com/registry", "use one of: local path, file://, s3://"),
    ],
)
def test_bad_values_get_clear_messages(item: str, expected: str) -> None:
    with pytest.raises(ParameterError, match=expected):
        parse_assignments(DPO, [item])


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            "dpo_loss=kto",
            # dpo_loss feeds DPO and online DPO alike; KTO is dpo_method=kto, not a loss
            r"parameter 'dpo_loss': (Online)?DPOConfig.loss_type must be one of sigmoid, ipo, hinge, got 'kto'",
        ),
        ("dpo_beta=0", r"parameter 'dpo_beta': \w+Config.beta must be > 0, got 0.0"),
        (
            "dpo_label_smoothing=0.5",
            r"DPOConfig.label_smoothing must be in \[0, 0.5\), got 0.5 \(step 'dpo'\)",
        ),
        ("eval_fraction=1.0", r"parameter 'eval_fraction': \w+Config.eval_fraction must be in \[0, 1\)"),
        ("lora_r=0", r"parameter 'lora_r': \w+Config.lora_r must be >= 1, got 0"),
        ("checkpoint_every=-1", r"parameter 'checkpoint_every': \w+Config.checkpoint_every must be >= 0"),
        ("sft_learning_rate=nan", "SFTConfig.learning_rate must be a finite number, got nan"),
        ("since=2026-02-30", "PreferenceImportConfig.since must be a date as YYYY-MM-DD"),
    ],
)
def test_out_of_range_values_are_rejected_naming_parameter_field_and_range(item: str, expected: str) -> None:
    with pytest.raises(ParameterError, match=expected):
        parse_assignments(DPO, [item])


def test_a_cross_field_rule_names_every_parameter_involved() -> None:
    with pytest.raises(ParameterError) as err:
        parse_assignments(DPO, ["dpo_label_smoothing=0.1", "dpo_loss=ipo"])
    assert str(err.value).startswith("parameters 'dpo_label_smoothing', 'dpo_loss': ")
    assert "applies to loss_type 'sigmoid' only" in str(err.value)
    assert parse_assignments(DPO, ["dpo_label_smoothing=0.1"]) == {"dpo_label_smoothing": 0.1}


def test_cli_rejects_bad_parameter_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "dpo", "--param", "nope=1"]) == 2
    assert "valid parameters" in capsys.readouterr().err
    assert cli.main(["run", "dpo", "--param", "dpo_loss=kto"]) == 2
    assert "must be one of" in capsys.readouterr().err


def test_default_paths_resolve_to_the_bundled_examples() -> None:
    args = resolve_arguments(DPO, {})
    for name in ("base_model", "sft_data", "preference_data", "eval_prompts"):
        assert args[name].startswith("/"), (name, args[name])
    assert resolve_arguments(DPO, {"base_model": "org/model"})["base_model"] == "org/model"
    assert resolve_arguments(DPO, {"sft_data": "s3://b/k"})["sft_data"] == "s3://b/k"


# The issue's cases: NaN and infinite values everywhere, a negative seed, values that used to give protobuf
# tracebacks, and integers or strings a pipeline cannot carry.
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("dpo_beta=nan", r"parameter 'dpo_beta': \w+Config.beta must be a finite number"),
        (
            "dpo_learning_rate=inf",
            r"parameter 'dpo_learning_rate': (DPO|KTO)Config.learning_rate must be a finite",
        ),
        # gate_max_kl sets the evaluation's selection bound and the gate's check; the first refusal is named
        ("gate_max_kl=nan", r"parameter 'gate_max_kl': (Eval|Gate)Config.max_kl must be a finite number"),
        ("sft_learning_rate=nan", "SFTConfig.learning_rate must be a finite number"),
        ("seed=-1", "parameter 'seed': .*must be >= 0, got -1"),
        ("seed=99999999999999999999", "beyond what a pipeline carries exactly"),
        ("base_model=a\x00b", "a NUL character cannot be part of a value"),
        ("model_name=\udc80x", "is not valid UTF-8"),
    ],
)
def test_the_issues_hostile_values_are_refused(item: str, expected: str) -> None:
    with pytest.raises(ParameterError, match=expected):
        parse_assignments(DPO, [item])


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_number_parameter_refuses_non_finite_values(name: str) -> None:
    """No float parameter of any pipeline takes NaN or +-inf: each is refused by name, never a traceback."""
    pipeline = PIPELINES[name]
    floats = [p.name for p in pipeline_parameters(pipeline).values() if p.type == "float"]
    assert floats
    for param in floats:
        for value in ("nan", "inf", "-inf", "1e400"):
            with pytest.raises(ParameterError, match=repr(param)):
                parse_assignments(pipeline, [f"{param}={value}"])


def _modules_after(argv: list[str]) -> tuple[int, set[str]]:
    """Run the command line in a fresh interpreter; its exit code and which heavy modules it imported."""
    probe = (
        "import json, sys\n"
        "from preftune.orchestration import cli\n"
        "try:\n"
        f"    code = cli.main({argv!r})\n"
        "except SystemExit as done:\n"
        "    code = done.code\n"
        "heavy = sorted(m for m in ('torch', 'matplotlib', 'transformers') if m in sys.modules)\n"
        "print(json.dumps([code, heavy]), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    code, heavy = json.loads(done.stderr.strip().splitlines()[-1])
    return code, set(heavy)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["run", "--help"],
        ["run", "dpo", "--help"],
        ["runs", "--help"],
        ["generate", "--help"],
        ["run", "dpo", "--param", "dpo_beta=nan"],
        ["run", "rlhf", "--param", "ppo_learnin_rate=1"],
        ["run", "dpo", "--pipeline-root", "/dev/null"],
    ],
)
def test_help_and_parameter_errors_import_neither_torch_nor_matplotlib(argv: list[str]) -> None:
    code, heavy = _modules_after(argv)
    assert code in (0, 2)
    assert heavy == set(), f"{argv} imported {heavy}"


def test_wrapped_help_keeps_each_parameters_indent() -> None:
    env = {**os.environ, "COLUMNS": "60"}
    out = subprocess.run(
        [sys.executable, "-m", "preftune.orchestration.cli", "run", "dpo", "--help"],
        capture_output=True, text=True, env=env, check=True, timeout=300,
    ).stdout  # fmt: skip
    listing = out.split("pipeline parameters (set with --param NAME=VALUE):")[1].strip("\n").splitlines()
    assert max(len(line) for line in listing) <= 60
    for line in listing:
        assert line.startswith("  "), line
    # a description that wraps stays under its parameter, every continuation line indented like its first
    start = next(i for i, line in enumerate(listing) if line.startswith("  judge_model "))
    description = listing[start + 1 : start + 4]
    assert len(description) >= 2 and all(line.startswith("      ") for line in description)
    header = next(line for line in listing if line.startswith("  preference_format "))
    following = listing[listing.index(header) + 1]
    assert following.startswith("        ")  # the header's own continuation, deeper than a description


def test_cli_refuses_an_unusable_pipeline_root_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    assert cli.main(["run", "dpo", "--pipeline-root", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [tmp_path / "afile"]
