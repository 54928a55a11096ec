"""Running an import's suites (:mod:`suites`) through great-expectations Checkpoints, at any input size.

great-expectations is the judge of every row of an import of up to :data:`SAMPLE_ROWS` rows: a Checkpoint with
``result_format=COMPLETE`` runs the suite, and each expectation's ``unexpected_index_list`` rejects those rows
with the reason in its ``meta.reason``.

Above that it is too slow to judge every row: measured on 1,000,000 pairs (2 shared cores), one Checkpoint of the
13-rule pair suite takes 9.7 s, about 1.3 s per range rule, where the same rules as numpy comparisons take
0.01 s; at 10 million rows it would take longer than the rest of the import. So for large imports:

* rows are judged by :func:`evaluate`, a chunk of rows at a time (:meth:`Validator.run_chunks`; each row's
  failed bitmask goes to a column file, so memory does not grow with the rows), which applies the suite's own
  column-map rules -- values between,
  in a set, not in a set, not null, with ``strict_*``, ``mostly`` and a ``row_condition`` of the form
  ``column <op> number`` -- to every row as numpy masks (tests check it against great-expectations);
* the Checkpoint still runs the whole suite on an evenly spaced sample of :data:`SAMPLE_ROWS` rows, and its
  results are in the report next to the counts over every row; a map rule :func:`evaluate` cannot apply is
  checked on that sample only and rejects no row (the report says so);
* expectations on the table as a whole (a column's mean, say) run through their own Checkpoint on every row: only
  the columns they name are gathered (a few bytes per row; the default suites have one, on thumbs' labels).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from preftune.data import spill
from preftune.data.suites import SuiteError

log = logging.getLogger(__name__)

#: Rows great-expectations validates row by row (all of them up to this many; an even sample above).
SAMPLE_ROWS = 100_000
_CONDITION = re.compile(r"^\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?)\s*$")
_EVALUATED = (
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set",
    "expect_column_values_to_not_be_in_set",
    "expect_column_values_to_not_be_null",
)


@dataclass
class RuleResult:
    """One expectation's result, reduced to what the report and the importer need. ``scope`` says which rows it
    judged and who judged them."""

    expectation: str
    column: str
    reason: str
    description: str
    failure: str
    success: bool
    evaluated: int
    unexpected: int
    scope: str
    observed: Any = None


@dataclass
class SuiteResult:
    """A suite's verdict: ``failed`` holds each row's bitmask over ``reasons`` (0 = accepted) in a column (on
    disk for an import), ``masks`` how many rows failed with each nonzero mask; with every rule's result and how
    long validation took."""

    name: str
    reasons: tuple[str, ...]
    failed: spill.Columns
    rules: list[RuleResult]
    seconds: float
    rows: int
    sampled: int
    masks: Counter[int] = field(default_factory=Counter)

    @property
    def success(self) -> bool:
        return all(r.success for r in self.rules)

    @property
    def accepted(self) -> int:
        """Rows no rule failed."""
        return self.rows - sum(self.masks.values())

    def failed_array(self) -> Any:
        """Every row's mask at once: for suites over few rows (a feedback kind's rows, a test)."""
        return self.failed.numpy("failed")

    def chunks(self) -> Iterator[tuple[int, Any]]:
        """``(start, masks)`` a chunk of rows at a time."""
        for start, part in self.failed.chunks("failed"):
            yield start, part["failed"]

    def reasons_for(self, mask: int) -> list[str]:
        """The reasons of a row's bitmask, in suite order."""
        return [reason for bit, reason in enumerate(self.reasons) if mask >> bit & 1]

    def failures(self) -> dict[str, str]:
        """What a row failing each reason's rule is told (``reason -> failure text``)."""
        return {r.reason: r.failure for r in self.rules if r.reason}


_IMPORTED: dict[str, float] = {}


def load_great_expectations() -> tuple[Any, float]:
    """great-expectations, and the seconds this process spent importing it (0 when it was loaded already).

    Its loggers are kept at WARNING; the import is timed here, not hidden before a timer."""
    import sys

    logger = logging.getLogger("great_expectations")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    if "great_expectations" not in _IMPORTED:
        started = time.perf_counter()
        loaded_before = "great_expectations" in sys.modules
        import great_expectations  # noqa: F401

        _IMPORTED["great_expectations"] = 0.0 if loaded_before else time.perf_counter() - started
    import great_expectations as gx

    return gx, _IMPORTED["great_expectations"]


