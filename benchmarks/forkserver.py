"""A fork server for one side of the benchmark: ``python -m benchmarks.forkserver ours|trl``.

Importing torch, transformers, peft and TRL takes about 10 s per process on the 2 shared cores, more than a
quick measurement itself; ``--quick`` runs 50-odd processes. This parent imports one side's libraries once
(``PRELOAD``; nothing else: no model, no data, no torch op, so no thread pool exists to be inherited), then for
each spec read from stdin forks a child that runs ``benchmarks.worker.measure`` and exits. Each measurement is
still its own process: its own heap, model, data and allocator state, and its own peak RSS, which on Linux
includes the resident pages the child inherited (the imports), as a fresh process's includes the pages its own
imports made. Ours and TRL get separate parents with their own imports, so neither side's peak RSS carries
the other's libraries.

Protocol: one JSON spec per stdin line; one stdout line per spec, ``RESULT <json>`` or ``FAILED <json>`` (the
child's exit status and the tail of its output). ``READY`` once the imports are done.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

_BENCH = [
    "benchmarks.common",
    "benchmarks.dpo",
    "benchmarks.reward",
    "benchmarks.sft",
    "benchmarks.ppo",
    "benchmarks.grpo",
    "benchmarks.kto",
]
#: What a fresh process of each side imports anyway (the libraries, not any data or model).
PRELOAD: dict[str, list[str]] = {
    "ours": [
        "transformers.models.llama.modeling_llama",
        "preftune.train.dpo",
        "preftune.train.reward",
        "preftune.train.sft",
        "preftune.train.ppo",
        "preftune.train.group_rl",
        "preftune.train.kto",
        "preftune.report.html",
        "benchmarks.ceiling",
        *_BENCH,
    ],
    "trl": [
        "transformers.models.llama.modeling_llama",
        "datasets",
        "trl",
        "trl.trainer.dpo_trainer",
        "trl.trainer.reward_trainer",
        "trl.trainer.sft_trainer",
        "trl.trainer.rloo_trainer",
        "trl.trainer.grpo_trainer",
        "trl.trainer.kto_trainer",
        "preftune.model.modeling",
        "preftune.model.templating",
        "preftune.train.batching",
        *_BENCH,
    ],
}


def _child(spec: dict[str, Any], out_fd: int, log_path: str) -> None:
    """Runs in the forked child: the measurement, its result to ``out_fd``, all output to ``log_path``."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        from benchmarks.worker import measure

        data = json.dumps(measure(spec)).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(out_fd, view) :]
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent through the log and the exit status
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _measure_forked(spec: dict[str, Any]) -> str:
    """Fork, run ``spec`` in the child, wait for it; the protocol line to print."""
    fd, log_path = tempfile.mkstemp(prefix="bench-fork-", suffix=".log")
    os.close(fd)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(spec, write_fd, log_path)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        for chunk in iter(lambda: pipe.read(65536), b""):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    log = Path(log_path).read_text(encoding="utf-8", errors="replace")
    Path(log_path).unlink(missing_ok=True)
    if os.waitstatus_to_exitcode(status) == 0 and chunks:
        return "RESULT " + b"".join(chunks).decode()
    return "FAILED " + json.dumps({"status": os.waitstatus_to_exitcode(status), "log": log[-3000:]})


def main() -> None:
    side = sys.argv[1]
    from benchmarks import common

    common.set_threads()
    for name in PRELOAD[side]:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # the imports' objects stay out of the children's collections: fewer copy-on-write faults
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(_measure_forked(json.loads(line)), flush=True)


if __name__ == "__main__":
    main()
