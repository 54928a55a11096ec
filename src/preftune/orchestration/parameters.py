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
from preftune.orchestration.bindings import TaskBinding, branch_choices, task_bindings
from preftune.orchestration.help_format import did_you_mean

_TYPES = {"String": "str", "Integer": "int", "Float": "float", "Boolean": "bool"}
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
#: A pipeline carries numbers as JSON (doubles): integers beyond 2**53 would not arrive as given.
MAX_EXACT_INT = 2**53 - 1


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


def _check_text(param: Parameter, raw: str) -> None:
    """A string value must travel as UTF-8 JSON into every step: no NUL, no undecodable bytes."""
    if "\0" in raw:
        raise ParameterError(f"parameter {param.name!r}: a NUL character cannot be part of a value")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        raise ParameterError(
            f"parameter {param.name!r}: {raw.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8"
        ) from None


def parse_value(param: Parameter, raw: str) -> Any:
    """Convert a command-line string into the parameter's type, with a message a user can act on."""
    _check_text(param, raw)
    text = raw.strip()
    try:
        if param.type == "int":
            value = int(text)
            if abs(value) > MAX_EXACT_INT:
                raise ParameterError(
                    f"parameter {param.name!r}: {text} is beyond what a pipeline carries exactly "
                    f"(|value| <= {MAX_EXACT_INT})"
                )
            return value
        if param.type == "float":
            return float(text)
        if param.type == "bool":
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError
    except ValueError as err:
        if isinstance(err, ParameterError):
            raise
        raise ParameterError(
            f"parameter {param.name!r} expects {param.type}, got {raw!r}"
            + (" (use true or false)" if param.type == "bool" else "")
        ) from None
    if "://" in text:  # a location: refuse a scheme no step could read before anything runs
        from preftune.io import registry, storage

        check = registry.check_uri if param.name == "registry_uri" else storage.check_uri
        try:
            check(text)
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
    for name, choices in branch_choices(pipeline).items():
        if values.get(name) not in choices:
            raise ParameterError(
                f"parameter {name!r} must be one of {', '.join(choices)}, got {values.get(name)!r}"
            )
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
            hint = did_you_mean(name, params)
            valid = "" if hint else f" valid parameters: {', '.join(sorted(params))}"
            raise ParameterError(f"unknown parameter {name!r};{hint}{valid} (see --help)")
        values[name] = parse_value(params[name], raw)
    check_arguments(pipeline, values)
    return values
