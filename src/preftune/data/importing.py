"""The streaming engine every import shares (SFT ingest, preference import): rows in, artifacts out, every row
accounted for, memory bounded whatever the input's size.

How an import flows:

1. *Read* (:class:`Units`): every input row becomes a unit, numbered in input order (file, row, Label Studio
   annotation). A row that cannot be read or normalised is rejected at once, with its record.
2. *Items* (:class:`Items`): what the import makes -- SFT examples, or candidate pairs -- go to a spill file as
   their output line, and their numbers (64-bit id, reverse id, prompt-group rank, lengths, flags) to column
   files (:class:`spill.Columns`: at most a chunk of rows in memory).
3. *Decide* (:class:`buckets.Repeats`, the suite through :mod:`checkpoints`, :func:`verdict`): hashes, not rows,
   a hash bucket or a chunk of items at a time. The first item of an id is kept; the eval split takes the prompt
   groups whose hash of (seed, prompt) is smallest, so it depends on the seed and the prompts alone. Each item's
   route (rejected, train, eval) goes to a column file.
4. *Write* (:func:`emit`): the spill is read once more beside the route; accepted items go to train or eval, and
   a unit none of whose items was accepted is rejected with the reasons of its items.
5. *Account* (:class:`Rejections`): rejected units come back in input order; a unit rejected after reading is
   re-read from the source for its record (only the rows needed are parsed). ``rows_input == used + rejected``.

What stays in memory grows only with the rejected rows (16 bytes each while their records are read again) and,
for thumbs and ratings, with a bit per row and one of the prompt buckets they are paired in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data import buckets, labelstudio, readers, records, spill
from preftune.data.checkpoints import SuiteResult
from preftune.data.sources import SourceFile

#: The reasons a row that could not be read at all is rejected with.
READ_REASONS = ("invalid_json", "invalid_utf8", "not_an_object", "duplicate_key", "malformed_row")
#: Marks a large meta stored once: ``\x00<k>\x00`` (an object's keys) or ``\x01<k>\x01`` (a whole object).
_TOKEN = re.compile("([\x00\x01])([0-9]+)[\x00\x01]")
#: Row metas larger than this (JSON bytes) are stored in one pair per prompt and referred to by the others.
META_INLINE_BYTES = 512


def metric_name(reason: str) -> str:
    """The metric counting a reason: ``rejected_`` + the reason with ``:`` as ``_`` (``rejected_empty_prompt``)."""
    return "rejected_" + reason.replace(":", "_")


def place(file: str, row: int) -> str:
    """Where a row is, as messages name it: ``data.jsonl, line 3``."""
    return f"{file}, {readers.row_label(file)} {row}"


def failure_texts(reasons: Sequence[str], failures: Mapping[str, str], first: str) -> list[str]:
    """What each failed rule says of a row; a duplicate also names ``first``, where the kept copy is."""
    texts = [failures.get(r, r) for r in reasons]
    if "duplicate" in reasons:
        texts[reasons.index("duplicate")] += f" ({first})"
    return texts


def listed(counts: Counter[str], most: int | None = None, sep: str = ": ") -> str:
    """Reasons and their counts, most common first: ``duplicate: 3, empty:prompt: 1``."""
    return ", ".join(f"{k}{sep}{v}" for k, v in counts.most_common(most))


def add_reason_metrics(metrics: dict[str, float], known: Sequence[str], counts: Counter[str]) -> None:
    """A ``rejected_<reason>`` metric for every known reason (0 when none) and every other reason seen."""
    for reason in dict.fromkeys([*known, *sorted(set(counts) - set(known))]):
        metrics[metric_name(reason)] = counts.get(reason, 0)


def rank_key(seed: int, prompt_json: str) -> int:
    """A prompt group's place in the seed's order: the first 64 bits of SHA-256 over (seed, prompt)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{prompt_json}".encode()).digest()[:8], "big")


# ---------------------------------------------------------------------------------------------- units


