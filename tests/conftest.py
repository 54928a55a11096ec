"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import S3Bucket, moto_server, s3_bucket


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, started once for the session and stopped at its end."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Bucket:
    """An empty bucket on the moto server, with AWS_ENDPOINT_URL and dummy credentials set for this test."""
    return s3_bucket(s3_endpoint, monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny matrices on a busy machine: one thread avoids OpenMP contention that makes them 100x slower.
    """
    import torch  # here, so that tests without models do not pay for importing it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
