"""Feedback rows into candidate pairs, streamed: the reading and pairing stages of the preference import.

* :meth:`Feedback.read` takes every row of every file once. Pairwise rows and Label Studio annotations are pairs
  already: they go straight to the pair spill (:class:`importing.Items`). Ranked lists go to a spill of their own;
  ratings and thumbs to spills bucketed by a hash of their prompt, so that one prompt's rows can be brought
  together later without holding them all. The row suites' computed columns are kept per row.
* :meth:`Feedback.pair` runs the row suites, then pairs the rows they accepted: ranked lists one by one, ratings
  and thumbs one bucket at a time (z-scores from per-rater sums over every accepted rating), the pairs of each
  prompt written in the order its first row was read, so the result is the same as pairing everything at once.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import chain
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from preftune.data import formats, labelstudio, pairbatch, pairing, parallel, readers, records, spill
from preftune.data.checkpoints import SuiteResult, Validator
from preftune.data.importing import Items, Rejections, Units, meta_field, rank_key
from preftune.data.sources import SourceFile
from preftune.data.unpaired import UnpairedSet

#: Readable rows looked at to recognise a file's format (``format=auto``).
DETECT_ROWS = 10_000
#: Pairwise rows taken in one batch.
BATCH = 4096
#: Spill buckets for ratings and thumbs (a bucket is paired in memory).
BUCKETS = 64
_SENTINEL = hashlib.sha256(b"preftune meta").hexdigest()


def pair_columns() -> dict[str, str]:
    """The columns kept per candidate pair besides id, rank and lead unit."""
    return {
        "reverse": "Q",
        "prompt_chars": "i",
        "chosen_chars": "i",
        "rejected_chars": "i",
        "flags": "b",
        "margin": "d",
    }


def add_pair(items: Items, facts: records.PairFacts, units: str, lead: int, seed: int) -> None:
    """One candidate pair: its line to the spill, its numbers to the columns."""
    items.add(facts.line, units, facts.id, rank_key(seed, facts.prompt_key), lead)
    columns = items.columns.arrays
    columns["reverse"].append(facts.reverse)
    columns["prompt_chars"].append(facts.prompt_chars)
    columns["chosen_chars"].append(facts.chosen_chars)
    columns["rejected_chars"].append(facts.rejected_chars)
    columns["flags"].append(facts.flags)
    columns["margin"].append(math.nan if facts.margin is None else facts.margin)


class _Kind:
    """The rows of one format waiting for pairing: their spill (one, or per bucket) and row-suite columns (on disk,
    read a chunk at a time). A spill line carries its row's index, unit, value and rater, so pairing reads no
    column."""

    def __init__(self, directory: Path, name: str, buckets: int) -> None:
        self.directory, self.name = directory, name
        self.spills: dict[int, spill.LineSpill] = {}
        self.buckets = buckets
        typecodes = {
            "unit": "i",
            "prompt_chars": "i",
            "min_chars": "i",
            "max_chars": "i",
            "value": "d",
            "rater": "Q",
        }
        self.columns = spill.Columns(directory, f"kind-{name}", **typecodes)

    def __len__(self) -> int:
        return len(self.columns)

    def spill(self, bucket: int) -> spill.LineSpill:
        if bucket not in self.spills:
            self.spills[bucket] = spill.LineSpill(self.directory / f"{self.name}-{bucket}.spill")
        return self.spills[bucket]

    def add(
        self, line: str, bucket: int, unit: int, prompt: int, lengths: list[int], value: float, rater: int
    ) -> None:
        self.columns.settle()
        self.spill(bucket).write(f"{len(self)}\t{unit}\t{value!r}\t{rater}\t{line}")
        columns = self.columns.arrays
        columns["unit"].append(unit)
        columns["prompt_chars"].append(prompt)
        columns["min_chars"].append(min(lengths))
        columns["max_chars"].append(max(lengths))
        columns["value"].append(value)
        columns["rater"].append(rater)

    def suite_chunks(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """The row suite's computed columns (:data:`suites.COLUMNS`), a chunk of rows at a time."""
        import numpy as np

        field = "responses" if self.name == "ranked" else "response"
        for start, part in self.columns.chunks("prompt_chars", "min_chars", "max_chars", "value"):
            out = {
                "prompt_chars": part["prompt_chars"],
                f"{field}_min_chars": part["min_chars"],
                f"{field}_max_chars": part["max_chars"],
            }
            value = part["value"]
            if self.name == "ranked":
                out["responses"] = value.astype(np.int64)
            elif self.name == "rating":
                out.update(score=value, score_nonfinite=~np.isfinite(value))
            else:
                out["label_up"] = value.astype(np.int8)
            yield start, out

    def passed(self, result: SuiteResult, rejections: Any) -> Any:
        """Reject the rows the suite failed, with their reasons; returns which rows passed, a bit per row."""
        import numpy as np

        failures = result.failures()
        passed = spill.Bits()
        for (_, failed), (_, part) in zip(result.chunks(), self.columns.chunks("unit"), strict=True):
            for at in np.flatnonzero(failed).tolist():
                reasons = result.reasons_for(int(failed[at]))
                rejections.add(int(part["unit"][at]), reasons, "; ".join(failures.get(r, r) for r in reasons))
            passed.extend(failed == 0)
        return passed

    def rater_stats(self, passed: spill.Bits) -> dict[int, tuple[float, float]]:
        """Each rater's mean and standard deviation over the accepted ratings (rows without a rater: one pool),
        in two passes over the columns. Sums are exactly rounded per chunk (``math.fsum``) and then over chunks,
        so an import of up to a chunk of ratings gets exactly one rounding, as a single ``fsum`` would."""
        import numpy as np

        def per_rater(deviations: dict[int, float] | None) -> dict[int, list[float]]:
            sums: dict[int, list[float]] = {}
            for start, part in self.columns.chunks("rater", "value"):
                keep = passed.slice(start, len(part["value"]))
                codes, values = part["rater"][keep], part["value"][keep]
                order = np.argsort(codes, kind="stable")
                distinct, starts = np.unique(codes[order], return_index=True)
                for code, members in zip(distinct.tolist(), np.split(order, starts[1:]), strict=True):
                    pool = values[members]
                    if deviations is not None:
                        pool = (pool - deviations[code]) ** 2
                    sums.setdefault(code, [0.0, 0.0])
                    sums[code][0] = math.fsum([sums[code][0], math.fsum(pool)])
                    sums[code][1] += len(pool)
            return sums

        means = {code: total / count for code, (total, count) in per_rater(None).items()}
        squares = per_rater(means)
        return {code: (means[code], math.sqrt(squares[code][0] / squares[code][1])) for code in means}


