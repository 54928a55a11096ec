"""moto's S3 server handling one request at a time, so that conditional writes are atomic as they are on S3.

AWS S3 (and MinIO) evaluate ``If-Match`` / ``If-None-Match`` atomically with the write. moto's threaded server
checks the condition and stores the object in two steps, with no lock between them: two racing conditional
puts can both pass when a thread switch falls in between. That is rare under the GIL (0 rounds of 40 with 8
racing writers, measured), but a race test must not depend on it, so the concurrency tests use this server,
whose requests run one after another (connections are still accepted concurrently).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class _OneAtATime:
    """A WSGI app that runs the wrapped one under a lock, its response body read inside it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))


@contextmanager
def atomic_moto_server() -> Iterator[str]:
    """Start the server on a free port of 127.0.0.1; yields its endpoint URL, stops it on exit."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _OneAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
