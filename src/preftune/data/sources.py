"""Where an import's rows come from: files and prefixes, ``save_to_disk`` directories, and Hugging Face datasets.

A source is one of:

* a data file, a directory or an ``s3://`` prefix of jsonl / json / csv / tsv / parquet / arrow files (read
  recursively; hidden and bookkeeping files skipped). Hive partitions (``date=YYYY-MM-DD`` folders) are parsed by
  pyarrow datasets, and ``since`` keeps the files of partitions on or after that day by pruning the dataset's
  fragments on their partition expression -- files in no date partition are always read;
* a directory written by ``datasets``' ``save_to_disk`` (``dataset_info.json`` + ``state.json``, or
  ``dataset_dict.json`` for several splits), local or on S3, read with ``datasets.load_from_disk``, memory-mapped;
* ``hf://<dataset id>[@revision][?config=NAME&split=NAME]``: a dataset on the Hugging Face Hub, read with
  ``datasets.load_dataset(..., streaming=True)``, so nothing is downloaded whole. The id may also be a local
  dataset repository directory (``hf:///path/to/repo``): the same hub loading code, without the network.

Each split of a dataset is one "file" of the source, named by its split; rows are numbered within it.
The import's own outputs (and, for the command line, its ``--out`` directory) are never read as input.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import parse_qs

from preftune.data import arrowrows, readers
from preftune.data.readers import DataFormatError, OnError, RawRow
from preftune.io import storage

log = logging.getLogger(__name__)

HUB_SCHEME = "hf://"
#: Files that mark a ``save_to_disk`` directory: one dataset, or a dict of splits.
DATASET_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))


@dataclass(frozen=True)
class SourceFile:
    """One readable part of a source: a data file, or one split of a dataset. ``name`` names it in rows."""

    uri: str
    name: str
    kind: str = "file"  # file | saved | hub
    split: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def rows(self, on_error: OnError = "reject", wanted: Collection[int] = ()) -> Iterator[RawRow]:
        """Its rows, streamed (``wanted``: only these row numbers, for a second read)."""
        if self.kind == "file":
            yield from readers.read_file(self.uri, self.name, on_error, wanted)
            return
        yield from readers.arrow_rows(self._batches(), self.name, on_error, wanted)

    def blocks(self) -> Iterator[Any] | None:
        """Its rows a block at a time (:mod:`blocks`), or None when it is read row by row."""
        from preftune.data import blocks

        return blocks.file_blocks(self.uri, self.name) if self.kind == "file" else None

    def _batches(self) -> Iterator[Any]:
        datasets = _datasets()
        if self.kind == "saved":
            loaded = datasets.load_from_disk(str(storage.local_path(self.uri)))
            dataset = loaded[self.split] if self.split else loaded
        else:
            dataset = _load_hub(datasets, self.uri, dict(self.options), self.split)
        for table in dataset.with_format("arrow").iter(batch_size=arrowrows.BATCH_ROWS):
            yield from table.to_batches()


@dataclass
class Listing:
    """The parts of a source to read, and the files not read (hidden or unsupported; before ``since``)."""

    files: list[SourceFile]
    skipped: list[str] = field(default_factory=list)
    since_skipped: list[str] = field(default_factory=list)
    unpartitioned: list[str] = field(default_factory=list)


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency of the runtime image
        raise ValueError(
            "reading Hugging Face datasets needs the `datasets` package: pip install datasets"
        ) from exc
    datasets.disable_progress_bars()
    return datasets


# ---------------------------------------------------------------------------------------------- hub


def _hub_parts(source: str) -> tuple[str, dict[str, str]]:
    """``hf://org/name@rev?config=c&split=s`` -> ("org/name", {"revision": "rev", "name": "c", "split": "s"})."""
    rest = source[len(HUB_SCHEME) :]
    rest, _, query = rest.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    unknown = set(options) - {"config", "split", "revision"}
    if unknown or not rest.strip("/"):
        raise ValueError(
            f"bad dataset URI {source!r}: expected hf://<dataset id>[@revision][?config=NAME&split=NAME]"
        )
    path = rest if rest.startswith("/") else rest.removeprefix("datasets/")
    if "@" in path and not path.startswith("/"):
        path, options["revision"] = path.split("@", 1)
    if "config" in options:
        options["name"] = options.pop("config")
    return path, options


def _load_hub(datasets: Any, path: str, options: dict[str, str], split: str) -> Any:
    kwargs = {k: v for k, v in options.items() if k in ("name", "revision")}
    try:
        return datasets.load_dataset(path, split=split or None, streaming=True, **kwargs)
    except (FileNotFoundError, ValueError) as exc:
        raise DataFormatError(f"cannot load the dataset ({exc})", file=f"{HUB_SCHEME}{path}") from exc


def _hub_listing(source: str) -> Listing:
    path, options = _hub_parts(source)
    datasets = _datasets()
    split = options.pop("split", "")
    loaded = _load_hub(datasets, path, options, split)
    splits = [split] if split else list(loaded.keys())
    frozen = tuple(sorted(options.items()))
    return Listing([SourceFile(path, s, "hub", s, frozen) for s in splits])


# ---------------------------------------------------------------------------------------------- save_to_disk