def _context(gx: Any) -> Any:
    """An in-memory context with analytics and progress bars off (no files, no network, no noise)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _fill(text: str, parameters: Mapping[str, Any]) -> str:
    """``{name}`` in a rule's text replaced by that parameter's value (whole numbers without a ``.0``)."""

    def shown(match: re.Match[str]) -> str:
        value = parameters.get(match.group(1), match.group(0))
        return f"{value:g}" if isinstance(value, float) else str(value)

    return re.sub(r"\{(\w+)\}", shown, text)


def _value(value: Any, parameters: Mapping[str, Any]) -> Any:
    if isinstance(value, dict) and "$PARAMETER" in value:
        return parameters[value["$PARAMETER"]]
    return value


# ---------------------------------------------------------------------------------------------- evaluate


def _condition(kwargs: Mapping[str, Any]) -> str:
    """A rule's row condition as text ('' when none); great-expectations keeps a pandas string condition as a
    pass-through filter."""
    condition = kwargs.get("row_condition")
    if isinstance(condition, dict):
        return (
            str(condition.get("pass_through_filter") or "")
            if condition.get("type") == "pass_through"
            else "?"
        )
    return str(condition or "")


def evaluable(kind: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether :func:`evaluate` applies this rule to every row (else great-expectations checks a sample)."""
    condition = _condition(kwargs)
    return (
        kind in _EVALUATED
        and isinstance(kwargs.get("column"), str)
        and (not condition or (kwargs.get("condition_parser") == "pandas" and _CONDITION.match(condition)))
    )


def evaluate(
    kind: str, kwargs: Mapping[str, Any], columns: Mapping[str, Any], parameters: Mapping[str, Any]
) -> tuple[Any, int, int]:
    """A column-map rule over every row: ``(unexpected mask, rows evaluated, missing)``, as great-expectations
    counts them (missing values are not unexpected; rows outside ``row_condition`` are not evaluated)."""
    import numpy as np

    values = np.asarray(columns[kwargs["column"]])
    evaluated = np.ones(len(values), dtype=bool)
    condition = _condition(kwargs)
    if condition:
        name, op, number = _CONDITION.match(condition).groups()  # type: ignore[union-attr]
        evaluated = _compare(np.asarray(columns[name]), op, float(number))
    missing = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), dtype=bool)
    present = evaluated & ~missing
    if kind == "expect_column_values_to_not_be_null":
        unexpected = evaluated & missing
    elif kind == "expect_column_values_to_be_between":
        unexpected = present & _outside(values, kwargs, parameters)
    else:
        members = np.isin(values, list(_value(kwargs.get("value_set"), parameters) or []))
        unexpected = present & (members if kind.endswith("not_be_in_set") else ~members)
    return unexpected, int(evaluated.sum()), int((evaluated & missing).sum())


def _compare(values: Any, op: str, number: float) -> Any:
    return {
        ">": values > number,
        ">=": values >= number,
        "<": values < number,
        "<=": values <= number,
        "==": values == number,
        "!=": values != number,
    }[op]


def _outside(values: Any, kwargs: Mapping[str, Any], parameters: Mapping[str, Any]) -> Any:
    import numpy as np

    outside = np.zeros(len(values), dtype=bool)
    low, high = _value(kwargs.get("min_value"), parameters), _value(kwargs.get("max_value"), parameters)
    if low is not None:
        outside |= values <= low if kwargs.get("strict_min") else values < low
    if high is not None:
        outside |= values >= high if kwargs.get("strict_max") else values > high
    return outside


# ---------------------------------------------------------------------------------------------- run


@dataclass
class _Tally:
    """One rule's counts, and who judged which rows."""

    evaluated: int = 0
    missing: int = 0
    unexpected: int = 0
    table_success: bool | None = None
    observed: Any = None
    scope: str = ""

    def success(self, mostly: float) -> bool:
        if self.table_success is not None:
            return self.table_success
        counted = self.evaluated - self.missing
        return counted <= 0 or (counted - self.unexpected) / counted >= mostly


def _reason(rule: Any) -> str:
    return str((rule.meta or {}).get("reason") or "")


def _frame(columns: Mapping[str, Any], index: Any = None) -> Any:
    import pandas as pd

    return pd.DataFrame(
        {name: values if index is None else values[index] for name, values in columns.items()}
    )