class Units:
    """Every accounted input row, in input order: its file, row and (Label Studio) annotation."""

    def __init__(self, files: Sequence[SourceFile], directory: Path | None = None) -> None:
        self.files = list(files)
        self.columns = spill.Columns(directory, "units", file="i", row="I")
        self.annotations: dict[int, int] = {}  # only Label Studio rows have one
        self.formats: dict[int, str] = {}

    def add(self, file_index: int, row: int, annotation: int | None = None) -> int:
        self.columns.settle()
        self.columns["file"].append(file_index)
        self.columns["row"].append(row)
        unit = len(self.columns) - 1
        if annotation:
            self.annotations[unit] = annotation
        return unit

    def extend(self, file_index: int, rows: list[int]) -> None:
        """Rows of one file, in order, none of them an annotation."""
        self.columns.settle()
        columns = self.columns.arrays
        columns["file"].extend([file_index] * len(rows))
        columns["row"].extend(rows)

    def extend_rows(self, file_index: int, rows: Any) -> None:
        """Rows of one file, in order, none of them an annotation (numpy row numbers)."""
        import numpy as np

        self.columns.settle()
        columns = self.columns.arrays
        columns["file"].frombytes(np.full(len(rows), file_index, dtype=np.int32).tobytes())
        columns["row"].frombytes(np.asarray(rows, dtype=np.uint32).tobytes())

    def __len__(self) -> int:
        return len(self.columns)

    def locate(self, unit: int) -> tuple[str, int, int | None]:
        """``(file name, row, annotation or None)`` of a unit."""
        name = self.files[self.columns.at("file", unit)].name
        return name, self.columns.at("row", unit), self.annotations.get(unit)

    def pick(self, wanted: Any) -> tuple[Any, Any]:
        """The (file, row) of each of ``wanted`` units (sorted), read a chunk of units at a time."""
        import numpy as np

        files, rows = [], []
        for start, part in self.columns.chunks("file", "row"):
            lo, hi = np.searchsorted(wanted, [start, start + len(part["row"])])
            files.append(part["file"][wanted[lo:hi] - start])
            rows.append(part["row"][wanted[lo:hi] - start])
        if not files:
            return np.zeros(0, np.int32), np.zeros(0, np.uint32)
        return np.concatenate(files), np.concatenate(rows)

    def where(self, unit: int) -> str:
        """Where a unit is, as details name it: ``a.jsonl, line 3`` (``, annotation 2``)."""
        name, row, annotation = self.locate(unit)
        return place(name, row) + (f", annotation {annotation}" if annotation else "")


# ---------------------------------------------------------------------------------------------- rejections

#: A rejection whose record is read again from the source at the end.
DEFERRED = object()


class Rejections:
    """Rejected units with their reasons and detail, kept on disk and given back in input order."""

    def __init__(self, directory: Path) -> None:
        self.entries = spill.SortedSpill(directory, "rejected")
        self.counts: Counter[str] = Counter()
        self.deferred = spill.Columns(directory, "deferred", unit="q")

    def add(self, unit: int, reasons: Sequence[str], detail: str, record: Any = DEFERRED) -> None:
        reasons = list(dict.fromkeys(reasons))
        self.counts.update(reasons)
        entry: dict[str, Any] = {"reasons": reasons, "detail": detail}
        if record is DEFERRED:
            self.deferred.settle()
            self.deferred["unit"].append(unit)
        else:
            entry["record"] = record
        self.entries.add(unit, records.dumps(entry))

    def __len__(self) -> int:
        return len(self.entries)


class Wanted:
    """Row numbers (sorted, unique) answering ``in`` fast for ascending queries, as a second read asks them."""

    def __init__(self, rows: Any) -> None:
        import array

        self.rows = array.array("q", rows.astype("int64").tobytes())
        self.at = 0

    def __len__(self) -> int:
        return len(self.rows)

    def between(self, first: int, last: int) -> list[int]:
        """The row numbers from ``first`` to ``last`` (a batch's range), by bisection."""
        import bisect

        return list(self.rows[bisect.bisect_left(self.rows, first) : bisect.bisect_right(self.rows, last)])

    def __contains__(self, row: object) -> bool:
        rows, at = self.rows, self.at
        if at and rows[at - 1] >= row:  # type: ignore[operator]
            import bisect

            at = bisect.bisect_left(rows, row)
        while at < len(rows) and rows[at] < row:  # type: ignore[operator]
            at += 1
        self.at = at
        return at < len(rows) and rows[at] == row


