"""A local S3 for tests: moto's threaded server on 127.0.0.1, reached through ``AWS_ENDPOINT_URL`` like any
S3-compatible store, so the code under test runs its real boto3 path (no monkeypatched clients)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

# Dummy credentials only: they exist so boto3's chain resolves without touching a real profile or instance role.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3_ENV_REMOVED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's server on a free port of 127.0.0.1; yields its endpoint URL, stops it on exit."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class S3Bucket:
    """A fresh, empty bucket on the test server, with small helpers for arranging test data."""

    endpoint: str
    bucket: str
    client: Any

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def put(self, key: str, data: bytes | str) -> str:
        body = data.encode("utf-8") if isinstance(data, str) else data
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def list_keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def s3_bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> S3Bucket:
    """Point this test's environment at ``endpoint`` with dummy credentials and create a uniquely named bucket."""
    import boto3

    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    for name in S3_ENV_REMOVED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    # No shared config or credentials files: a developer's real profile must never be used by tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("PREFTUNE_CACHE_DIR", str(tmp_path / "s3-cache"))
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3Bucket(endpoint=endpoint, bucket=bucket, client=client)
