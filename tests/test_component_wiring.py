"""Every knob a training component offers reaches the trainer's config.

A parameter that is accepted, documented and compiled into the YAML but never handed to the config is silently
ignored at run time; these tests call each component's Python function with every defaulted parameter changed and
check what the stage would have been started with.
"""

import inspect
from types import SimpleNamespace

import pytest

import preftune.launch.distributed
from components.dpo.component import dpo
from components.ppo.component import ppo
from components.reward_model.component import reward_model
from components.sft.component import sft

# Parameters that are not config fields of the same name, with where they end up instead.
NOT_IN_CONFIG = {"num_gpus", "num_nodes", "distributed_strategy", "trainjob_runtime", "base_model"}
RENAMED = {"max_kl": "kl_blowup"}


class Started(Exception):
    """Raised by the stand-in run_stage: the component got as far as starting its stage."""


def changed(value: object) -> object:
    """A value of the same type as a default, and different from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        return value + "-changed"
    raise TypeError(f"no changed value for {value!r}")


def start(component, tmp_path, monkeypatch: pytest.MonkeyPatch, **overrides: object) -> tuple[dict, dict]:
    seen: dict = {}

    def fake_run_stage(stage: str, config: object, *, scale: object, **kwargs: object) -> dict:
        seen.update(stage=stage, config=config, scale=scale, kwargs=kwargs)
        raise Started

    monkeypatch.setattr(preftune.launch.distributed, "run_stage", fake_run_stage)
    signature = inspect.signature(component.python_func)
    arguments: dict = {}
    for name, parameter in signature.parameters.items():
        if parameter.default is inspect.Parameter.empty:
            if parameter.annotation is str:
                arguments[name] = "examples/tiny-llama"
            else:
                path = tmp_path / name
                arguments[name] = SimpleNamespace(path=str(path), uri=str(path), metadata={})
        else:
            arguments[name] = changed(parameter.default)
    arguments.update(overrides)
    with pytest.raises(Started):
        component.python_func(**arguments)
    return arguments, seen


@pytest.mark.parametrize("component", [sft, reward_model, dpo, ppo], ids=lambda c: c.name)
def test_every_parameter_reaches_the_stage(component, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    arguments, seen = start(component, tmp_path, monkeypatch)
    config, scale = seen["config"], seen["scale"]
    defaults = {
        name: p.default
        for name, p in inspect.signature(component.python_func).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name in defaults:
        if name in NOT_IN_CONFIG:
            continue
        field = RENAMED.get(name, name)
        assert hasattr(config, field), f"{component.name}: parameter {name!r} has no config field {field!r}"
        assert getattr(config, field) == arguments[name], f"{component.name}: {name} was not passed on"
    assert scale.num_gpus == arguments["num_gpus"]
    assert scale.num_nodes == arguments["num_nodes"]
    assert scale.strategy == arguments["distributed_strategy"]
    assert scale.trainjob_runtime == arguments["trainjob_runtime"]


def test_checkpoints_default_next_to_the_model(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retried pod finds the checkpoints of the attempt before it, so the default place follows the model."""
    arguments, seen = start(dpo, tmp_path, monkeypatch)
    assert seen["config"].checkpoint_uri == arguments["checkpoint_uri"]  # an explicit one wins
    arguments, seen = start(dpo, tmp_path, monkeypatch, checkpoint_uri="")
    assert seen["config"].checkpoint_uri == arguments["model"].uri + "-checkpoints"
