"""One benchmark measurement in this (fresh) process: ``python -m benchmarks.worker '<json spec>'``.

Prints one JSON line prefixed ``RESULT `` with the measurement, this process's peak RSS and the thread count.
"""

from __future__ import annotations

import importlib
import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from benchmarks import common

    threads = common.set_threads()
    module = importlib.import_module(f"benchmarks.{spec.pop('task')}")
    result = module.run(spec.pop("impl"), **spec)
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["threads"] = threads
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
