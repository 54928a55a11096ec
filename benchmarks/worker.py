"""One benchmark measurement in this (fresh) process: ``python -m benchmarks.worker '<json spec>'``.

Prints one JSON line prefixed ``RESULT `` with the measurement, this process's peak RSS and the thread count.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurement ``spec`` (``task``, ``impl`` and the task's keyword arguments) in this process."""
    from benchmarks import common

    spec = dict(spec)
    if "threads" in spec:  # a scenario run at its own thread count (the 125M rows: 1 and 2)
        os.environ["PREFTUNE_BENCH_THREADS"] = str(spec.pop("threads"))
    threads = common.set_threads()
    module = importlib.import_module(f"benchmarks.{spec.pop('task')}")
    result = module.run(spec.pop("impl"), **spec)
    result["peak_rss_mb"] = common.peak_rss_mb()
    result.update(common.peak_gpu_mb())
    result["threads"] = threads
    return result


def main() -> None:
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)


if __name__ == "__main__":
    main()
