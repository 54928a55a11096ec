"""storage under flaky object storage: transfers through a fault-injecting proxy arrive intact, resume file by
file, and a directory is never taken for complete before its manifest is written."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fault_proxy import KINDS, FaultPlan, FaultProxy
from s3_server import S3Bucket, s3_bucket

from preftune.io import storage
from preftune.model import modeling

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The bundled tiny model plus a 9 MiB shard, so one file goes up and down in multipart (ranged) pieces."""
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    (model / "shards" / "extra.bin").parent.mkdir()
    (model / "shards" / "extra.bin").write_bytes(random.Random(0).randbytes(9 << 20))
    return model


def _proxy(endpoint: str, monkeypatch: pytest.MonkeyPatch, plan: FaultPlan) -> FaultProxy:
    proxy = FaultProxy(endpoint, plan).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    return proxy


@pytest.fixture
def flaky(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[S3Bucket, FaultProxy]]:
    """A bucket (``S3Bucket`` helpers talk to moto directly) and the code under test behind the fault proxy:
    30% of requests fail, the six kinds in turn, seed 1, at most 100 faults."""
    bucket = s3_bucket(s3_endpoint, monkeypatch, tmp_path)
    proxy = _proxy(s3_endpoint, monkeypatch, FaultPlan(seed=1, rate=0.3, delay_s=0.2, max_faults=100))
    try:
        yield bucket, proxy
    finally:
        proxy.stop()


def _object_gets(proxy: FaultProxy, bucket: str, since: int) -> set[str]:
    """Keys fetched with GET (object downloads, not listings) from request ``since`` on."""
    return {
        path[len(f"/{bucket}/") :]
        for index, method, path, _ in proxy.log
        if index >= since and method == "GET" and "?" not in path and path.startswith(f"/{bucket}/")
    }


def test_model_directory_round_trip_through_faults(
    flaky: tuple[S3Bucket, FaultProxy], model_dir: Path, tmp_path: Path
) -> None:
    s3, proxy = flaky
    uri = s3.uri("models/tiny")
    sent = storage.upload_dir(model_dir, uri)
    assert sorted(sent.sent) == sorted(storage.inventory(model_dir)) and sent.skipped == []
    manifest = json.loads(s3.get("models/tiny/_COMPLETE.json"))
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k: v.sha256 for k, v in storage.inventory(model_dir).items()
    }

    back = storage.download(uri, tmp_path / "back", require_manifest=True)
    assert storage.inventory(back) == storage.inventory(model_dir)  # size, SHA-256 and MD5 of every file
    assert storage.sha256_of(str(back)) == storage.sha256_of(str(model_dir)) == storage.sha256_of(uri)

    # the production reader: a model reference on s3 goes through the local cache, then transformers
    loaded = modeling.load_causal_lm(uri)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        expected = modeling.load_causal_lm(str(model_dir))(ids).logits
        assert torch.equal(loaded(ids).logits, expected)

    # the faults really happened, every kind of them
    assert all(proxy.counts[kind] >= 1 for kind in KINDS), dict(proxy.counts)
    assert proxy.faults == sum(proxy.counts[k] for k in KINDS) >= 10


