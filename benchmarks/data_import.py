"""Preference import at scale: rows per second and peak memory, local and through S3 (moto).

``python -m benchmarks --only import`` (part of ``make bench``) generates pairwise feedback -- 1M rows, and 10M in
the full run -- as jsonl.gz and as parquet, then imports each with ``preftune.data.preferences.import_preferences``
in a fresh process, from a local directory and from an ``s3://`` prefix on a moto server. Reported per run:
rows/s (input rows over wall time, process start included), the import process's peak RSS (exact: the kernel's
high-water mark of its memory, VmHWM), the largest worker's (sampled) and the peak of the import process and its
worker processes together (a parallel read of a multi-file source; sampled every 0.2 s, and never below the
process's own exact peak).
Goals (issue 20): at least 50,000 rows/s and a total peak RSS under 1.5 GB at 10M rows.

The rows are not all clean: about 0.2% are exact duplicates, 0.05% reversed pairs (contradictions), 0.05% have
an empty answer, so every rejection path (and the second read of rejected rows) is part of the measurement.
Generated data is cached under ``PREFTUNE_BENCH_DATA`` (default: the system temp directory).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Goals: rows per second, and peak RSS at 10M rows.
ROWS_PER_S_GOAL = 50_000
PEAK_RSS_GOAL_MB = 1536
#: Rows per generated file (~100 MB of JSON): a source is a directory of such part files, as exports write them.
FILE_ROWS = 250_000
_VOCABULARY = (
    "the a model answer question data user please explain why how what when where which time people way day "
    "thing world life hand part child eye woman place work week case point number group problem fact good new "
    "first last long great little own other old right big high different small large next early young important "
    "few public bad same able to of in for on with at by from up about into over after beneath under above"
)
_WORDS = _VOCABULARY.split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=words))


def _rows(count: int, seed: int) -> Any:
    """Pairwise rows: about four pairs per prompt (answers drawn from pools of generated texts), with a few
    duplicates, reversed pairs and empty answers."""
    rng = random.Random(seed)
    chosen_pool = [_text(rng, 40) for _ in range(20_000)]
    rejected_pool = [_text(rng, 25) for _ in range(20_000)]
    recent: list[dict[str, Any]] = []
    for n in range(count):
        roll = rng.random()
        if recent and roll < 0.002:
            row = dict(rng.choice(recent))
        elif recent and roll < 0.0025:
            old = rng.choice(recent)
            row = {"prompt": old["prompt"], "chosen": old["rejected"], "rejected": old["chosen"]}
        else:
            group = seed * (count // 4 + 1) + n // 4
            words = " ".join(_WORDS[(group * (k + 1) * 2654435761) % len(_WORDS)] for k in range(12))
            row = {
                "prompt": f"Question {group}: {words}?",
                "chosen": "  " if roll < 0.003 else chosen_pool[rng.randrange(20_000)],
                "rejected": rejected_pool[rng.randrange(20_000)],
            }
            if roll > 0.7:
                row["margin"] = round(roll * 3, 2)
        if len(recent) < 64:
            recent.append(row)
        else:
            recent[n % 64] = row
        yield row


def generate(directory: Path, rows: int, kind: str) -> Path:
    """A directory of generated files (``kind``: jsonl.gz or parquet), written once and reused."""
    target = directory / f"pairs-{rows}-{kind}-{FILE_ROWS}"
    if (target / "_DONE").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, rows, FILE_ROWS)):
        count = min(FILE_ROWS, rows - start)
        path = target / f"part-{part:05d}.{kind}"
        if kind == "jsonl.gz":
            with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as handle:
                for row in _rows(count, part):
                    handle.write(json.dumps(row) + "\n")
        else:
            _parquet(path, _rows(count, part))
    (target / "_DONE").write_text("")
    return target


def _parquet(path: Path, rows: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("margin", pa.float64()),
        ]
    )
    with pq.ParquetWriter(path, schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == 100_000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))


# ---------------------------------------------------------------------------------------------- one import


def _child(source: str, out: str) -> None:
    """The measured process: one import, its metrics printed as ``RESULT {...}``."""
    from preftune.data.preferences import import_preferences

    started = time.perf_counter()
    metrics = import_preferences(
        source,
        f"{out}/train.jsonl",
        f"{out}/eval.jsonl",
        f"{out}/rejected.jsonl",
        f"{out}/report.html",
        suite_path=f"{out}/expectation_suite.json",
        eval_fraction=0.05,
    )
    metrics["import_seconds"] = time.perf_counter() - started
    from preftune.data import parallel

    # This process's own peak, from the kernel's high-water mark of its memory since exec. Not wait4's ru_maxrss:
    # Linux carries the parent's resident size at fork into it across exec, so a child of a large benchmark
    # process reported the parent's size (905 MiB for an import whose own peak was 458).
    status = Path("/proc/self/status").read_text()
    metrics["own_peak_rss_mb"] = next(
        int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")
    )
    metrics["workers"] = parallel.workers_for(source, _files(source), "auto")
    print("RESULT " + json.dumps(metrics), flush=True)


def _files(source: str) -> Any:
    from preftune.data import sources

    return sources.list_source(source).files


class _TreeMemory:
    """The largest resident memory of a process and all its children at once, sampled every 0.2 s (psutil)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak, self.done = pid, 0, threading.Event()
        self.child_peak = 0  # the largest single worker, sampled
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import psutil

        try:
            process = psutil.Process(self.pid)
            while not self.done.wait(0.2):
                tree = [process, *process.children(recursive=True)]
                total = 0
                for member in tree:
                    with contextlib.suppress(psutil.Error):  # a worker that just ended
                        rss = member.memory_info().rss
                        total += rss
                        if member is not process:
                            self.child_peak = max(self.child_peak, rss)
                self.peak = max(self.peak, total)
        except psutil.Error:
            return

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def measure(source: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """One import in a fresh process: wall time, its own peak RSS (exact, from wait4), the peak of the process
    and its workers together (sampled), and its metrics."""
    import threading

    with tempfile.TemporaryDirectory(prefix="preftune-bench-import-") as out:
        log = Path(out) / "child.log"
        with open(log, "w") as handle:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.data_import", "--child", source, f"{out}/outputs"],
                cwd=ROOT,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            tree = _TreeMemory(proc.pid)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            _, status, usage = os.wait4(proc.pid, 0)
            timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - started
            tree_mb = tree.stop()
        text = log.read_text(errors="replace")
        result = next(
            (json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None
        )
        if proc.returncode or result is None:
            raise RuntimeError(f"import of {source} failed (rc {proc.returncode}):\n{text[-3000:]}")
        own = result.get("own_peak_rss_mb") or usage.ru_maxrss / 1024
        result["worker_peak_rss_mb"] = tree.child_peak / 2**20
        return {
            "seconds": seconds,
            "peak_rss_mb": own,
            "tree_peak_rss_mb": max(own, tree_mb),
            "metrics": result,
        }


# ---------------------------------------------------------------------------------------------- the benchmark


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": os.environ.get("PREFTUNE_BENCH_THREADS", "1"),
        **(extra or {}),
    }


def _upload(endpoint: str, bucket: str, local: Path, prefix: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(local.iterdir()):
        if not path.name.startswith("_"):
            client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def _s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": endpoint,
    }


def run(
    sizes: list[int],
    kinds: list[str],
    stores: list[str],
    data_dir: Path,
    timeout: float,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Every (size, format, store) import, one fresh process each; results as rows. A run that fails or is
    killed at ``timeout`` seconds is a row with its ``error``; ``progress(rows)`` is called after each run, so a
    long benchmark keeps what it measured."""
    results = []
    server = None
    try:
        for size in sizes:
            for kind in kinds:
                local = generate(data_dir, size, kind)
                for store in stores:
                    env, source = _env(), str(local)
                    if store == "s3":
                        if server is None:
                            server = _moto()
                        os.environ.update(_s3_env(server[1]))
                        import boto3

                        boto3.client("s3", endpoint_url=server[1]).create_bucket(
                            Bucket=f"bench-{size}-{kind.replace('.', '-')}"
                        )
                        source = _upload(
                            server[1], f"bench-{size}-{kind.replace('.', '-')}", local, "feedback"
                        )
                        env = _env(_s3_env(server[1]))
                    started = time.perf_counter()
                    try:
                        row = _row(size, kind, store, measure(source, env, timeout))
                    except RuntimeError as exc:
                        seconds = time.perf_counter() - started
                        row = {"rows": size, "format": kind, "store": store, "seconds": seconds}
                        row["error"] = str(exc)[-1500:]
                    row["load_average"] = list(os.getloadavg())
                    results.append(row)
                    print(_line(row), flush=True)
                    if progress is not None:
                        progress(results)
    finally:
        if server is not None:
            server[0].stop()
    return results


def _moto() -> tuple[Any, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request on the console

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _row(size: int, kind: str, store: str, measured: dict[str, Any]) -> dict[str, Any]:
    metrics = measured["metrics"]
    rows_per_s = metrics["rows_input"] / measured["seconds"]
    workers = int(metrics.get("workers") or 0)
    total_mb = measured["tree_peak_rss_mb"]
    row = {
        "rows": size,
        "format": kind,
        "store": store,
        "seconds": measured["seconds"],
        "rows_per_s": rows_per_s,
        "peak_rss_mb": measured["peak_rss_mb"],
        "workers": workers,
        "worker_peak_rss_mb": metrics.get("worker_peak_rss_mb", 0.0),
        "total_peak_rss_mb": total_mb,
        "rows_input": metrics["rows_input"],
        "rows_used": metrics["rows_used"],
        "rows_rejected": metrics["rows_rejected"],
        "pairs_train": metrics["pairs_train"],
        "pairs_eval": metrics["pairs_eval"],
    }
    row["goals"] = {
        f">={ROWS_PER_S_GOAL:,} rows/s": rows_per_s >= ROWS_PER_S_GOAL,
        f"RSS<{PEAK_RSS_GOAL_MB} MiB": total_mb < PEAK_RSS_GOAL_MB,
    }
    return row


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return (
            f"  import {row['rows']:>10,} rows {row['format']:<8} {row['store']:<5} FAILED after "
            f"{row['seconds']:.0f} s: {row['error'].splitlines()[0]}"
        )
    goals = ", ".join(f"{name} {'MET' if met else 'MISSED'}" for name, met in row["goals"].items())
    return (
        f"  import {row['rows']:>10,} rows {row['format']:<8} {row['store']:<5} {row['seconds']:8.1f} s "
        f"{row['rows_per_s']:>9,.0f} rows/s  peak RSS {row['peak_rss_mb']:6.0f} MiB"
        f" (with {row['workers']} worker(s) of {row['worker_peak_rss_mb']:.0f} MiB: {row['total_peak_rss_mb']:.0f})  "
        f"({row['rows_used']:,} used, {row['rows_rejected']:,} rejected)  {goals}"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """The import benchmark on its own; ``benchmarks/__main__`` calls it for ``--only import``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1M rows only (the 10M case is left out)")
    parser.add_argument(
        "--sizes", default="", help="comma-separated row counts (default: 1M, and 10M unless --quick)"
    )
    parser.add_argument("--formats", default="jsonl.gz,parquet")
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument(
        "--timeout", type=float, default=1200, help="seconds one import may run before it is killed"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the results file that this run does not measure (run --sizes 10000000 alone)",
    )
    args = parser.parse_args(argv)
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else [1_000_000] + ([] if args.quick else [10_000_000])
    )
    data_dir = Path(
        os.environ.get("PREFTUNE_BENCH_DATA") or Path(tempfile.gettempdir()) / "preftune-bench-data"
    )
    started = time.time()
    print(
        f"preference import: {', '.join(f'{s:,}' for s in sizes)} rows; load average {os.getloadavg()[0]:.2f}"
    )
    path = HERE / ("results-import-quick.json" if args.quick else "results-import.json")
    kept = _kept_rows(path) if args.merge else []
    load = os.getloadavg()[0]

    def write(rows: list[dict[str, Any]]) -> dict[str, Any]:
        measured = {(r["rows"], r["format"], r["store"]) for r in rows}
        result = {
            "quick": args.quick,
            "cpus": os.cpu_count(),
            "load_average_start": load,
            "seconds": time.time() - started,
            "rows": [r for r in kept if (r["rows"], r["format"], r["store"]) not in measured] + rows,
        }
        path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        return result

    result = write(run(sizes, args.formats.split(","), args.stores.split(","), data_dir, args.timeout, write))
    print(f"wrote {path}")
    return result


def _kept_rows(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("rows", []))
    except (OSError, ValueError):
        return []


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        main()
