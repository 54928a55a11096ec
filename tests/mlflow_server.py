"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1, SQLite, a local artifact root.

The server is the full ``mlflow`` package, whose pins (pyarrow, cryptography) clash with the runtime's, so it
lives in its own virtual environment, like checkov: ``$PREFTUNE_MLFLOW_SERVER`` names its ``mlflow`` command,
else ``.venv-mlflow/bin/mlflow`` at the repository root. The code under test talks to it with the MLflow
client (``preftune[mlflow]``, mlflow-skinny) over HTTP, as a pipeline step does on a cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 180.0  # a cold start creates the SQLite schema; on a loaded 2-core machine that takes ~20 s


def mlflow_command() -> str:
    """The ``mlflow`` command of the server environment; AssertionError saying how to get one."""
    candidates = [os.environ.get("PREFTUNE_MLFLOW_SERVER", ""), str(ROOT / ".venv-mlflow" / "bin" / "mlflow")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        "no MLflow server to test against: `make venv` installs it into .venv-mlflow (python -m venv "
        ".venv-mlflow && .venv-mlflow/bin/pip install mlflow==3.17.2), or set PREFTUNE_MLFLOW_SERVER to an "
        "`mlflow` command"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mlflow_server(root: Path, *, workers: int = 2) -> Iterator[str]:
    """Start ``mlflow server`` with its database and artifacts under ``root``; yields its URL, then stops it.

    Start-up is bounded (:data:`STARTUP_SECONDS`); the server's whole process group is stopped at the end.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = (root / "server.log").open("wb")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = [
        mlflow_command(),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--default-artifact-root",
        str(root / "artifacts"),
        "--workers",
        str(workers),
    ]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, root / "server.log")
        yield url
    finally:
        _stop(proc)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(
        f"mlflow server not healthy after {STARTUP_SECONDS:.0f} s:\n{log.read_text()[-3000:]}"
    )


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (gunicorn/uvicorn workers included), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
