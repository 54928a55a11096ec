"""The entry point of one local step process: KFP's executor, plus what a local run needs of its steps.

``preftune run`` starts every step as ``python -m preftune.orchestration.step_main <KFP executor arguments>``
instead of ``python -m kfp.dsl.executor_main``. This module then

- stops the step's whole process group (torchrun workers included) when the ``preftune run`` that started it
  dies, even by SIGKILL: the runner hands down the read end of a pipe whose write end only it holds, and reading
  it returns once the runner is gone;
- records why the step failed (the exception's type, message and whether it is deterministic) in the file named
  by ``PREFTUNE_FAILURE_FILE``, so that the runner can say why in the run summary and does not retry a
  configuration or data error.

It imports nothing heavy itself: the component's own imports decide what the step loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from preftune.launch.failures import is_deterministic

PARENT_FD_ENV = "PREFTUNE_PARENT_FD"
FAILURE_FILE_ENV = "PREFTUNE_FAILURE_FILE"
EXECUTOR_MODULE = "kfp.dsl.executor_main"


def _stop_group_when_parent_dies(fd: int) -> None:
    """Block on the runner's pipe; when it closes (the runner died), stop this step's process group."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    group = os.getpgrp()
    try:
        os.killpg(group, signal.SIGTERM)
        time.sleep(10)
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass


def watch_parent() -> None:
    """Start the watchdog when the runner passed its pipe down (a step run any other way has none)."""
    value = os.environ.get(PARENT_FD_ENV, "")
    if value.isdigit():
        threading.Thread(target=_stop_group_when_parent_dies, args=(int(value),), daemon=True).start()


def failure_record(error: BaseException) -> dict[str, object]:
    """What the runner reads about a failed step: type, message, whether a retry could help, last frames."""
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    frames = traceback.format_exception(error)
    return {
        "type": name,
        "message": str(error) or name,
        "deterministic": is_deterministic(error),
        "traceback": "".join(frames[-6:]),
    }


def record_failure(error: BaseException) -> None:
    """Write :func:`failure_record` where the runner asked for it (nothing when it did not ask)."""
    target = os.environ.get(FAILURE_FILE_ENV)
    if not target:
        return
    with contextlib.suppress(OSError):  # the step's own log still has the traceback
        Path(target).write_text(json.dumps(failure_record(error)), encoding="utf-8")


def main() -> None:
    """Run KFP's executor with this process's arguments, recording the failure if it raises."""
    watch_parent()
    sys.argv = [EXECUTOR_MODULE, *sys.argv[1:]]
    try:
        runpy.run_module(EXECUTOR_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        if done.code not in (0, None):  # the component chose to stop: the same would happen again
            record_failure(ValueError(f"the step exited with {done.code}"))
        raise
    except BaseException as error:
        record_failure(error)
        raise


if __name__ == "__main__":
    main()
