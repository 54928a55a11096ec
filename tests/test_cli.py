"""The preftune command line: parameters, help, errors."""

from __future__ import annotations

import pytest

from preftune.orchestration import cli
from preftune.orchestration.parameters import ParameterError, parse_assignments, pipeline_parameters
from preftune.orchestration.runner import resolve_arguments
from preftune.pipelines import PIPELINES

DPO = PIPELINES["dpo"]


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


def test_unknown_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(ParameterError) as err:
        parse_assignments(DPO, ["learning_rate=1"])
    message = str(err.value)
    assert "unknown parameter 'learning_rate'" in message
    assert "dpo_learning_rate" in message and "sft_learning_rate" in message


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
            "parameter 'dpo_loss': DPOConfig.loss_type must be one of sigmoid, ipo, hinge, got 'kto'",
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