def _record_of(raw: readers.RawRow, annotation: int, file_format: str) -> Any:
    if file_format == "labelstudio":
        found = labelstudio.expand(raw)
        return found[annotation - 1 if annotation else 0].record
    return raw.record


def reread(units: Units, wanted_units: Any) -> Iterator[tuple[int, Any]]:
    """``(unit, record)`` for units rejected after reading, in unit order: each file read again, parsing only the
    rows needed."""
    import numpy as np

    order = np.unique(np.asarray(wanted_units, dtype=np.int64))
    if not len(order):
        return
    files, rows = units.pick(order)
    for file_index in np.unique(files):
        pick = np.flatnonzero(files == file_index)
        fmt = units.formats.get(int(file_index), "")
        wanted = Wanted(np.unique(rows[pick]))
        position = 0
        for raw in units.files[int(file_index)].rows("reject", wanted):
            while position < len(pick) and rows[pick[position]] == raw.row:
                unit = pick[position]
                found = int(order[unit])
                yield found, _record_of(raw, units.annotations.get(found, 0), fmt)
                position += 1


def write_rejected(
    path: str, rejections: Rejections, units: Units, samples: int = 10
) -> dict[str, list[dict[str, Any]]]:
    """The rejected-rows artifact in input order; returns up to ``samples`` rejected rows per reason."""
    again = reread(units, rejections.deferred.numpy("unit"))
    shown: dict[str, list[dict[str, Any]]] = {}
    with spill.Output(path) as out:
        for unit, text in rejections.entries:
            entry = json.loads(text)
            if "record" not in entry:
                found, entry["record"] = next(again)
                assert found == unit, f"re-read unit {found}, expected {unit}"
            name, row, annotation = units.locate(unit)
            rejected: dict[str, Any] = {"file": name, "row": row}
            if annotation:
                rejected["annotation"] = annotation
            rejected.update(entry)
            out.write(records.dumps(rejected))
            for reason in rejected["reasons"]:
                if len(shown.setdefault(reason, [])) < samples:
                    shown[reason].append(rejected)
    return shown


# ---------------------------------------------------------------------------------------------- items


class Items:
    """What an import made, in order: each item's output line in a spill, its numbers in ``columns``.

    Spill lines are ``block<TAB>units<TAB>line[<TAB>record]`` for an item (units: the rows behind it,
    comma-separated; record: a one-row item's source row as JSON text, kept so that rejecting it needs no second
    read) and ``block<TAB>M<k><TAB>json`` for a large meta stored once (:meth:`blob`). A block is what one row (or one
    prompt of ratings / thumbs) made; a stored-once meta is written in full in the first accepted item of its
    block that holds it, and the others point there (``{"meta_in": "<id>"}``).
    """

    def __init__(self, directory: Path, name: str, **typecodes: str) -> None:
        self.spill = spill.Segments(directory, name)
        self.columns = spill.Columns(directory, name, id="Q", rank="Q", lead="i", **typecodes)
        self.block = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.columns)

    def new_block(self) -> int:
        """A new block; block ids only need to differ from the previous item's."""
        self.block += 1
        return self.block

    def blob(self, meta_json: str) -> str:
        """Store a meta once in this block; returns the token that stands for it in item lines."""
        self.tokens += 1
        self.spill.write(f"{self.block}\tM{self.tokens}\t{meta_json}")
        return str(self.tokens)

    def extend(self, lines: list[str], ids: list[int], numbers: list[tuple[Any, ...]]) -> None:
        """Pairs made one per row (their own block each): spill lines ready-made, ``numbers`` as (reverse, rank,
        lead, prompt/chosen/rejected chars, flags, margin) per pair."""
        self.columns.settle()
        self.spill.write_many(lines)
        columns = self.columns.arrays
        columns["id"].extend(ids)
        reverse, rank, lead, prompt, chosen, rejected, flags, margin = zip(*numbers, strict=True)
        columns["reverse"].extend(reverse)
        columns["rank"].extend(rank)
        columns["lead"].extend(lead)
        columns["prompt_chars"].extend(prompt)
        columns["chosen_chars"].extend(chosen)
        columns["rejected_chars"].extend(rejected)
        columns["flags"].extend(flags)
        columns["margin"].extend(margin)
        self.block = max(self.block, lead[-1] + 1)

    def extend_arrays(self, lines: Any, records: Any, count: int, numbers: Mapping[str, Any]) -> None:
        """Pairs made one per row, a batch at once (:mod:`pairbatch`): ``count`` output lines and their rows' texts
        (None: not kept), encoded and each ending in a newline, and every column as a numpy array."""
        import numpy as np

        self.columns.settle()
        self.spill.write_pairs(lines, records, count)
        for name, values in self.columns.arrays.items():
            values.frombytes(np.ascontiguousarray(numbers[name], dtype=values.typecode).tobytes())
        self.block = max(self.block, int(numbers["lead"][-1]) + 1)

    def add(self, line: str, units: str, item_id: int, rank: int, lead: int) -> None:
        """One item (its other columns are appended by the caller)."""
        self.columns.settle()
        self.spill.write(f"{self.block}\t{units}\t{line}")
        columns = self.columns.arrays
        columns["id"].append(item_id)
        columns["rank"].append(rank)
        columns["lead"].append(lead)


