"""The parameter surface: each config field carries its help, default and allowed values in its metadata.

Fields are declared with :func:`param`; :func:`check` enforces what the metadata allows (ranges, choices, finite
numbers) for any config, so each stage's ``validate`` adds only its cross-field rules. The components, `preftune
run` and the component READMEs read the same metadata (:mod:`preftune.config.components`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: How a stage computes: auto = bf16 autocast where the device supports it (a CUDA GPU with bf16), else fp32.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
#: The older spelling of the precision field (``mixed_precision``; "no" = fp32), still read by the engine.
MIXED_PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
#: Attention kernels a stage may ask transformers for; auto = the model's own default (sdpa where supported).
ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Bounds:
    """A numeric range; None is no bound on that side."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True

    def admits(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return False
        return self.high is None or value < self.high or (value == self.high and self.high_inclusive)

    def text(self) -> str:
        """``>= 1``, ``> 0``, ``<= 1`` or ``in [0, 0.5)``."""
        if self.high is None:
            return f"{'>=' if self.low_inclusive else '>'} {_number(self.low)}"
        if self.low is None:
            return f"{'<=' if self.high_inclusive else '<'} {_number(self.high)}"
        return (
            f"in {'[' if self.low_inclusive else '('}{_number(self.low)}, {_number(self.high)}"
            f"{']' if self.high_inclusive else ')'}"
        )


def param(
    default: Any,
    help: str,  # noqa: A002  (the metadata key every reader uses)
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    choices: Iterable[str] = (),
    accepts: str = "",
) -> Any:
    """A config field with its help, default and allowed values: a range, a closed set of choices, or
    ``accepts``, a rule in words that the stage's validate enforces (a date's shape, say)."""
    metadata: dict[str, Any] = {"help": help}
    if accepts:
        metadata["accepts"] = accepts
    if low is not None or high is not None:
        metadata["bounds"] = Bounds(low, high, low_inclusive, high_inclusive)
    if choices:
        metadata["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def bounds_of(field: dataclasses.Field) -> Bounds | None:
    return field.metadata.get("bounds")


def choices_of(field: dataclasses.Field) -> tuple[str, ...]:
    return field.metadata.get("choices", ())


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def allowed(field: dataclasses.Field) -> str:
    """What a field accepts, in words (empty for flags and free text)."""
    if field.metadata.get("accepts"):
        return field.metadata["accepts"]
    if choices_of(field):
        return "one of " + ", ".join(choices_of(field))
    bounds = bounds_of(field)
    if bounds is not None:
        return bounds.text()
    return "a finite number" if is_number(field.default) else ""


class ConfigError(ValueError):
    """A config value the stage refuses; ``fields`` names the fields involved, so a caller can point at the
    parameters that set them."""

    def __init__(self, message: str, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields


def refuse(config: Any, fields: str | tuple[str, ...], message: str) -> ConfigError:
    """The error of a cross-field rule, prefixed with the config's name: ``raise refuse(config, ...)``."""
    names = (fields,) if isinstance(fields, str) else fields
    return ConfigError(f"{type(config).__name__}.{message}", names)


def check_field(config: Any, field: dataclasses.Field) -> None:
    """Refuse a value outside what the field's metadata allows, naming config, field, range and value."""
    value = getattr(config, field.name)
    if value is None or isinstance(value, bool):
        return  # an optional setting that is off, or a flag
    choices = choices_of(field)
    if choices and value not in choices:
        raise refuse(config, field.name, f"{field.name} must be {allowed(field)}, got {value!r}")
    if not is_number(value):
        return
    if not math.isfinite(value):
        raise refuse(config, field.name, f"{field.name} must be a finite number, got {value!r}")
    bounds = bounds_of(field)
    if bounds is not None and not bounds.admits(value):
        raise refuse(config, field.name, f"{field.name} must be {bounds.text()}, got {value!r}")
    if field.metadata.get("by_lora") and value != -1 and value <= 0:
        raise refuse(config, field.name, f"{field.name} must be {allowed(field)}, got {value!r}")


def check(config: Any) -> None:
    """Every field against its metadata, in declaration order, before any model or data is loaded."""
    for field in dataclasses.fields(config):
        check_field(config, field)


#: The name train.loop re-exports.
check_config = check
