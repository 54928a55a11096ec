"""Which pipeline parameters feed which component inputs, read from a pipeline's compiled spec.

KFP records, for every task, where each of its inputs comes from: a parameter of the enclosing DAG, a constant,
or another task's output. Tasks inside a condition (``dsl.If``) read the enclosing DAG's values through
``pipelinechannel--`` inputs; :func:`task_bindings` follows them up to the pipeline's own parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Where a value comes from: ("parameter", pipeline parameter name), ("constant", value) or ("runtime", None).
Source = tuple[str, Any]

_TYPES = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float, "BOOLEAN": bool, "STRING": str}


@dataclass
class TaskBinding:
    """One task of a pipeline: its component function, its inputs' defaults and where its arguments come from."""

    task: str
    component: str
    defaults: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)

    def arguments(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The component's parameter values for the pipeline's ``values``; runtime values keep the default."""
        arguments = dict(self.defaults)
        for name, (kind, origin) in self.sources.items():
            if kind == "parameter" and origin in values:
                arguments[name] = values[origin]
            elif kind == "constant":
                arguments[name] = origin
        return arguments

    def parameters_feeding(self, inputs: list[str]) -> list[str]:
        """The pipeline parameters that set any of a component's ``inputs``."""
        return [self.sources[n][1] for n in inputs if self.sources.get(n, ("", None))[0] == "parameter"]


def _typed(value: Any, kind: str) -> Any:
    """A value of the spec's JSON as the component's Python type (JSON numbers are all floats)."""
    convert = _TYPES.get(kind)
    if convert is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value if convert in (None, int) else convert(value)


def _source(spec: Mapping[str, Any], scope: Mapping[str, Source]) -> Source:
    if "componentInputParameter" in spec:
        return scope.get(spec["componentInputParameter"], ("runtime", None))
    constant = spec.get("runtimeValue", {}).get("constant", ...)
    return ("runtime", None) if constant is ... else ("constant", constant)


def _function_name(spec: Mapping[str, Any], component: Mapping[str, Any]) -> str:
    """The Python function a lightweight component's executor runs (empty for other executors)."""
    executor = spec.get("deploymentSpec", {}).get("executors", {}).get(component.get("executorLabel", ""), {})
    args = executor.get("container", {}).get("args", [])
    return args[args.index("--function_to_execute") + 1] if "--function_to_execute" in args else ""


def _walk(
    spec: Mapping[str, Any], dag: Mapping[str, Any], scope: Mapping[str, Source]
) -> Iterator[TaskBinding]:
    components = spec.get("components", {})
    for task_name, task in dag.get("tasks", {}).items():
        component = components.get(task["componentRef"]["name"], {})
        parameters = task.get("inputs", {}).get("parameters", {})
        sources = {name: _source(value, scope) for name, value in parameters.items()}
        if "dag" in component:  # a condition or loop: its inputs are the scope of its tasks
            yield from _walk(spec, component["dag"], sources)
            continue
        declared = component.get("inputDefinitions", {}).get("parameters", {})
        defaults = {
            name: _typed(d["defaultValue"], d.get("parameterType", ""))
            for name, d in declared.items()
            if "defaultValue" in d
        }
        constants = {
            name: ("constant", _typed(origin, declared.get(name, {}).get("parameterType", "")))
            for name, (kind, origin) in sources.items()
            if kind == "constant"
        }
        yield TaskBinding(task_name, _function_name(spec, component), defaults, {**sources, **constants})


def task_bindings(pipeline: Any) -> list[TaskBinding]:
    """Every component task of a compiled pipeline (``@dsl.pipeline`` function), nested DAGs included."""
    from google.protobuf import json_format

    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    root = spec.get("root", {})
    scope = {name: ("parameter", name) for name in root.get("inputDefinitions", {}).get("parameters", {})}
    return list(_walk(spec, root.get("dag", {}), scope))


#: A branch condition on a pipeline parameter's value, as KFP compiles ``dsl.If(parameter == "value")``.
_BRANCH = re.compile(r"parameter_values\['pipelinechannel--(\w+)'\] == '([^'\\]*)'")


def branch_choices(pipeline: Any) -> dict[str, list[str]]:
    """The pipeline parameters that choose a branch (``dsl.If`` / ``dsl.Elif`` on their value: RLHF's
    ``policy_optimizer``, DPO's ``dpo_method``) and the values that choose one: those the conditions compare
    with, and the default. Any other value would run no branch at all."""
    from google.protobuf import json_format

    spec = json_format.MessageToDict(pipeline.pipeline_spec)
    dags = [spec.get("root", {}).get("dag", {})] + [
        c["dag"] for c in spec.get("components", {}).values() if "dag" in c
    ]
    found: dict[str, list[str]] = {}
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            condition = task.get("triggerPolicy", {}).get("condition", "")
            for name, value in _BRANCH.findall(condition):
                found.setdefault(name, []).append(value)
    defaults = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    for name, values in found.items():
        values.append(defaults.get(name, {}).get("defaultValue", ""))
    return {name: list(dict.fromkeys(values)) for name, values in found.items()}