def _gathered(parts: Iterator[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """Column chunks joined into whole columns."""
    import numpy as np

    collected: dict[str, list[Any]] = {}
    for _, part in parts:
        for name, values in part.items():
            collected.setdefault(name, []).append(np.asarray(values))
    return {name: v[0] if len(v) == 1 else np.concatenate(v) for name, v in collected.items()}


@dataclass
class _Run:
    """One suite run in progress: its rules and tallies, and the failed masks written so far."""

    rules: list[tuple[Any, bool]]
    reasons: tuple[str, ...]
    width: Any
    tallies: list[_Tally]
    failed: spill.Columns
    masks: Counter[int] = field(default_factory=Counter)

    def judge(self, judged: Mapping[int, tuple[Any, int, int, int]], count: int) -> None:
        """The next ``count`` rows: each judged rule's (unexpected rows, evaluated, missing, unexpected count)
        added to its tally and its reason's bit set on the unexpected rows."""
        import numpy as np

        failed = np.zeros(count, dtype=self.width)
        for i, (unexpected, evaluated, missing, found) in judged.items():
            tally = self.tallies[i]
            tally.evaluated += evaluated
            tally.missing += missing
            tally.unexpected += found
            tally.scope = tally.scope or "all rows (great-expectations)"
            reason = _reason(self.rules[i][0])
            if reason and len(unexpected):
                failed[unexpected] |= self.width(1 << self.reasons.index(reason))
        self.failed.arrays["failed"].frombytes(failed.tobytes())
        self.failed.settle()
        values, sizes = np.unique(failed[failed != 0], return_counts=True)
        self.masks.update(dict(zip(values.tolist(), sizes.tolist(), strict=True)))


class Validator:
    """Runs an import's suites (a checked document, :mod:`suites`) through great-expectations Checkpoints."""

    def __init__(self, document: Mapping[str, Any], parameters: Mapping[str, Any]) -> None:
        self.document = document
        self.parameters = dict(parameters)
        self.import_seconds = 0.0
        self._gx: Any = None
        self._context: Any = None
        self._loading: Any = None

    def preload(self) -> None:
        """Start importing great-expectations in a thread, while the import reads its rows: its ~5 s of module
        loading then overlaps reading, which spends most of its time in Arrow kernels, file I/O and worker
        processes. The modules the read itself imports are imported first, here, so that the two threads never
        import one module at once."""
        import concurrent.futures
        import multiprocessing
        import threading

        import numpy
        import pyarrow.compute
        import pyarrow.json
        import pyarrow.parquet

        del concurrent, multiprocessing, numpy, pyarrow  # imported for their side effect: loaded here, first

        if self._loading is None and self._gx is None:
            self._loading = threading.Thread(target=load_great_expectations, daemon=True)
            self._loading.start()

    def _start(self) -> Any:
        if self._loading is not None:
            self._loading.join()
            self._loading = None
        if self._gx is None:
            self._gx, self.import_seconds = load_great_expectations()
            self._context = _context(self._gx)
            self._context.data_sources.add_pandas("computed")
        return self._gx

    def _rules(self, suite: str) -> list[tuple[Any, bool]]:
        """The suite's expectations as great-expectations builds them, each with whether it maps rows."""
        gx = self._start()
        from great_expectations.expectations.expectation import ColumnMapExpectation

        specs = self.document["suites"][suite]["expectations"]
        try:
            built = gx.ExpectationSuite(
                name=f"{suite}-check", expectations=[dict(s) for s in specs]
            ).expectations
        except Exception as exc:  # noqa: BLE001 - great-expectations raises several types for a bad expectation
            raise SuiteError(f"suite {suite!r}: {exc}") from exc
        return [(rule, isinstance(rule, ColumnMapExpectation)) for rule in built]

    def _checkpoint(self, name: str, rules: list[Any], result_format: str) -> tuple[Any, list[str]]:
        """A Checkpoint validating a dataframe batch against ``rules``; also the rules' ids, in order."""
        gx = self._gx
        source = self._context.data_sources.get("computed")
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = self._context.suites.add(gx.ExpectationSuite(name=name, expectations=rules))
        definition = self._context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        checkpoint = self._context.checkpoints.add(
            gx.Checkpoint(
                name=name, validation_definitions=[definition], result_format={"result_format": result_format}
            )
        )
        return checkpoint, [str(e.id) for e in suite.expectations]

    def _validate(self, name: str, rules: list[Any], frame: Any, result_format: str) -> list[Any]:
        """One Checkpoint run on a dataframe: each rule's result, in the rules' order."""
        checkpoint, ids = self._checkpoint(name, rules, result_format)
        result = checkpoint.run(batch_parameters={"dataframe": frame}, expectation_parameters=self.parameters)
        by_id: dict[str, Any] = {}
        for validation in result.run_results.values():
            for res in validation.results:
                problem = _raised(res.exception_info)
                if problem is not None:
                    config = res.expectation_config
                    raise SuiteError(
                        f"expectation {config.type} {dict(config.kwargs)} failed to run: {problem}"
                    )
                by_id[str(res.expectation_config.id)] = res
        return [by_id[i] for i in ids]

    def run(self, suite: str, columns: Mapping[str, Any]) -> SuiteResult:
        """Validate the computed ``columns`` (numpy arrays of one length), held in memory."""
        rows = len(next(iter(columns.values()))) if columns else 0
        return self.run_chunks(suite, rows, lambda: iter([(0, dict(columns))]))

    def run_chunks(
        self,
        suite: str,
        rows: int,
        chunks: Callable[[], Iterator[tuple[int, dict[str, Any]]]],
        directory: Any = None,
    ) -> SuiteResult:
        """Validate ``rows`` rows whose computed columns ``chunks()`` yields as ``(start, {name: values})`` in
        order (module docstring). Each row's failed bitmask goes to a column on disk in ``directory`` (memory when
        None), a chunk at a time, so memory does not grow with ``rows``."""
        import numpy as np

        rules = self._rules(suite)
        started = time.perf_counter()
        reasons = tuple(dict.fromkeys(_reason(r) for r, is_map in rules if is_map and _reason(r)))
        if len(reasons) > 64:
            raise SuiteError(f"suite {suite!r}: at most 64 distinct rejection reasons, got {len(reasons)}")
        code, width = next(
            (c, t)
            for c, t in (("B", np.uint8), ("H", np.uint16), ("I", np.uint32), ("Q", np.uint64))
            if len(reasons) <= np.iinfo(t).bits
        )  # a bit per reason, in as few bytes as the suite needs
        failed = spill.Columns(directory, f"failed-{suite}", failed=code)
        run = _Run(rules, reasons, width, [_Tally() for _ in rules], failed)
        if rows <= SAMPLE_ROWS:
            columns = _gathered(chunks())
            run.judge(self._judged_by_gx(suite, rules, columns), rows)
        else:
            columns = self._judged_by_us(suite, run, rows, chunks)
        failed.settle(force=True)
        tables = [i for i, (_, is_map) in enumerate(rules) if not is_map]
        if tables and rows:
            referenced = {c for i in tables for c in _named(rules[i][0])}
            self._tables(suite, rules, tables, run.tallies, columns, referenced or None, chunks, rows)
        outcomes = [self._outcome(rule, tally) for (rule, _), tally in zip(rules, run.tallies, strict=True)]
        seconds = time.perf_counter() - started
        log.debug("suite %s: %d rows, %.2f s", suite, rows, seconds)
        sampled = rows if rows <= SAMPLE_ROWS else SAMPLE_ROWS
        return SuiteResult(suite, reasons, failed, outcomes, seconds, rows, sampled, run.masks)

    def _judged_by_gx(
        self, suite: str, rules: list[tuple[Any, bool]], columns: Mapping[str, Any]
    ) -> dict[int, Any]:
        """great-expectations judges every row: each map rule's tally and unexpected rows, by rule index."""
        import numpy as np

        maps = [i for i, (_, is_map) in enumerate(rules) if is_map]
        if not maps or not columns or not len(next(iter(columns.values()))):
            return {}
        results = self._validate(f"{suite}-rows", [rules[i][0] for i in maps], _frame(columns), "COMPLETE")
        found: dict[int, Any] = {}
        for i, res in zip(maps, results, strict=True):
            result = res.result or {}
            found[i] = (
                np.asarray([int(x) for x in result.get("unexpected_index_list") or []], dtype=np.int64),
                int(result.get("element_count") or 0),
                int(result.get("missing_count") or 0),
                int(result.get("unexpected_count") or 0),
            )
        return found

    def _judged_by_us(
        self, suite: str, run: _Run, rows: int, chunks: Callable[[], Iterator[tuple[int, dict[str, Any]]]]
    ) -> None:
        """Above :data:`SAMPLE_ROWS`: :func:`evaluate` judges every row a chunk at a time, while an even sample
        is gathered for great-expectations' own Checkpoint, whose counts the report shows beside ours."""
        import numpy as np

        sample = np.linspace(0, rows - 1, SAMPLE_ROWS).astype(np.int64)
        maps = [i for i, (rule, is_map) in enumerate(run.rules) if is_map]
        ours = [
            i
            for i in maps
            if evaluable(run.rules[i][0].expectation_type, run.rules[i][0].configuration.kwargs)
        ]
        picked: list[dict[str, Any]] = []
        for start, columns in chunks():
            count = len(next(iter(columns.values())))
            at = sample[(sample >= start) & (sample < start + count)] - start
            picked.append({name: values[at] for name, values in columns.items()})
            judged = {}
            for i in ours:
                rule = run.rules[i][0]
                mask, evaluated, missing = evaluate(
                    rule.expectation_type, rule.configuration.kwargs, columns, self.parameters
                )
                unexpected = np.flatnonzero(mask)
                judged[i] = (unexpected, evaluated, missing, len(unexpected))
            run.judge(judged, count)
        frame = _gathered(iter(enumerate(picked)))
        results = (
            self._validate(f"{suite}-rows", [run.rules[i][0] for i in maps], _frame(frame), "COMPLETE")
            if maps
            else []
        )
        for i, res in zip(maps, results, strict=True):
            result, tally = res.result or {}, run.tallies[i]
            found = int(result.get("unexpected_count") or 0)
            if i in ours:
                tally.scope = (
                    f"all rows (preftune); great-expectations found {found} in {SAMPLE_ROWS:,} sampled rows"
                )
                continue
            tally.evaluated = int(result.get("element_count") or 0)
            tally.missing = int(result.get("missing_count") or 0)
            tally.unexpected = found
            tally.scope = f"{SAMPLE_ROWS:,} sampled rows only (great-expectations); rejects no row"

    def _tables(
        self,
        suite: str,
        rules: list[tuple[Any, bool]],
        tables: list[int],
        tallies: list[_Tally],
        columns: Mapping[str, Any] | None,
        referenced: set[str] | None,
        chunks: Callable[[], Iterator[tuple[int, dict[str, Any]]]],
        rows: int,
    ) -> None:
        """Table expectations on every row, through their own Checkpoint: only the columns they name are read
        (all of them when they name none)."""
        if columns is None:
            columns = _gathered(
                (s, {c: v for c, v in part.items() if referenced is None or c in referenced})
                for s, part in chunks()
            )
        frame = _frame({c: v for c, v in columns.items() if referenced is None or c in referenced})
        for i, res in zip(
            tables,
            self._validate(f"{suite}-table", [rules[i][0] for i in tables], frame, "SUMMARY"),
            strict=True,
        ):
            tally = tallies[i]
            tally.evaluated, tally.table_success = rows, bool(res.success)
            observed = (res.result or {}).get("observed_value")
            tally.observed = json.loads(json.dumps(observed, default=str)) if observed is not None else None
            tally.scope = "all rows (great-expectations)"

    def _outcome(self, rule: Any, tally: _Tally) -> RuleResult:
        meta = rule.meta or {}
        kwargs = rule.configuration.kwargs
        values = {**self.parameters}  # a text may name the rule's own bounds, literal or parameter
        values.update(
            {k: _value(kwargs.get(k), self.parameters) for k in ("min_value", "max_value") if k in kwargs}
        )
        return RuleResult(
            expectation=rule.expectation_type,
            column=str(kwargs.get("column", "")),
            reason=_reason(rule),
            description=_fill(str(meta.get("description") or rule.expectation_type), values),
            failure=_fill(str(meta.get("failure") or "fails " + rule.expectation_type), values),
            success=tally.success(float(kwargs.get("mostly") or 1.0)),
            evaluated=tally.evaluated,
            unexpected=tally.unexpected,
            scope=tally.scope or "not run (no rows)",
            observed=tally.observed,
        )


def _raised(info: Any) -> str | None:
    """The message of an exception great-expectations caught while running a rule (None when it ran): its info is
    one record, or one per metric."""
    if not isinstance(info, dict):
        return None
    if "raised_exception" in info:
        return str(info.get("exception_message")) if info.get("raised_exception") else None
    for value in info.values():
        found = _raised(value)
        if found is not None:
            return found
    return None


def _named(rule: Any) -> list[str]:
    kwargs = rule.configuration.kwargs
    names = [kwargs[k] for k in ("column", "column_A", "column_B") if isinstance(kwargs.get(k), str)]
    return names + [c for c in kwargs.get("column_list") or [] if isinstance(c, str)]