def _rater_code(rater: str | None) -> int:
    if rater is None:
        return 0
    return (
        int.from_bytes(hashlib.blake2b(rater.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        | 1
    )


class Feedback:
    """The reading and pairing stages of one preference import (see the module docstring)."""

    def __init__(
        self, directory: Path, units: Units, rejections: Rejections, items: Items, settings: Any
    ) -> None:
        self.directory = directory
        self.units, self.rejections, self.items, self.settings = units, rejections, items, settings
        self.kinds = {
            "ranked": _Kind(directory, "ranked", 1),
            "rating": _Kind(directory, "rating", BUCKETS),
            "binary": _Kind(directory, "binary", BUCKETS),
        }
        self.file_formats: dict[str, str] = {}
        self.stats: Counter[str] = Counter()
        #: Thumbs and rating rows that made no pair but whose judgement the unpaired set holds (KTO uses them).
        self.unpaired_kept = 0
        #: Where accepted thumbs and ratings also go unpaired (KTO's examples); set by the import when wanted.
        self.unpaired: UnpairedSet | None = None

    # ------------------------------------------------------------------------------------------ read

    def read(self, files: list[SourceFile], fmt: str, source: str = "") -> None:
        """Every row of every file, in order; large pairwise sources are read by worker processes
        (:mod:`parallel`) with the same result."""
        workers = parallel.workers_for(source, files, fmt) if source else 0
        if not workers:
            for file_index, source_file in enumerate(files):
                self.read_one(file_index, source_file, fmt)
            return
        for file_index, result in parallel.results(
            read_worker, files, fmt, self.settings, self.directory, workers
        ):
            if result.fmt == "pairwise":
                self._adopt(file_index, files[file_index], result)
            else:
                self.read_one(file_index, files[file_index], fmt)

    def read_one(self, file_index: int, source_file: SourceFile, fmt: str, only: str = "") -> str:
        """Every row of one file; returns its format (with ``only``, a file of another format is not read)."""
        reader = source_file.rows("reject")
        rows: Iterator[readers.RawRow] = reader
        file_fmt = fmt
        if fmt == "auto":
            head = _head(rows)
            readable = [r for r in head if r.error is None]
            file_fmt = formats.detect(readable, source_file.name) if readable else "auto"
            rows = chain(head, rows)
        if only and file_fmt != only:
            return file_fmt
        self.units.formats[file_index] = file_fmt
        self.file_formats[source_file.name] = file_fmt
        if file_fmt != "pairwise":
            for raw in rows:
                self._take(file_index, raw, file_fmt)
            return file_fmt
        blocks = source_file.blocks()
        if blocks is not None:
            if fmt != "auto":
                _head(
                    reader
                )  # a file none of whose first lines reads is refused, as the row reader refuses it
            reader.close()
            for block in blocks:
                self._pairwise_block(file_index, block)
            return file_fmt
        batch: list[readers.RawRow] = []
        for raw in rows:
            batch.append(raw)
            if len(batch) == BATCH:
                self._pairwise(file_index, batch)
                batch = []
        self._pairwise(file_index, batch)
        return file_fmt

    def _adopt(self, file_index: int, source_file: SourceFile, result: parallel.FileResult) -> None:
        """Splice in a file a worker read: its rows, pairs, columns and rejections, unit numbers offset."""
        where, offset = Path(result.directory), len(self.units)
        self.units.columns.settle()
        self.units.columns.adopt({n: where / f"units.{n}.col" for n in ("file", "row")}, {"file": file_index})
        self.items.columns.settle()
        self.items.columns.adopt(
            {n: where / f"pairs.{n}.col" for n in self.items.columns.arrays}, {"lead": offset}
        )
        self.items.spill.adopt_parts(list(result.parts), offset)
        for unit, reasons, detail, record in parallel.rejected(result):
            self.rejections.add(unit + offset, reasons, detail, record)
        self.units.formats[file_index] = "pairwise"
        self.file_formats[source_file.name] = "pairwise"

    def _pairwise_block(self, file_index: int, block: Any) -> None:
        """A block of pairwise rows (:mod:`blocks`): the rows :mod:`pairbatch` makes column-wise, the others
        through the row path, each run of rows in order, so the result is the row path's."""
        import numpy as np

        first_unit = len(self.units)
        self.units.extend_rows(file_index, block.rows)
        if block.table is None:
            self._pairwise_rows(first_unit, block.raw_rows(0, len(block.rows)))
            return
        built = pairbatch.build(
            block.table,
            block.rows,
            first_unit,
            encode_basestring(block.name),
            self.settings.seed,
            block.lines(),
            block.meta_exact,
        )
        taken = built.taken
        edges = [0, *(np.flatnonzero(taken[1:] != taken[:-1]) + 1).tolist(), len(taken)]
        before = np.concatenate(([0], np.cumsum(taken))).tolist()
        for start, stop in zip(edges, edges[1:], strict=False):
            if not taken[start]:
                self._pairwise_rows(first_unit + start, block.raw_rows(start, stop))
                continue
            a, b = before[start], before[stop]
            numbers = {name: values[a:b] for name, values in built.columns.items()}
            self.items.extend_arrays(*built.text(a, b), b - a, numbers)

    def _pairwise(self, file_index: int, batch: list[readers.RawRow]) -> None:
        """A batch of pairwise rows read row by row: each one pair (or rejected)."""
        first_unit = len(self.units)
        self.units.extend(file_index, [raw.row for raw in batch])
        self._pairwise_rows(first_unit, batch)

    def _pairwise_rows(self, first_unit: int, batch: list[readers.RawRow]) -> None:
        """Pairwise rows whose units start at ``first_unit``: each one pair (or rejected), written to the spill and
        columns in one go, so per-row work is kept to the row's own."""
        items, seed = self.items, self.settings.seed
        lines: list[str] = []
        numbers: list[tuple[int, int, int, int, int, int, int, float]] = []
        ids: list[int] = []
        last_prompt, last_rank = "", 0
        file_json = encode_basestring(batch[0].file) if batch else ""
        for offset, raw in enumerate(batch):
            unit = first_unit + offset
            if raw.error:
                self.rejections.add(unit, [raw.error], raw.detail or "", {"raw": raw.raw})
                continue
            facts = records.fast_pair(raw.record, file_json, raw.row)  # type: ignore[arg-type]
            if facts is None:
                try:
                    facts = records.pair_facts(records.normalize_preference(raw))
                except records.RowError as exc:
                    self.rejections.add(unit, exc.reasons, exc.message, raw.record)
                    continue
            line, pair_id, reverse, prompt_key, prompt, chosen, rejected, flags, margin = facts
            if prompt_key != last_prompt:
                last_prompt, last_rank = prompt_key, rank_key(seed, prompt_key)
            raw_text = (
                f"\t{raw.raw}" if raw.raw and "\n" not in raw.raw else ""
            )  # a JSON line: its own record
            lines.append(f"{unit}\t{unit}\t{line}{raw_text}\n")
            ids.append(pair_id)
            numbers.append(
                (
                    reverse,
                    last_rank,
                    unit,
                    prompt,
                    chosen,
                    rejected,
                    flags,
                    math.nan if margin is None else margin,
                )
            )
        if lines:
            items.extend(lines, ids, numbers)

    def _take(self, file_index: int, raw: readers.RawRow, file_fmt: str) -> None:
        if raw.error:
            unit = self.units.add(file_index, raw.row)
            self.rejections.add(unit, [raw.error], raw.detail or "", {"raw": raw.raw})
            return
        if file_fmt == "labelstudio":
            self._annotations(file_index, raw)
            return
        unit = self.units.add(file_index, raw.row)
        try:  # pairwise rows go through _pairwise, in batches
            if file_fmt == "ranked":
                self._ranked(formats.normalize_ranked(raw, unit))
            else:
                self._observation(file_fmt, formats.normalize_observation(raw, unit, file_fmt))
        except records.RowError as exc:
            self.rejections.add(unit, exc.reasons, exc.message, raw.record)

    def _annotations(self, file_index: int, raw: readers.RawRow) -> None:
        """A Label Studio task: each annotation is a row of its own, giving a pair or rejected."""
        for ann in labelstudio.expand(raw):
            unit = self.units.add(file_index, ann.row, ann.annotation)
            if ann.error is not None:
                reasons = ann.error.reasons if isinstance(ann.error, records.RowError) else None
                self.rejections.add(
                    unit, reasons or [ann.error.reason or "invalid"], ann.error.message, ann.record
                )
            else:
                assert ann.pair is not None
                self.items.new_block()
                add_pair(self.items, records.pair_facts(ann.pair), str(unit), unit, self.settings.seed)

    def _ranked(self, item: formats.RankedList) -> None:
        line = records.dumps([item.prompt, item.responses, item.ranks, item.meta, item.source])
        lengths = [records.text_length(r) for r in item.responses]
        prompt = records.text_length(item.prompt)
        self.kinds["ranked"].add(line, 0, item.unit, prompt, lengths, float(len(item.responses)), 0)

    def _observation(self, fmt: str, obs: formats.Observation) -> None:
        key = records.canonical_json(obs.prompt)
        bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "big") % BUCKETS
        line = records.dumps([obs.prompt, obs.response, obs.meta, obs.source])
        length = records.text_length(obs.response)
        prompt = records.text_length(obs.prompt)
        self.kinds[fmt].add(line, bucket, obs.unit, prompt, [length], obs.value, _rater_code(obs.rater))

    # ------------------------------------------------------------------------------------------ pair

    def pair(self, validator: Validator) -> list[tuple[str, SuiteResult]]:
        """Run each format's row suite, reject the rows it fails, and pair the rest; returns the suites' results."""
        outcomes = []
        for name, kind in self.kinds.items():
            if not len(kind):
                continue
            result = validator.run_chunks(f"{name}_rows", len(kind), kind.suite_chunks, self.directory)
            outcomes.append((f"{name} rows", result))
            passed = kind.passed(result, self.rejections)
            if name == "ranked":
                self._pair_ranked(kind, passed)
            else:
                self._pair_grouped(name, kind, passed)
        return outcomes

    def _pair_ranked(self, kind: _Kind, passed: spill.Bits) -> None:
        settings = self.settings
        for text in kind.spill(0).read():
            index, unit_text, _, _, line = text.split("\t", 4)
            if not passed[int(index)]:
                continue
            prompt, responses, ranks, meta, source = json.loads(line)
            unit = int(unit_text)
            out = pairing.Pairing()
            pairing.ranked_candidates(
                unit,
                prompt,
                responses,
                ranks,
                meta,
                source,
                mode=settings.ranked_pairs,
                cap=settings.max_pairs_per_prompt,
                seed=settings.seed,
                out=out,
            )
            self._settle(out)

    def _account(self, out: pairing.Pairing) -> None:
        """A block's pairing counters, and the rows it rejected or left unpaired."""
        self.stats.update(out.stats)
        for unit, (reason, detail) in out.rejected.items():
            self.rejections.add(unit, [reason], detail)
        for unit, why in out.unpaired.items():
            self.rejections.add(unit, ["unpaired"], why)

    def _settle(self, out: pairing.Pairing) -> None:
        self._account(out)
        if out.candidates:
            self.add_candidates(out.candidates)

    def add_candidates(self, candidates: list[pairing.Candidate]) -> None:
        """One block of candidates (a ranked row, or one prompt's ratings or thumbs), each row's meta stored once
        in the block when it is large."""
        items = self.items
        items.new_block()
        metas: dict[tuple[int, bool], str] = {}

        def meta_of(unit: int, meta: dict[str, Any], inner: bool) -> str:
            if (unit, inner) not in metas:
                metas[(unit, inner)] = meta_field(meta, items, inner=inner)
            return metas[(unit, inner)]

        for cand in candidates:
            kind, first, second = cand.meta
            if kind == "ranked":
                row_meta = {k: v for k, v in first.items() if k != "ranks"}
                text = (
                    "{"
                    + meta_of(cand.chosen_units[0], row_meta, True)
                    + '"ranks": '
                    + records.dumps(second)
                    + "}"
                )
            else:
                sides = [", ".join(meta_of(int(u), m, False) for u, m in side) for side in (first, second)]
                text = '{"chosen": [' + sides[0] + '], "rejected": [' + sides[1] + "]}"
            pair = {k: v for k, v in cand.pair.items() if k != "source"}
            pair.update(meta=_SENTINEL, source=cand.pair["source"])
            line = records.dumps(pair).replace(f'"{_SENTINEL}"', text, 1)
            facts = records.pair_facts(cand.pair, line)
            add_pair(items, facts, ",".join(map(str, cand.units)), cand.chosen_units[0], self.settings.seed)

    def _pair_grouped(self, name: str, kind: _Kind, passed: spill.Bits) -> None:
        """Ratings or thumbs: each bucket paired in memory, prompt by prompt, then the buckets' pairs merged in the
        order each prompt's first row was read."""
        made = []
        stats = kind.rater_stats(passed) if name == "rating" else {}
        for bucket in sorted(kind.spills):
            out = spill.LineSpill(self.directory / f"{name}-{bucket}.pairs")
            for first, candidates in self._pair_bucket(name, kind, bucket, passed, stats):
                out.write(f"{first}\t{records.dumps(candidates)}")
            made.append(out.read())
        for _, text in heapq.merge(*(_keyed(lines) for lines in made)):
            self.add_candidates(
                [pairing.Candidate(p, c, r, (0, 0), tuple(m)) for p, c, r, m in json.loads(text)]
            )

    def _pair_bucket(
        self, name: str, kind: _Kind, bucket: int, passed: spill.Bits, stats: dict[int, tuple[float, float]]
    ) -> Iterator[tuple[int, list[Any]]]:
        groups: dict[str, tuple[list[dict[str, str]], int, dict[str, pairing.Response]]] = {}
        for text in kind.spill(bucket).read():
            index, unit_text, value_text, rater, line = text.split("\t", 4)
            if not passed[int(index)]:
                continue
            prompt, response, meta, source = json.loads(line)
            unit, value = int(unit_text), float(value_text)
            if name == "rating":
                mean, std = stats[int(rater)]
                value = (value - mean) / std if std > 0 else 0.0
            if self.unpaired is not None:
                self.unpaired.add(name, prompt, response, value, meta, source)
            group = groups.setdefault(records.canonical_json(prompt), (prompt, unit, {}))
            found = group[2].setdefault(response.strip(), pairing.Response(response))
            found.units.append(unit)
            found.values.append(value)
            found.metas.append(meta)
            found.sources.append(source)
        settings = self.settings
        for key, (prompt, first, responses) in groups.items():
            out = pairing.Pairing()
            listed = list(responses.values())
            if name == "rating":
                pairing.rating_group(
                    key,
                    prompt,
                    listed,
                    min_score_gap=settings.min_score_gap,
                    cap=settings.max_pairs_per_prompt,
                    seed=settings.seed,
                    out=out,
                )
            else:
                pairing.binary_group(
                    key, prompt, listed, cap=settings.max_pairs_per_prompt, seed=settings.seed, out=out
                )
            self._account(out)
            if self.unpaired is not None:
                self.unpaired_kept += len(out.unpaired)
            if out.candidates:
                yield (
                    first,
                    [[c.pair, c.chosen_units, c.rejected_units, list(c.meta)] for c in out.candidates],
                )


def read_worker(
    source_file: SourceFile, index: int, fmt: str, settings: Any, directory: str
) -> parallel.FileResult:
    """Read one file as the serial import would, into ``directory``: the worker's job."""
    where = Path(directory)
    where.mkdir(parents=True, exist_ok=True)
    units = Units([source_file], where)
    collected = _Collected(where / "rejected.jsonl")
    items = Items(where, "pairs", **pair_columns())
    reader = Feedback(where, units, collected, items, settings)  # type: ignore[arg-type]
    file_fmt = reader.read_one(0, source_file, fmt, only="pairwise")
    collected.close()
    if file_fmt != "pairwise":
        return parallel.FileResult(file_fmt)
    items.spill.close()
    items.columns.settle(force=True)
    units.columns.settle(force=True)
    return parallel.FileResult(
        "pairwise", len(units), items.spill.lines, str(where), tuple(items.spill.parts)
    )


class _Collected:
    """Rejections of a worker, written as JSON lines for the main process to take over (:func:`parallel.rejected`)."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "w", encoding="utf-8")  # noqa: SIM115
        self.counts: dict[str, int] = {}

    def add(self, unit: int, reasons: Sequence[str], detail: str, record: Any = None) -> None:
        self.handle.write(records.dumps([unit, list(reasons), detail, record]) + "\n")

    def close(self) -> None:
        self.handle.close()


def _keyed(lines: Iterator[str]) -> Iterator[tuple[int, str]]:
    for line in lines:
        first, text = line.split("\t", 1)
        yield int(first), text


def _head(rows: Iterator[readers.RawRow]) -> list[readers.RawRow]:
    """The first rows of a file, up to :data:`DETECT_ROWS` readable ones, for recognising its format."""
    head: list[readers.RawRow] = []
    readable = 0
    for raw in rows:
        head.append(raw)
        readable += raw.error is None
        if readable >= DETECT_ROWS:
            break
    return head
