"""What the end-to-end tests share: slices of the bundled data, and `preftune run` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PREFTUNE = str(Path(sys.executable).parent / "preftune")


def bundled_slice(name: str, dest: Path, rows: int) -> str:
    """The first ``rows`` lines of ``examples/data/<name>`` written to ``dest``; returns its path."""
    lines = (EXAMPLES / "data" / name).read_text(encoding="utf-8").splitlines()[:rows]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(dest)


def run_cli(pipeline: str, params: Mapping[str, Any], root: Path, *, timeout: int = 1800) -> dict[str, Any]:
    """``preftune run <pipeline> --param ...`` under ``root``; checks it succeeded and printed its run
    directory, and returns that run's summary.json."""
    argv = [PREFTUNE, "run", pipeline, "--pipeline-root", str(root)]
    for name, value in params.items():
        argv += ["--param", f"{name}={value}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = list(root.glob(f"preftune-{pipeline}-*"))
    assert str(run_dir) in done.stdout, "the run directory is printed"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    summary["printed"] = done.stdout  # what the user saw (not part of summary.json)
    return summary
