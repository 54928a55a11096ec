"""A fault-injecting HTTP proxy for tests: sits on 127.0.0.1 in front of the moto S3 server and makes some
requests fail the way object stores and networks do, so the code under test runs its real boto3 retry and
verification paths.

Which requests fail is decided by a seeded random draw per request (``rate`` of them, at most ``max_faults``);
the kind of fault cycles through ``kinds`` in order, so any run with at least ``len(kinds)`` faults sees each
kind. Kinds:

* ``drop``: the connection is closed before the request reaches S3 (no response at all);
* ``error500`` / ``error503``: an S3 ``InternalError`` / ``SlowDown`` answer, the request never reaches S3;
* ``delay``: the request is held ``delay_s`` seconds, then forwarded;
* ``cut``: the request reaches S3 and is applied, but the response breaks off: half its body is sent and the
  connection closed (a response without a body is lost entirely);
* ``corrupt``: an object download (GET of a key) arrives with one byte flipped. Its turn waits for such a
  request; one that then answers other than 200 / 206 is forwarded untouched (counted as ``corrupt_skipped``).
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

KINDS = ("drop", "error500", "error503", "delay", "cut", "corrupt")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
_ERRORS = {"error500": (500, "InternalError"), "error503": (503, "SlowDown")}


@dataclass(frozen=True)
class FaultPlan:
    """What to inject: a share of requests (drawn by ``seed``), the kinds in turn, and hard bounds."""

    seed: int = 0
    rate: float = 0.25
    kinds: tuple[str, ...] = KINDS
    delay_s: float = 0.2
    max_faults: int = 100

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use some of {KINDS}")
        if not 0 <= self.rate <= 1 or self.delay_s < 0 or self.max_faults < 0:
            raise ValueError("rate must be in [0, 1], delay_s and max_faults >= 0")


class FaultProxy:
    """``with FaultProxy(upstream, plan) as proxy: ... proxy.endpoint ...``; ``proxy.counts`` says what happened.

    ``counts`` holds ``requests`` (all requests seen) and one entry per injected fault kind; ``log`` holds one
    ``(index, method, path, fault or "")`` tuple per request.
    """

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        parsed = urlparse(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy only forwards to a local server, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.plan = plan or FaultPlan()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[int, str, str, str]] = []
        self.enabled = True
        self._rng = random.Random(self.plan.seed)
        self._lock = threading.Lock()
        self._faults = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "the proxy is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def faults(self) -> int:
        """How many faults were injected so far."""
        return self._faults

    def decide(self, method: str, path: str) -> str:
        """The fault for the next request ('' for none), counted; deterministic in the order requests come."""
        with self._lock:
            index = self.counts["requests"]
            self.counts["requests"] += 1
            fault = ""
            # one draw per request whether or not it is used, so the schedule depends on the seed and order only
            hit = self._rng.random() < self.plan.rate
            if self.enabled and hit and self._faults < self.plan.max_faults:
                fault = self.plan.kinds[self._faults % len(self.plan.kinds)]
                if fault == "corrupt" and not (method == "GET" and "?" not in path):
                    fault = ""  # only object downloads can be corrupted; the turn waits for one
                else:
                    self._faults += 1
                    self.counts[fault] += 1
            self.log.append((index, method, path, fault))
            return fault

    def reclassify(self, kind: str, as_kind: str) -> None:
        """Count a drawn fault that could not apply to its request (a ``corrupt`` without an object body)."""
        with self._lock:
            self.counts[kind] -= 1
            self.counts[as_kind] += 1

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._handle()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_GET  # noqa: N815

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner.decide(self.command, self.path)
        if fault == "drop":
            self.close_connection = True
            return
        if fault in _ERRORS:
            status, code = _ERRORS[fault]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected by fault_proxy</Message>"
                f"<RequestId>fault-{self.owner.faults}</RequestId></Error>"
            ).encode()
            self.send_response_only(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        if fault == "delay":
            time.sleep(self.owner.plan.delay_s)
        status, headers, data = self._forward(body)
        if fault == "corrupt":
            if self.command == "GET" and status in (200, 206) and "?" not in self.path and data:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0xFF
                data = bytes(flipped)
            else:
                self.owner.reclassify("corrupt", "corrupt_skipped")
        self.send_response_only(status)
        for name, value in headers:
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        if fault == "cut":
            self.close_connection = True
            if data and self.command != "HEAD":
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
            return  # a response without a body is lost entirely: nothing was sent
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """The upstream's answer: status, end-to-end headers (Content-Length kept only for HEAD), body."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD")
            ]
            return response.status, kept, data
        finally:
            conn.close()
