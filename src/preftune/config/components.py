"""Which configs each KFP component's parameters fill: the one place a component, `preftune run` and the
component READMEs learn what a parameter means, its default and what it accepts.

A component parameter named like a field of one of its configs fills that field. A :class:`Link` fills a field
from a parameter of another name (PPO's ``max_kl`` is ``kl_blowup``), or computes it from one (PPO's
minibatch follows the rollout batch). The component builds its configs with :func:`configs_from` (which also
validates them), and `preftune run` calls the same function on the arguments a pipeline would pass, so the
command refuses exactly what the step would.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from preftune.config import (
    dpo,
    evaluate,
    gate,
    grpo,
    ingest,
    kto,
    online_dpo,
    ppo,
    preference_import,
    reward,
    scale,
    sft,
)
from preftune.config.fields import allowed, help_of

F = TypeVar("F", bound=Callable[..., Any])

#: Each config class's validate: the range checks of its metadata plus its cross-field rules.
VALIDATORS: dict[type, Callable[[Any], None]] = {
    sft.SFTConfig: sft.validate,
    reward.RewardConfig: reward.validate,
    dpo.DPOConfig: dpo.validate,
    ppo.PPOConfig: ppo.validate,
    evaluate.EvalConfig: evaluate.validate,
    scale.ScaleConfig: scale.validate,
    ingest.IngestConfig: ingest.validate,
    preference_import.PreferenceImportConfig: preference_import.validate,
    gate.GateConfig: gate.validate,
    grpo.GRPOConfig: grpo.validate,
    kto.KTOConfig: kto.validate,
    online_dpo.OnlineDPOConfig: online_dpo.validate,
}


@dataclass(frozen=True)
class Link:
    """A config field filled from a component parameter of another name; ``derive`` computes it from that
    parameter's value (None: the value as it is, a plain rename). ``note`` is added to the parameter's
    description, for links that make one parameter set a second field."""

    parameter: str
    derive: Callable[[Any], Any] | None = None
    note: str = ""


@dataclass(frozen=True)
class Surface:
    """The configs one component fills from its parameters, and the links between differing names."""

    configs: tuple[type, ...]
    links: Mapping[str, Link] = field(default_factory=dict)

    def fields_of(self, parameter: str) -> list[tuple[type, dataclasses.Field]]:
        """The config fields a parameter fills by name or by plain rename (not derived ones)."""
        found = []
        for cls in self.configs:
            for f in dataclasses.fields(cls):
                link = self.links.get(f.name)
                if (link is None and f.name == parameter) or (
                    link is not None and link.parameter == parameter and link.derive is None
                ):
                    found.append((cls, f))
        return found

    def parameter_of(self, field_name: str) -> str:
        """The component parameter that sets a config field: its own name, or its link's parameter."""
        link = self.links.get(field_name)
        return link.parameter if link is not None else field_name

    def build(self, arguments: Mapping[str, Any]) -> tuple[Any, ...]:
        """The configs from a component's arguments (fields without one keep the config's default)."""
        built = []
        for cls in self.configs:
            values = {}
            for f in dataclasses.fields(cls):
                link = self.links.get(f.name)
                source = link.parameter if link is not None else f.name
                if source in arguments:
                    value = arguments[source]
                    values[f.name] = link.derive(value) if link is not None and link.derive else value
            built.append(cls(**values))
        return tuple(built)

    def describe(self, parameter: str) -> str:
        """A parameter's meaning: its field's help, and what linked fields it also sets."""
        found = self.fields_of(parameter)
        if not found:
            return ""
        text = help_of(found[0][1])
        notes = [link.note for link in self.links.values() if link.parameter == parameter and link.note]
        return " ".join([text, *notes])

    def allowed(self, parameter: str) -> str:
        """What a parameter accepts, from the metadata of the fields it fills."""
        texts = dict.fromkeys(allowed(f) for _, f in self.fields_of(parameter))
        return " and ".join(t for t in texts if t)


def _minibatch(rollout_batch_size: int) -> int:
    return min(8, rollout_batch_size)


#: Component name (its folder under components/ and its function's name) -> the configs its parameters fill.
SURFACES: dict[str, Surface] = {
    "ingest": Surface((ingest.IngestConfig,)),
    "preference_import": Surface((preference_import.PreferenceImportConfig,)),
    "sft": Surface((sft.SFTConfig, scale.ScaleConfig)),
    "reward_model": Surface((reward.RewardConfig, scale.ScaleConfig)),
    "dpo": Surface((dpo.DPOConfig, scale.ScaleConfig)),
    "ppo": Surface(
        (ppo.PPOConfig, scale.ScaleConfig),
        links={
            "kl_blowup": Link("max_kl"),
            "critic_learning_rate": Link(
                "learning_rate", note="The critic learns at the same rate (critic_learning_rate)."
            ),
            "mini_batch_size": Link(
                "rollout_batch_size",
                derive=_minibatch,
                note="Each PPO optimisation step takes min(8, this) sequences (mini_batch_size).",
            ),
        },
    ),
    "grpo": Surface((grpo.GRPOConfig, scale.ScaleConfig)),
    "kto": Surface((kto.KTOConfig, scale.ScaleConfig)),
    "online_dpo": Surface((online_dpo.OnlineDPOConfig, scale.ScaleConfig)),
    "evaluate": Surface((evaluate.EvalConfig,)),
    "gate": Surface((gate.GateConfig,)),
}


def configs_from(component: str, arguments: Mapping[str, Any]) -> tuple[Any, ...]:
    """A component's configs built from its arguments (``locals()`` at the top of its body) and validated:
    ConfigError names the first field it refuses."""
    configs = SURFACES[component].build(arguments)
    for config in configs:
        VALIDATORS[type(config)](config)
    return configs


def description(component: str, parameter: str) -> str:
    """What the Kubeflow UI shows next to a config parameter: its meaning and what it accepts."""
    surface = SURFACES[component]
    text, accepts = surface.describe(parameter), surface.allowed(parameter)
    return f"{text} Allowed: {accepts}." if accepts else text


def documented(component: str) -> Callable[[F], F]:
    """Add to a component function's ``Args:`` section an entry for every parameter that fills a config field,
    written from the field's metadata, before ``dsl.component`` reads the docstring; the docstring itself
    documents only the other parameters, so nothing is written twice."""

    def apply(func: F) -> F:
        surface = SURFACES[component]
        names = [n for n in inspect.signature(func).parameters if surface.fields_of(n)]
        entries = "".join(f"\n    {n}: {description(component, n)}" for n in names)
        head, returns, tail = inspect.cleandoc(func.__doc__ or "").partition("\n\nReturns:")
        twice = [n for n in names if f"\n    {n}: " in head]
        if twice:
            raise ValueError(
                f"{func.__name__}: {', '.join(twice)} come from the config metadata; not the docstring"
            )
        if "\nArgs:" not in head:
            head += "\n\nArgs:"
        func.__doc__ = head + entries + returns + tail
        return func

    return apply