def test_transfers_resume_file_by_file(
    flaky: tuple[S3Bucket, FaultProxy], model_dir: Path, tmp_path: Path
) -> None:
    s3, proxy = flaky
    uri = s3.uri("models/tiny")
    storage.upload_dir(model_dir, uri)
    back = storage.download(uri, tmp_path / "back")

    # a second upload finds everything there and verified: nothing is sent, the manifest stays
    start = proxy.counts["requests"]
    again = storage.upload_dir(model_dir, uri)
    assert again.sent == [] and sorted(again.skipped) == sorted(storage.inventory(model_dir))
    assert not [
        entry for entry in proxy.log[start:] if entry[1] in ("PUT", "POST", "DELETE") and not entry[3]
    ]

    # a download that died: one file gone, one cut short, one overwritten with garbage of the same size, a
    # temporary file left behind; the re-run fetches exactly those three and removes the leftover
    (back / "config.json").unlink()
    weights = (back / "model.safetensors").read_bytes()
    (back / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    size = (back / "tokenizer.json").stat().st_size
    (back / "tokenizer.json").write_bytes(b"x" * size)
    (back / "shards" / f".extra.bin.abc123{storage.PARTIAL_SUFFIX}").write_bytes(b"partial")
    start = proxy.counts["requests"]
    storage.download(uri, back)
    fetched = _object_gets(proxy, s3.bucket, start)
    assert fetched == {
        f"models/tiny/{name}" for name in ("config.json", "model.safetensors", "tokenizer.json")
    } | {"models/tiny/_COMPLETE.json"}
    assert storage.inventory(back) == storage.inventory(model_dir)
    assert not list(back.rglob(f"*{storage.PARTIAL_SUFFIX}"))


def _die_after(monkeypatch: pytest.MonkeyPatch, name: str, count: int) -> None:
    """Make one file's transfer (``storage.s3.send`` for S3 uploads, ``storage.transfers.fetch`` for local copies)
    fail after ``count`` calls, like a killed process."""
    module = storage.s3 if name == "send" else storage.transfers
    real = getattr(module, name)
    calls = {"n": 0}

    def dying(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > count:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_an_interrupted_upload_is_never_complete_and_resumes(
    where: str, s3: S3Bucket, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri("ckpt/step-10") if where == "s3" else str(tmp_path / "ckpt" / "step-10")
    with monkeypatch.context() as patch:
        _die_after(patch, "send" if where == "s3" else "fetch", 3)
        with pytest.raises(KeyboardInterrupt):
            storage.upload_dir(model_dir, uri)
    assert storage.read_manifest(uri) is None
    with pytest.raises(storage.IncompleteError, match="no _COMPLETE.json"):
        storage.download(uri, tmp_path / "reader", require_manifest=True)
    assert not (tmp_path / "reader").exists() or not any((tmp_path / "reader").iterdir())
    if where == "s3":
        with pytest.raises(storage.IncompleteError):
            storage.local_path(uri, tmp_path / "cache", require_manifest=True)

    resumed = storage.upload_dir(model_dir, uri)
    assert len(resumed.skipped) == 3 and len(resumed.sent) == len(storage.inventory(model_dir)) - 3
    assert set(storage.read_manifest(uri)) == set(storage.inventory(model_dir))
    back = storage.download(uri, tmp_path / "reader", require_manifest=True)
    assert storage.inventory(back) == storage.inventory(model_dir)


def test_rewriting_a_directory_takes_its_manifest_away_first(
    s3: S3Bucket, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3.uri("models/m")
    storage.upload_dir(model_dir, uri)
    (model_dir / "config.json").write_text('{"changed": true}')
    with monkeypatch.context() as patch:
        _die_after(patch, "send", 0)
        with pytest.raises(KeyboardInterrupt):
            storage.upload_dir(model_dir, uri)
    assert storage.read_manifest(uri) is None  # old files and new ones may be mixed now: not complete
    with pytest.raises(storage.IncompleteError):
        storage.download(uri, tmp_path / "reader", require_manifest=True)


def test_objects_changed_after_the_manifest_are_refused(
    s3: S3Bucket, model_dir: Path, tmp_path: Path
) -> None:
    uri = s3.uri("models/m")
    storage.upload_dir(model_dir, uri)
    s3.put("models/m/config.json", '{"much": "longer than before", "so": "the size differs"}' * 10)
    with pytest.raises(storage.IncompleteError, match=r"config.json: \d+ bytes, expected \d+"):
        storage.download(uri, tmp_path / "a")
    assert not (tmp_path / "a").exists()

    storage.upload_dir(model_dir, uri)
    original = (model_dir / "tokenizer.json").read_bytes()
    s3.put("models/m/tokenizer.json", b"y" * len(original))  # same size, other bytes
    dest = tmp_path / "b"
    with pytest.raises(storage.IntegrityError, match="tokenizer.json: could not be transferred intact"):
        storage.download(uri, dest)
    assert not (dest / "tokenizer.json").exists()
    assert not (dest / storage.MANIFEST).exists()
    assert not list(dest.rglob(f"*{storage.PARTIAL_SUFFIX}"))


def _unchecksummed_put(s3: S3Bucket, key: str, data: bytes) -> None:
    """Store an object without a flexible checksum, so only preftune's own check can catch a corrupt body."""
    import boto3
    from botocore.config import Config

    config = Config(
        request_checksum_calculation="when_required", response_checksum_validation="when_required"
    )
    boto3.client("s3", endpoint_url=s3.endpoint, config=config).put_object(
        Bucket=s3.bucket, Key=key, Body=data
    )


def test_a_corrupt_body_is_caught_and_fetched_again(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = random.Random(1).randbytes(4096)
    _unchecksummed_put(s3, "blobs/data.bin", data)
    proxy = _proxy(s3_endpoint, monkeypatch, FaultPlan(rate=1.0, kinds=("corrupt",), max_faults=1))
    try:
        got = storage.download(s3.uri("blobs/data.bin"), tmp_path / "once")
    finally:
        proxy.stop()
    assert proxy.counts["corrupt"] == 1 and got.read_bytes() == data

    proxy = _proxy(s3_endpoint, monkeypatch, FaultPlan(rate=1.0, kinds=("corrupt",), max_faults=50))
    try:
        with pytest.raises(storage.IntegrityError, match="MD5 differs"):
            storage.download(s3.uri("blobs/data.bin"), tmp_path / "always")
    finally:
        proxy.stop()
    assert proxy.counts["corrupt"] == storage.FETCH_ATTEMPTS
    assert not [p for p in (tmp_path / "always").rglob("*") if p.is_file()]


def test_reads_survive_cut_responses(flaky: tuple[S3Bucket, FaultProxy]) -> None:
    s3, proxy = flaky
    payloads = {f"rows/{i}.jsonl": random.Random(i).randbytes(2000 + i) for i in range(12)}
    for key, data in payloads.items():
        storage.write_bytes(s3.uri(key), data)
    assert {key: storage.read_bytes(s3.uri(key)) for key in payloads} == payloads
    assert {key: s3.get(key) for key in payloads} == payloads
    assert proxy.faults >= 5, dict(proxy.counts)


def test_streamed_reads_resume_after_cut_responses_and_refuse_damaged_bytes(
    s3: S3Bucket, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import streams its input: a body that breaks off resumes with a ranged GET from the last byte; bytes
    that arrive damaged are an error (they cannot be taken back from the reader), never silently used."""
    data = random.Random(3).randbytes(3 << 20)
    _unchecksummed_put(s3, "stream/data.bin", data)  # no response checksum: the ETag's MD5 is the check
    storage.write_bytes(s3.uri("stream/checked.bin"), data)
    for kinds in (("cut",), ("drop", "error503")):
        proxy = _proxy(s3_endpoint, monkeypatch, FaultPlan(rate=1.0, kinds=kinds, max_faults=2))
        try:
            for key in ("stream/data.bin", "stream/checked.bin"):
                with storage.open_input(s3.uri(key)) as stream:
                    assert stream.read() == data
        finally:
            proxy.stop()
        assert proxy.faults == 2, dict(proxy.counts)
        assert any(method == "GET" and fault for _, method, _, fault in proxy.log), proxy.log
    for key in ("stream/data.bin", "stream/checked.bin"):
        proxy = _proxy(s3_endpoint, monkeypatch, FaultPlan(rate=1.0, kinds=("corrupt",), max_faults=1))
        try:
            with (
                pytest.raises(storage.IntegrityError, match="damaged|MD5"),
                storage.open_input(s3.uri(key)) as stream,
            ):
                stream.read()
        finally:
            proxy.stop()
        assert proxy.counts["corrupt"] == 1
