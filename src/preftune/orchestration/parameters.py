"""A pipeline's parameters as a user sets them: names, types, defaults, meaning and allowed values.

What a parameter accepts is not written here: each step's config metadata says it (preftune.config), and
:func:`check_arguments` builds every step's configs from the pipeline's arguments, as the step itself will, and
runs the step's own validation. So `preftune run` and `preftune submit` refuse exactly what the steps would,
naming the pipeline parameter, the config field and the allowed range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from preftune.config.components import SURFACES, configs_from
from preftune.config.fields import ConfigError, allowed
from preftune.orchestration.bindings import TaskBinding, task_bindings

_TYPES = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool"}
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ParameterError(ValueError):
    """A pipeline parameter that does not exist or whose value does not fit its type or its steps."""


@dataclass(frozen=True)
class Parameter:
    """One pipeline parameter as a user sees it: name, type, default, meaning and what it accepts."""

    name: str
    type: str
    default: Any
    description: str
    allowed: str = ""


@dataclass(frozen=True)
class FieldUse:
    """A config field that a pipeline parameter sets, in one task."""

    task: str
    config: type
    field: dataclasses.Field


def parameter_fields(pipeline: Any) -> dict[str, list[FieldUse]]:
    """For each pipeline parameter, the config fields it sets in the pipeline's steps (by name or rename)."""
    uses: dict[str, list[FieldUse]] = {}
    for binding in task_bindings(pipeline):
        surface = SURFACES.get(binding.component)
        if surface is None:
            continue
        for name, (kind, origin) in binding.sources.items():
            if kind == "parameter":
                found = [FieldUse(binding.task, cls, f) for cls, f in surface.fields_of(name)]
                uses.setdefault(origin, []).extend(found)
    return uses


def pipeline_parameters(pipeline: Any) -> dict[str, Parameter]:
    """The parameters of a KFP pipeline function, with types, defaults, descriptions and allowed values."""
    uses = parameter_fields(pipeline)
    params = {}
    for name, spec in (pipeline.component_spec.inputs or {}).items():
        texts = dict.fromkeys(allowed(use.field) for use in uses.get(name, []))
        params[name] = Parameter(
            name=name,
            type=_TYPES.get(str(spec.type), str(spec.type)),
            default=spec.default,
            description=(spec.description or "").strip(),
            allowed=" and ".join(t for t in texts if t),
        )
    return params


def parse_value(param: Parameter, raw: str) -> Any:
    """Convert a command-line string into the parameter's type, with a message a user can act on."""
    text = raw.strip()
    try:
        if param.type == "int":
            return int(text)
        if param.type == "float":
            return float(text)
        if param.type == "bool":
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError
    except ValueError:
        raise ParameterError(
            f"parameter {param.name!r} expects {param.type}, got {raw!r}"
            + (" (use true or false)" if param.type == "bool" else "")
        ) from None
    if "://" in text:  # a location: refuse a scheme no step could read before anything runs
        from preftune.io import storage

        try:
            storage.check_uri(text)
        except ValueError as exc:
            raise ParameterError(f"parameter {param.name!r}: {exc}") from None
    return raw


def _refusal(binding: TaskBinding, err: ConfigError) -> str:
    """The step's refusal, said in the pipeline's parameter names."""
    surface = SURFACES[binding.component]
    inputs = [surface.parameter_of(f) for f in err.fields]
    names = list(dict.fromkeys(binding.parameters_feeding(inputs)))
    if not names:  # a value the pipeline fixes itself
        return f"step {binding.task!r} refuses its settings: {err}"
    label = "parameter" if len(names) == 1 else "parameters"
    return f"{label} {', '.join(map(repr, names))}: {err} (step {binding.task!r})"


def check_arguments(pipeline: Any, overrides: Mapping[str, Any]) -> None:
    """Build every step's configs from the pipeline's defaults and ``overrides`` and validate them as the step
    will; ParameterError names the parameter, the config field and what it accepts."""
    values = {name: p.default for name, p in (pipeline.component_spec.inputs or {}).items()}
    values.update(overrides)
    for binding in task_bindings(pipeline):
        if binding.component not in SURFACES:
            continue
        try:
            configs_from(binding.component, binding.arguments(values))
        except ConfigError as err:
            raise ParameterError(_refusal(binding, err)) from None


def parse_assignments(pipeline: Any, assignments: list[str]) -> dict[str, Any]:
    """Parse ``NAME=VALUE`` strings against a pipeline's parameters; reject unknown names, values of the wrong
    type, and values a step would refuse."""
    params = pipeline_parameters(pipeline)
    values: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ParameterError(f"--param takes NAME=VALUE, got {item!r}")
        name, raw = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in params:
            valid = ", ".join(sorted(params))
            raise ParameterError(f"unknown parameter {name!r}; valid parameters: {valid}")
        values[name] = parse_value(params[name], raw)
    check_arguments(pipeline, values)
    return values
