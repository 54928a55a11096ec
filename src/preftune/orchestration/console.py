"""What a local run shows while it works: one line per step, a progress bar inside long steps.

Steps write their output to their log files (``<run dir>/logs/<task>.log``); the terminal gets only
``[5/11] dpo ... 42 s`` per step. The steps' own tqdm bars are rendered machine-readable (tqdm reads its
defaults from ``TQDM_*`` environment variables), parsed here and redrawn as one bar under the step's line when
the output is a terminal; elsewhere (a pipe, a CI log) no bar is drawn, so each step stays one line.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import TextIO

#: Prefix of the progress lines steps print through tqdm (see :data:`STEP_ENV`).
MARK = "@@preftune-progress@@"
#: Environment for step processes: their tqdm bars become ``MARK desc<TAB>n<TAB>total`` lines.
STEP_ENV = {"TQDM_BAR_FORMAT": MARK + "{desc}\t{n}\t{total}", "TQDM_MININTERVAL": "0.5"}
_PROGRESS = re.compile(re.escape(MARK) + r"(?P<desc>[^\t]*)\t(?P<n>[0-9.]+)\t(?P<total>[0-9.]+|None)")


def parse_progress(line: str) -> tuple[str, float, float | None] | None:
    """(description, done, total) of a step's progress line, or None for any other line."""
    match = _PROGRESS.search(line)
    if match is None:
        return None
    total = match["total"]
    return match["desc"], float(match["n"]), None if total == "None" else float(total)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``: how long a step took, at a glance."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class Console:
    """Step lines (``[k/N] task ... outcome``) and, on a terminal, a bar fed by the running step's progress."""

    def __init__(self, total: int, out: TextIO | None = None, *, verbose: bool = False) -> None:
        self.total = total
        self.out = out or sys.stdout
        self.verbose = verbose
        self.bars = not verbose and self.out.isatty()
        self.started = 0
        self._lock = threading.Lock()
        self._bar = None  # tqdm bar of the running step (terminal only)
        self._open_line = False  # a step line written up to "... " waits for its outcome
        self._label = ""
        self._desc = ""

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str) -> None:
        """A line of its own (a note, the summary), after any step line still waiting for its outcome."""
        with self._lock:
            if self._open_line:
                self._write("\n")
                self._open_line = False
            self._write(text + "\n")

    def start(self, task: str) -> str:
        """Announce a step; returns its label (``[k/N] task``)."""
        with self._lock:
            self.started += 1
            label = f"[{self.started}/{self.total}] {task}"
            self._label = label
            if self._open_line:
                self._write("\n")
            if self.bars:
                from tqdm import tqdm

                self._bar = tqdm(total=None, desc=label, file=self.out, leave=False, dynamic_ncols=True)
                self._desc = ""
            elif self.verbose:
                self._write(f"{label} ...\n")
            else:
                self._write(f"{label} ... ")
                self._open_line = True
            return label

    def progress(self, desc: str, done: float, total: float | None) -> None:
        """Show the running step's progress (a terminal bar; nothing elsewhere)."""
        if self._bar is None:
            return
        with self._lock:
            bar = self._bar
            if bar is None:
                return
            if desc != self._desc:  # the step moved on to another loop (training, scoring, generation)
                self._desc = desc
                bar.reset(total=total)
                bar.set_description_str(f"{self._label} {desc}", refresh=False)
            bar.n = done
            bar.refresh()

    def finish(self, label: str, outcome: str) -> None:
        """The step's line with its outcome: ``[5/11] dpo ... 42 s``."""
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._open_line:
                self._write(f"{outcome}\n")
                self._open_line = False
            else:
                self._write(f"{label} ... {outcome}\n")