def meta_field(meta: Mapping[str, Any], items: Items, *, inner: bool) -> str:
    """A meta as JSON in an item line: inline when small, else stored once (``inner``: as an object's keys
    followed by ``, `` for the item to complete, else as a whole object)."""
    text = records.dumps(meta)
    if len(text) <= META_INLINE_BYTES:
        return (text[1:-1] + ", " if len(text) > 2 else "") if inner else text
    mark = "\x00" if inner else "\x01"
    return f"{mark}{items.blob(text)}{mark}"


class _Metas:
    """The stored-once metas of the block being written, and the item that carries each."""

    def __init__(self) -> None:
        self.blobs: dict[str, str] = {}
        self.home: dict[str, str] = {}

    def expand(self, line: str) -> str:
        item_id = line[8:24]  # every item line starts with {"id": "<16 hex digits>"

        def one(match: re.Match[str]) -> str:
            kind, token = match.group(1), match.group(2)
            home = self.home.setdefault(token, item_id)
            if home == item_id:
                text = self.blobs[token]
                return text[1:-1] + ", " if kind == "\x00" else text
            pointer = f'"meta_in": "{home}"'
            return pointer + ", " if kind == "\x00" else "{" + pointer + "}"

        return _TOKEN.sub(one, line)


# ---------------------------------------------------------------------------------------------- decisions


@dataclass
class Verdict:
    """Each item's fate: its ``route`` (a column on disk: 0 rejected, 1 train, 2 eval), the suite's result
    (reasons per item) and ``repeats`` (for a duplicate, the first item with its id); ``cut`` is the largest
    prompt rank held out (-1: none)."""

    suite: SuiteResult
    repeats: buckets.Repeats
    route: spill.Columns
    cut: int = -1
    train: int = 0
    held: int = 0
    prompts_train: int = 0
    prompts_eval: int = 0

    def counts(self) -> tuple[int, int]:
        """Accepted items in train and in eval."""
        return self.train, self.held


def verdict(items: Items, suite: SuiteResult, repeats: buckets.Repeats, eval_fraction: float) -> Verdict:
    """Route the accepted items (the suite failed none of them) to train or eval: ``round(eval_fraction *
    groups)`` prompt groups (at least one, leaving one for train, when ``eval_fraction > 0``), those whose rank
    hash is smallest, go to eval (:func:`buckets.cut`). A chunk of items at a time; ValueError when an eval split
    cannot be held out."""
    import numpy as np

    def accepted_ranks() -> Iterator[Any]:
        for (_, part), (_, failed) in zip(items.columns.chunks("rank"), suite.chunks(), strict=True):
            yield part["rank"][failed == 0]

    directory = items.spill.directory
    cut, train_groups, eval_groups = buckets.cut(accepted_ranks(), suite.accepted, directory, eval_fraction)
    route = spill.Columns(directory, "route", route="b")
    decided = Verdict(suite, repeats, route, cut, prompts_train=train_groups, prompts_eval=eval_groups)
    for (_, part), (_, failed) in zip(items.columns.chunks("rank"), suite.chunks(), strict=True):
        accepted = failed == 0
        held = accepted & (part["rank"] <= np.uint64(cut)) if cut >= 0 else np.zeros(len(failed), dtype=bool)
        route["route"].frombytes((accepted.astype(np.int8) + held.astype(np.int8)).tobytes())
        route.settle()
        decided.held += int(held.sum())
        decided.train += int(accepted.sum()) - int(held.sum())
    return decided