def _saved_listing(source: str, names: set[str]) -> Listing | None:
    """The splits of a ``save_to_disk`` directory, or None when ``source`` is not one."""
    if not any(all(m in names for m in marker) for marker in DATASET_MARKERS):
        return None
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(storage.local_path(source)))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataFormatError(f"not a readable save_to_disk directory ({exc})", file=source) from exc
    if isinstance(loaded, datasets.DatasetDict):
        return Listing([SourceFile(source, split, "saved", split) for split in loaded])
    return Listing([SourceFile(source, PurePosixPath(source.rstrip("/")).name or "dataset", "saved")])


# ---------------------------------------------------------------------------------------------- files


def _key(uri: str) -> str:
    """A comparable form of a file or directory URI: ``s3://bucket/key`` (also for ``minio://``), local paths
    resolved."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        return f"s3://{bucket}/{key}".rstrip("/")
    return str(storage.local_path(uri).resolve())


def _excluded(file_uri: str, excluded: Sequence[str], root: str) -> bool:
    """Whether a file is one of the import's outputs or lies under an excluded directory (the source root itself
    is never excluded as a whole: only the outputs named inside it are)."""
    key = _key(file_uri)
    return any(key == e or (e != root and key.startswith(e + "/")) for e in excluded)


def _partitions(names: list[str], since: str) -> tuple[set[str], set[str]]:
    """Of relative file names, those before ``since`` and those in no date partition, as pyarrow datasets'
    hive partitioning sees them (``date=YYYY-MM-DD`` folders compared as text)."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    schema = pa.schema([("date", pa.string())])
    partitioning = ds.partitioning(schema, flavor="hive")
    expressions = [partitioning.parse("/" + name) for name in names]
    unpartitioned = {
        n for n, e in zip(names, expressions, strict=True) if "date" not in ds.get_partition_keys(e)
    }
    if not readers.parse_since(since) or not names:
        return set(), unpartitioned
    dataset = ds.FileSystemDataset.from_paths(
        ["/" + n for n in names],
        schema=schema,
        format=ds.JsonFileFormat(),
        filesystem=pafs.LocalFileSystem(),
        partitions=expressions,
    )
    kept = {f.path[1:] for f in dataset.get_fragments(filter=ds.field("date") >= since.strip())}
    return set(names) - kept, unpartitioned


def _file_listing(source: str, since: str, excluded: Sequence[str]) -> Listing:
    files = storage.list_files(source)
    single = (
        [_key(f) for f in files] == [_key(source)]
        if storage.is_s3(source)
        else storage.local_path(source).is_file()
    )
    if single:
        name = PurePosixPath(files[0].split("://", 1)[-1]).name
        if not readers.suffix_of(name) and "." in name:
            raise readers.unsupported(name)
        return Listing([SourceFile(files[0], name)], unpartitioned=[name])
    base = _key(source) if storage.is_s3(source) else str(storage.local_path(source)).rstrip("/")
    root = _key(source)
    named = [
        (f, f[len(base) + 1 :] if f.startswith(base + "/") else PurePosixPath(f).name)
        for f in files
        if not _excluded(f, excluded, root)
    ]
    saved = _saved_listing(source, {rel for _, rel in named})
    if saved is not None:
        return saved
    chosen = [(f, rel) for f, rel in named if readers.suffix_of(rel) and not readers.hidden(rel)]
    skipped = [rel for f, rel in named if not (readers.suffix_of(rel) and not readers.hidden(rel))]
    if skipped:
        log.warning(
            "not reading %d hidden or unsupported file(s) under %s: %s",
            len(skipped),
            source,
            ", ".join(skipped[:20]),
        )
    if not chosen:
        raise DataFormatError(
            f"no data files found (expected {', '.join(readers.SUPPORTED_SUFFIXES)}); skipped: {skipped or 'none'}",
            file=source,
        )
    before, unpartitioned = _partitions([rel for _, rel in chosen], since)
    return Listing(
        [SourceFile(f, rel) for f, rel in chosen if rel not in before],
        skipped,
        [rel for _, rel in chosen if rel in before],
        [rel for _, rel in chosen if rel in unpartitioned],
    )


def list_source(source: str, since: str = "", exclude: Sequence[str] = ()) -> Listing:
    """What to read of ``source`` (see the module docstring); ``exclude``: files and directories never read
    (an import's outputs). DataFormatError when there is nothing to read."""
    if source.startswith(HUB_SCHEME):
        return _hub_listing(source)
    storage.check_uri(source)
    excluded = [_key(e) for e in exclude if e]
    try:
        return _file_listing(source, since, excluded)
    except FileNotFoundError as exc:
        raise DataFormatError("no such file or directory", file=source) from exc


def fingerprint(source: str) -> str:
    """A cheap identity of the data behind a source, for cache keys: its listing (see storage.fingerprint); for a
    hub dataset, the commit its revision points to (a local repository directory: its listing)."""
    if not source.startswith(HUB_SCHEME):
        return storage.fingerprint(source)
    path, options = _hub_parts(source)
    if path.startswith("/"):
        return storage.fingerprint(path)
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(path, revision=options.get("revision"))
    return f"{info.sha}"[:32]
