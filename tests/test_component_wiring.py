"""Every knob a component offers reaches the config or the library call it runs.

A parameter that is accepted, documented and compiled into the YAML but never handed on is silently ignored at
run time; these tests call each component's Python function with every defaulted parameter changed (to another
value its config accepts) and check what the stage or the library function would have been started with.
"""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest

import preftune.data.ingest
import preftune.data.preferences
import preftune.eval.evaluation
import preftune.eval.gate
import preftune.launch.distributed
from components.dpo.component import dpo
from components.evaluate.component import evaluate
from components.gate.component import gate
from components.ingest.component import ingest
from components.ppo.component import ppo
from components.preference_import.component import preference_import
from components.reward_model.component import reward_model
from components.sft.component import sft
from preftune.config.components import SURFACES
from preftune.config.fields import bounds_of, choices_of

#: Values the generic change below cannot pick (a rule in words, not a range).
VALID = {"since": "2026-01-01"}


class Started(Exception):
    """Raised by the stand-ins: the component got as far as starting its stage or library call."""


def changed(name: str, value: object, component: str) -> object:
    """A value of the same type as a default, different from it, and one the parameter's config accepts."""
    if name in VALID:
        return VALID[name]
    fields = SURFACES[component].fields_of(name) if component in SURFACES else []
    field = fields[0][1] if fields else None
    if field is not None and choices_of(field):
        return next(c for c in choices_of(field) if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "-changed"
    if field is not None and field.metadata.get("by_lora"):
        return 3e-3  # -1 = the default by use_lora; anything else must be positive
    candidates = [value + 3, value + 1] if isinstance(value, int) else [value + 0.25, value / 2]
    bounds = bounds_of(field) if field is not None else None
    return next(c for c in candidates if bounds is None or bounds.admits(c))


def call(component, tmp_path, **overrides: object) -> dict:
    """Call the component's function with every defaulted parameter changed; returns the arguments."""
    arguments: dict = {}
    for name, parameter in inspect.signature(component.python_func).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            if parameter.annotation is str:
                arguments[name] = "examples/tiny-llama"
            else:
                path = tmp_path / name
                arguments[name] = SimpleNamespace(path=str(path), uri=str(path), metadata={})
        elif parameter.default is None:
            arguments[name] = None  # an optional input artifact
        else:
            arguments[name] = changed(name, parameter.default, component.name.replace("-", "_"))
    arguments.update(overrides)
    with pytest.raises(Started):
        component.python_func(**arguments)
    return arguments


def capture(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> dict:
    seen: dict = {}

    def stand_in(*args: object, **kwargs: object) -> dict:
        seen.update(args=args, kwargs=kwargs)
        raise Started

    monkeypatch.setattr(module, name, stand_in)
    return seen


def assert_fields_reach(component: str, arguments: dict, config: object) -> None:
    """Every parameter that sets a field of ``config``'s class holds the value the component was called with."""
    for name in arguments:
        for cls, field in SURFACES[component].fields_of(name):
            if not isinstance(config, cls):
                continue  # the scale's fields: checked on launch.distributed.Scale
            assert getattr(config, field.name) == arguments[name], f"{component}: {name} was not passed on"


@pytest.mark.parametrize(
    ("component", "overrides"),
    [
        (sft, {}),
        (reward_model, {}),
        (dpo, {"label_smoothing": 0.0}),  # smoothing is for the sigmoid loss only: one case changes the loss,
        (dpo, {"loss_type": "sigmoid"}),  # the other the smoothing
        (ppo, {}),
    ],
    ids=["sft", "reward_model", "dpo-loss", "dpo-smoothing", "ppo"],
)
def test_every_training_parameter_reaches_the_stage(component, overrides, tmp_path, monkeypatch) -> None:
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    arguments = call(component, tmp_path, **overrides)
    config, scale = seen["args"][1], seen["kwargs"]["scale"]
    assert_fields_reach(component.name.replace("-", "_"), arguments, config)
    assert scale.num_gpus == arguments["num_gpus"]
    assert scale.num_nodes == arguments["num_nodes"]
    assert scale.strategy == arguments["distributed_strategy"]
    assert scale.trainjob_runtime == arguments["trainjob_runtime"]


def test_ppo_derives_the_critic_rate_and_the_minibatch(tmp_path, monkeypatch) -> None:
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    arguments = call(ppo, tmp_path, rollout_batch_size=4)
    config = seen["args"][1]
    assert config.kl_blowup == arguments["max_kl"]
    assert config.critic_learning_rate == arguments["learning_rate"]
    assert config.mini_batch_size == 4  # min(8, rollout_batch_size)
    call(ppo, tmp_path, rollout_batch_size=40)
    assert seen["args"][1].mini_batch_size == 8


def test_lora_alpha_is_a_parameter_not_twice_the_rank(tmp_path, monkeypatch) -> None:
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    call(dpo, tmp_path, lora_r=8, lora_alpha=24, label_smoothing=0.0)
    assert (seen["args"][1].lora_r, seen["args"][1].lora_alpha) == (8, 24)


@pytest.mark.parametrize(
    ("component", "module", "function"),
    [
        (ingest, preftune.data.ingest, "ingest"),
        (preference_import, preftune.data.preferences, "import_preferences"),
        (gate, preftune.eval.gate, "run_gate"),
    ],
    ids=["ingest", "preference_import", "gate"],
)
def test_every_data_and_gate_parameter_reaches_the_library(
    component, module, function, tmp_path, monkeypatch
):
    seen = capture(monkeypatch, module, function)
    arguments = call(component, tmp_path)
    surface = SURFACES[component.name.replace("-", "_")]
    (config_class,) = surface.configs
    for name in (f.name for f in dataclasses.fields(config_class)):
        assert seen["kwargs"][name] == arguments[name], f"{component.name}: {name} was not passed on"


def test_every_evaluate_parameter_reaches_the_config(tmp_path, monkeypatch) -> None:
    seen = capture(monkeypatch, preftune.eval.evaluation, "evaluate")
    arguments = call(evaluate, tmp_path)
    assert_fields_reach("evaluate", arguments, seen["args"][6])


def test_a_refused_value_stops_the_component_before_its_stage_starts(tmp_path, monkeypatch) -> None:
    capture(monkeypatch, preftune.launch.distributed, "run_stage")
    with pytest.raises(ValueError, match=r"DPOConfig.label_smoothing must be in \[0, 0.5\), got 0.5"):
        call(dpo, tmp_path, loss_type="sigmoid", label_smoothing=0.5)


def test_checkpoints_default_next_to_the_model(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried pod finds the checkpoints of the attempt before it, so the default place follows the model."""
    seen = capture(monkeypatch, preftune.launch.distributed, "run_stage")
    arguments = call(dpo, tmp_path, label_smoothing=0.0)
    assert seen["args"][1].checkpoint_uri == arguments["checkpoint_uri"]  # an explicit one wins
    arguments = call(dpo, tmp_path, label_smoothing=0.0, checkpoint_uri="")
    assert seen["args"][1].checkpoint_uri == arguments["model"].uri + "-checkpoints"