def _settle(failed: dict[str, list[int]], used: set[str], verdict: Verdict, ctx: _Context) -> None:
    """Reject the units of a block none of whose items was accepted, with their items' reasons."""
    for unit, indices in failed.items():
        if unit in used:
            continue
        reasons: list[str] = []
        texts: list[str] = []
        for index in indices:
            failed_reasons = ctx.reasons(int(ctx.failed[index]))
            reasons += failed_reasons
            first = ctx.units.where(ctx.leads.at("lead", verdict.repeats.first(index)))
            texts += failure_texts(failed_reasons, ctx.failures, first)
        record = ctx.records.get(unit)
        ctx.rejections.add(
            int(unit) + ctx.offset,
            reasons,
            "; ".join(dict.fromkeys(texts)),
            DEFERRED if record is None else json.loads(record),
        )


@dataclass
class _Context:
    units: Units
    rejections: Rejections
    leads: spill.Columns  # the items' columns: each item's lead unit
    failures: dict[str, str]
    failed: Any = None  # a cursor over the suite's failed masks
    known: dict[int, list[str]] = field(default_factory=dict)
    suite: SuiteResult | None = None
    offset: int = 0  # added to the unit ids of the spill segment being read
    records: dict[str, str] = field(default_factory=dict)  # the block's failed one-row items' source rows

    def reasons(self, mask: int) -> list[str]:
        if mask not in self.known:
            self.known[mask] = self.suite.reasons_for(mask)  # type: ignore[union-attr]
        return self.known[mask]


class _Emitter:
    """Writes the items of one spill in order (see :func:`emit`), one block of items at a time."""

    def __init__(self, ctx: _Context, verdict: Verdict, outputs: tuple[Any, ...]) -> None:
        self.ctx, self.verdict, self.outputs = ctx, verdict, outputs
        self.route = spill.Cursor(verdict.route, "route")
        self.used_units, self.index = 0, -1
        self.block, self.metas = "", None
        self.used: set[str] = set()
        self.failed: dict[str, list[int]] = {}

    def end_block(self) -> None:
        """Reject the block's units none of whose items was accepted; count the used ones."""
        if self.failed:
            _settle(self.failed, self.used, self.verdict, self.ctx)
            self.failed, self.ctx.records = {}, {}
        self.used_units += len(self.used)
        self.block, self.metas, self.used = "", None, set()

    def line(self, offset: int, text: str) -> None:
        """One spill line: an item, or a stored-once meta of its block."""
        block_id, unit_text, line = text.split("\t", 2)
        if block_id != self.block or offset != self.ctx.offset:
            self.end_block()
            self.block, self.ctx.offset = block_id, offset
        if unit_text[0] == "M":
            self.metas = self.metas or _Metas()
            self.metas.blobs[unit_text[1:]] = line
            return
        self.index += 1
        line, _, record = line.partition("\t")
        where = int(self.route[self.index])
        if where:
            if self.metas is not None and ("\x00" in line or "\x01" in line):
                line = self.metas.expand(line)
            self.outputs[where].write(line)
            self.used.update(unit_text.split(","))
        else:
            for unit in unit_text.split(","):
                self.failed.setdefault(unit, []).append(self.index)
            if record:
                self.ctx.records[unit_text] = record

    def pairs(self, part: spill.PairPart) -> None:
        """Pairs made a batch at a time, one unit each (its lead): written, or their unit rejected, a chunk of
        lines at a time -- selection and writing in C (itertools.compress and join), not a Python step per line."""
        from itertools import compress

        import numpy as np

        self.end_block()
        self.ctx.offset = 0
        for lines, texts in part.chunks():
            first = self.index + 1
            route = self.route.slice(first, first + len(lines))
            leads = self.ctx.leads.read("lead", first, first + len(lines))
            for where in (1, 2):
                chosen = route == where
                if chosen.any():
                    self.outputs[where].write_bytes(
                        b"\n".join(compress(lines, chosen)) + b"\n", int(chosen.sum())
                    )
            for at in np.flatnonzero(route == 0).tolist():
                unit = str(int(leads[at]))
                self.failed = {unit: [first + at]}
                if texts is not None:
                    self.ctx.records[unit] = texts[at].decode("utf-8")
                self.end_block()
            self.used_units += int(np.count_nonzero(route))
            self.index += len(lines)


