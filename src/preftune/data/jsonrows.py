"""One JSON row parsed defensively: every way a single hostile row can fail is that row's rejection, never a
traceback and never the end of the import.

What a row may not do, and the reason it is rejected with:

* be invalid UTF-8 or invalid JSON, or nest deeper than :data:`MAX_DEPTH` levels (``invalid_utf8``,
  ``invalid_json``): deep nesting would otherwise end in RecursionError somewhere downstream;
* repeat a key in one object (``duplicate_key``): the last value would silently win, and ``chosen`` and
  ``rejected`` could swap meaning;
* hold an integer longer than Python's 4,300-digit limit, or a lone UTF-16 surrogate (``"\\ud800"``), which no
  UTF-8 output can hold (``invalid:<field>``, naming the top-level field it is in).

The checks that cost time run only on rows whose text could fail them (many brackets, a ``\\u`` escape), so plain
rows pay for one parse.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

#: Deepest nesting of objects and lists accepted in one row.
MAX_DEPTH = 64
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Problem:
    """Why one row cannot be read: its rejection ``reason``, what was wrong, and the field when known."""

    reason: str
    detail: str
    field: str | None = None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _LongInt:
    """Stands in for an integer too long for Python to convert, so the row can say which field held it."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


#: One decoder for every row (json.loads with a hook would build a new one per call, a third of a row's cost).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique)


def _long_int(digits: str) -> Any:
    try:
        return int(digits)
    except ValueError:
        return _LongInt(digits)


def kind(value: Any) -> str:
    """A short type name for messages: 'int', 'list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return type(value).__name__


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed value (iterative: no recursion on hostile input)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _find(record: dict[str, Any], test: Any) -> tuple[str, Any] | None:
    """The first top-level field whose value (or key) holds something ``test`` accepts, and that thing."""
    for key, value in record.items():
        stack = [key, value]
        while stack:
            item = stack.pop()
            if test(item):
                return key, item
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return None


def _long_int_problem(text: str) -> Problem:
    """Parse again with long integers kept aside, to name the field that holds one."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300
    try:
        value = json.loads(text, object_pairs_hook=_unique, parse_int=_long_int)
    except ValueError:
        value = None
    found = _find(value, lambda v: isinstance(v, _LongInt)) if isinstance(value, dict) else None
    if found is None:
        return Problem("invalid_json", f"holds an integer longer than Python's limit of {limit} digits")
    field, item = found
    return Problem(
        f"invalid:{field}", f"an integer of {item.digits} digits (Python's limit is {limit})", field
    )


def _surrogate_problem(record: dict[str, Any]) -> Problem | None:
    found = _find(record, lambda v: isinstance(v, str) and _SURROGATE.search(v) is not None)
    if found is None:
        return None
    field, text = found
    char = _SURROGATE.search(text).group()  # type: ignore[union-attr]
    return Problem(
        f"invalid:{field}",
        f"holds a lone surrogate \\u{ord(char):04x}, which is not a Unicode character (no UTF-8 text can hold it)",
        field,
    )


def parse_object(line: bytes) -> tuple[dict[str, Any] | None, Problem | None, str]:
    """One JSONL line: ``(record, None, text)`` or ``(None, problem, text)`` (text decoded with replacement
    characters when it is not UTF-8, for the rejected-rows artifact)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        detail = f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"
        return None, Problem("invalid_utf8", detail), line.decode("utf-8", "replace")
    value, problem = parse_text(text)
    if problem is None and not isinstance(value, dict):
        problem = Problem("not_an_object", f"expected a JSON object, got {kind(value)}")
    return (value if problem is None else None), problem, text


def parse_text(text: str) -> tuple[Any, Problem | None]:
    """A JSON text with every check of the module docstring; ``(value, None)`` or ``(None, problem)``."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return None, Problem("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})")
    except _DuplicateKey as exc:
        return None, Problem(
            "duplicate_key",
            f"the key {exc.key!r} appears twice in one object; which value is meant is unclear",
            exc.key,
        )
    except RecursionError:
        return None, Problem("invalid_json", f"nested deeper than {MAX_DEPTH} levels")
    except ValueError:  # an integer beyond int's digit limit
        return None, _long_int_problem(text)
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        return None, Problem("invalid_json", f"nested deeper than {MAX_DEPTH} levels")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and isinstance(value, (dict, list)):
        problem = _surrogate_problem(value if isinstance(value, dict) else {"(item)": value})
        if problem is not None:
            return None, problem
    return value, None


class _Duplicated(dict):
    """An object of a JSON array item whose key repeated (the array is parsed whole, so it cannot raise)."""

    key = ""


def _marking(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) == len(pairs):
        return record
    seen: set[str] = set()
    marked = _Duplicated(record)
    marked.key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return marked


def parse_array(text: str) -> list[tuple[Any, Problem | None]]:
    """The items of a JSON array document, each with its own problem (the checks of :func:`parse_text`); a
    document that is not an array of JSON values at all raises ValueError with the JSON error."""
    try:
        items = json.loads(text, object_pairs_hook=_marking)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON array ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except ValueError:  # an integer beyond int's digit limit: keep it aside and name it per item
        items = json.loads(text, object_pairs_hook=_marking, parse_int=_long_int)
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON array, got {kind(items)}")
    check_surrogates = "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None
    return [(item, _item_problem(item, check_surrogates)) for item in items]


def _item_problem(item: Any, check_surrogates: bool) -> Problem | None:
    found = _find({"(item)": item}, lambda v: isinstance(v, (_Duplicated, _LongInt)))
    if found is not None and isinstance(item, dict) and found[1] is not item:
        found = _find(item, lambda v: isinstance(v, (_Duplicated, _LongInt))) or found
    if found is not None:
        field, value = found
        if isinstance(value, _Duplicated):
            return Problem(
                "duplicate_key",
                f"the key {value.key!r} appears twice in one object; which value is meant is unclear",
                value.key,
            )
        return Problem(
            f"invalid:{field}", f"an integer of {value.digits} digits (more than Python's limit)", field
        )
    if _depth(item) > MAX_DEPTH:
        return Problem("invalid_json", f"nested deeper than {MAX_DEPTH} levels")
    if check_surrogates and isinstance(item, dict):
        return _surrogate_problem(item)
    return None