def emit(
    items: Items,
    verdict: Verdict,
    units: Units,
    rejections: Rejections,
    train: str,
    held: str,
    publish: bool = True,
) -> int:
    """Write accepted items to ``train`` / ``held`` in order (stored-once metas expanded; nothing is published
    unless ``publish``) and reject every unit none of whose items was accepted; returns how many units were used."""
    ctx = _Context(
        units,
        rejections,
        items.columns,
        verdict.suite.failures(),
        spill.Cursor(verdict.suite.failed, "failed"),
        suite=verdict.suite,
    )
    outputs = (None, spill.Output(train), spill.Output(held))
    emitter = _Emitter(ctx, verdict, outputs)
    try:
        for part, offset in items.spill.parts:
            if isinstance(part, spill.PairPart):
                emitter.pairs(part)
                continue
            for text in part.read():
                emitter.line(offset, text)
        emitter.end_block()
    except BaseException:
        for output in outputs[1:]:
            output.discard()  # type: ignore[union-attr]
        raise
    for output in outputs[1:]:
        output.publish() if publish else output.discard()  # type: ignore[union-attr]
    return emitter.used_units


# ---------------------------------------------------------------------------------------------- publish


def check_split_parameters(eval_fraction: float, min_chars: int, max_chars: int) -> None:
    """The parameters every import has, checked before any data is read."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if min_chars < 0 or max_chars < max(min_chars, 1):
        raise ValueError(
            f"need 0 <= min_chars <= max_chars and max_chars >= 1, got {min_chars} and {max_chars}"
        )


@dataclass
class Publication:
    """The rejected rows, the HTML report and the suites an import ran: written whether it succeeds or fails, so
    the user can always see why rows were rejected."""

    title: str
    source: str
    paths: tuple[str, str, str, str, str]  # train, eval, rejected rows, report, suites ("" = not written)
    parameters: Mapping[str, Any]
    document: Mapping[str, Any]
    skipped_files: Sequence[str] = ()

    @property
    def train_path(self) -> str:
        return self.paths[0]

    @property
    def eval_path(self) -> str:
        return self.paths[1]

    @property
    def rejected_path(self) -> str:
        return self.paths[2]

    @property
    def report_path(self) -> str:
        return self.paths[3]

    @property
    def suite_path(self) -> str:
        return self.paths[4]

    def write(
        self,
        units: Units,
        rejections: Rejections,
        metrics: Mapping[str, float],
        results: Sequence[tuple[str, SuiteResult]],
        import_seconds: float,
        **sections: Any,
    ) -> None:
        """``sections``: warnings, sections_after and suite_note for the report."""
        from preftune.data import suites, validation
        from preftune.report import html as reports

        samples = write_rejected(self.rejected_path, rejections, units)
        page = validation.render_report(
            self.title,
            source=self.source,
            metrics=metrics,
            parameters=self.parameters,
            suites=results,
            counts=rejections.counts,
            samples=samples,
            import_seconds=import_seconds,
            skipped_files=self.skipped_files,
            **sections,
        )
        reports.write(self.report_path, page)
        if self.suite_path:
            suites.write_document(self.suite_path, self.document)
