"""storage: local paths and s3:// behave the same; downloads never escape their destination."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from s3_server import S3Bucket

from preftune.io import storage


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)), "sub/deeper/c.json": b'{"x": 1}'}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_uri_parsing() -> None:
    assert storage.is_s3("s3://bucket/key")
    assert not storage.is_s3("/data/x.jsonl")
    assert not storage.is_s3("file:///data/x.jsonl")
    assert storage.split_s3("s3://bucket/some/key.jsonl") == ("bucket", "some/key.jsonl")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="bucket"):
        storage.split_s3("s3:///key")


@pytest.mark.parametrize(
    "uri", ["http://example.com/data.jsonl", "gs://bucket/data.jsonl", "hf://datasets/x"]
)
def test_unsupported_schemes_are_named(uri: str) -> None:
    for call in (storage.list_files, storage.read_bytes, storage.local_path, storage.sha256_of):
        with pytest.raises(ValueError) as info:
            call(uri)
        assert uri in str(info.value) and "s3://" in str(info.value) and "file://" in str(info.value)


def test_local_read_write_list_and_file_uri(tmp_path: Path) -> None:
    target = tmp_path / "out" / "nested" / "data.bin"
    storage.write_bytes(str(target), b"payload")
    assert storage.read_bytes(str(target)) == b"payload"
    assert storage.read_bytes(f"file://{target}") == b"payload"
    assert storage.local_path(f"file://{target}") == target
    assert storage.local_path(str(target)) == target
    assert not list(target.parent.glob(".data.bin.*")), "no temporary file left behind"
    _make_tree(tmp_path / "tree")
    listed = storage.list_files(str(tmp_path / "tree"))
    assert listed == sorted(listed)
    assert [Path(p).relative_to(tmp_path / "tree").as_posix() for p in listed] == [
        "a.txt",
        "sub/b.bin",
        "sub/deeper/c.json",
    ]
    assert storage.list_files(str(target)) == [str(target)]
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "missing"))


def test_local_download_and_upload_dir(tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    dest = storage.download(str(tmp_path / "src"), tmp_path / "copy")
    assert _tree(dest) == files
    single = storage.download(str(tmp_path / "src" / "sub" / "b.bin"), tmp_path / "one")
    assert single == (tmp_path / "one" / "b.bin").resolve() and single.read_bytes() == files["sub/b.bin"]
    storage.upload_dir(tmp_path / "src", str(tmp_path / "mirror"))
    mirrored = _tree(tmp_path / "mirror")
    assert json.loads(mirrored.pop(storage.MANIFEST))["files"].keys() == files.keys()  # written last
    assert mirrored == files


def test_sha256_of_file_and_directory(tmp_path: Path) -> None:
    _make_tree(tmp_path / "one")
    _make_tree(tmp_path / "two")
    assert storage.sha256_of(str(tmp_path / "one" / "a.txt")) == hashlib.sha256(b"alpha").hexdigest()
    assert storage.sha256_of(str(tmp_path / "one")) == storage.sha256_of(str(tmp_path / "two"))
    (tmp_path / "two" / "sub" / "b.bin").rename(tmp_path / "two" / "sub" / "renamed.bin")
    assert storage.sha256_of(str(tmp_path / "one")) != storage.sha256_of(str(tmp_path / "two"))


def test_s3_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    client = storage.s3_client()
    assert client.meta.endpoint_url == "http://127.0.0.1:2"
    assert client.meta.config.retries["mode"] == "adaptive"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.s3_client().meta.endpoint_url == "http://127.0.0.1:1"


def test_s3_round_trip(s3: S3Bucket, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "model")
    storage.upload_dir(tmp_path / "model", s3.uri("runs/model"))
    assert s3.list_keys() == [
        "runs/model/_COMPLETE.json",
        "runs/model/a.txt",
        "runs/model/sub/b.bin",
        "runs/model/sub/deeper/c.json",
    ]
    assert storage.list_files(s3.uri("runs/model")) == [s3.uri(k) for k in s3.list_keys()]
    assert storage.list_files(s3.uri("runs/model/")) == storage.list_files(s3.uri("runs/model"))
    assert storage.list_files(s3.uri("runs/model/a.txt")) == [s3.uri("runs/model/a.txt")]
    back = _tree(storage.download(s3.uri("runs/model"), tmp_path / "back"))
    assert back.pop(storage.MANIFEST) == s3.get("runs/model/_COMPLETE.json") and back == files
    assert storage.read_bytes(s3.uri("runs/model/sub/b.bin")) == files["sub/b.bin"]
    storage.write_bytes(s3.uri("runs/other/x.txt"), b"x")
    assert s3.get("runs/other/x.txt") == b"x"
    assert storage.sha256_of(s3.uri("runs/model")) == storage.sha256_of(str(tmp_path / "model"))
    assert storage.sha256_of(s3.uri("runs/model/a.txt")) == hashlib.sha256(b"alpha").hexdigest()
    with pytest.raises(FileNotFoundError):
        storage.list_files(s3.uri("runs/nothing-here"))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(s3.uri("runs/model/missing.txt"))


def test_s3_prefix_is_a_directory_boundary(s3: S3Bucket) -> None:
    s3.put("data/a.jsonl", "{}")
    s3.put("data2/b.jsonl", "{}")
    s3.put("data/marker/", "")
    assert storage.list_files(s3.uri("data")) == [s3.uri("data/a.jsonl")]


def test_s3_local_path_caches_until_the_object_changes(s3: S3Bucket, tmp_path: Path) -> None:
    s3.put("models/m/config.json", '{"v": 1}')
    s3.put("models/m/weights.bin", b"\x00\x01")
    cache = tmp_path / "cache"
    first = storage.local_path(s3.uri("models/m"), cache)
    assert first.is_dir() and (first / "config.json").read_text() == '{"v": 1}'
    assert first.parent == cache
    (first / "config.json").write_text("touched locally")  # a reused cache entry keeps this
    assert (storage.local_path(s3.uri("models/m"), cache) / "config.json").read_text() == "touched locally"
    s3.put("models/m/config.json", '{"v": 2}')  # the listing's ETag changes: fetched again
    again = storage.local_path(s3.uri("models/m"), cache)
    assert again == first and (again / "config.json").read_text() == '{"v": 2}'
    single = storage.local_path(s3.uri("models/m/weights.bin"), cache)
    assert single.name == "weights.bin" and single.read_bytes() == b"\x00\x01"
    default = storage.local_path(s3.uri("models/m/weights.bin"))  # PREFTUNE_CACHE_DIR (set by the fixture)
    assert default.read_bytes() == b"\x00\x01" and (tmp_path / "s3-cache") in default.parents


@pytest.mark.parametrize(
    "bad_key", ["data/../../escaped.txt", "data/sub/../../../escaped.txt", "data//abs/escaped.txt", "data/.."]
)
def test_download_refuses_keys_escaping_dest(s3: S3Bucket, tmp_path: Path, bad_key: str) -> None:
    s3.put("data/good.txt", "fine")
    s3.put(bad_key, "evil")
    assert bad_key in s3.list_keys(), "the server stores the key verbatim"
    dest = tmp_path / "area" / "dest"
    with pytest.raises(ValueError, match="escape"):
        storage.download(s3.uri("data"), dest)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "s3-cache" not in p.parts]
    assert written == [], f"nothing may be written, got {written}"
    with pytest.raises(ValueError, match="escape"):
        storage.local_path(s3.uri("data"), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_fingerprint_follows_the_data_not_the_uri(tmp_path: Path) -> None:
    import os

    from preftune.io.storage import fingerprint

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text('{"x": 1}\n')
    first = fingerprint(str(data))
    assert first == fingerprint(str(data))
    (data / "b.jsonl").write_text('{"x": 2}\n')
    second = fingerprint(str(data))
    assert second != first
    os.utime(data / "b.jsonl", ns=(1, 1))
    assert fingerprint(str(data)) != second
    assert fingerprint(str(data / "a.jsonl")) != fingerprint(str(data))


def test_fingerprint_of_an_s3_prefix(s3) -> None:  # noqa: ANN001
    from preftune.io.storage import fingerprint

    s3.put("daily/date=2026-11-01/a.jsonl", '{"x": 1}\n')
    first = fingerprint(s3.uri("daily"))
    assert first == fingerprint(s3.uri("daily/"))
    s3.put("daily/date=2026-11-02/a.jsonl", '{"x": 2}\n')
    assert fingerprint(s3.uri("daily")) != first


@pytest.fixture(params=["local", "s3"])
def root_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").uri("store")


def test_exists_sees_files_and_non_empty_directories(root_uri: str, tmp_path: Path) -> None:
    assert not storage.exists(f"{root_uri}/d")
    storage.write_bytes(f"{root_uri}/d/sub/x.txt", b"x")
    assert storage.exists(f"{root_uri}/d") and storage.exists(f"{root_uri}/d/sub/x.txt")
    assert not storage.exists(f"{root_uri}/d/su")  # a prefix of a name is not a directory
    if not root_uri.startswith("s3://"):
        (Path(root_uri) / "empty").mkdir()
        assert not storage.exists(f"{root_uri}/empty")


def test_create_only_writes_never_replace(root_uri: str) -> None:
    uri = f"{root_uri}/claims/v1.json"
    storage.write_bytes(uri, b"first", create_only=True)
    with pytest.raises(storage.AlreadyExistsError):
        storage.write_bytes(uri, b"second", create_only=True)
    assert storage.read_bytes(uri) == b"first"
    storage.write_bytes(uri, b"replaced")  # a plain write still replaces
    assert storage.read_bytes(uri) == b"replaced"
    if not root_uri.startswith("s3://"):
        assert sorted(p.name for p in Path(root_uri, "claims").iterdir()) == ["v1.json"]  # no temporary left


def test_copy_dir_copies_exactly_the_listed_files_and_checks_the_result(
    root_uri: str, tmp_path: Path
) -> None:
    files = _make_tree(tmp_path / "src")
    storage.upload_dir(tmp_path / "src", f"{root_uri}/a", manifest=False)
    infos = storage.inventory(tmp_path / "src")
    storage.copy_dir(f"{root_uri}/a", f"{root_uri}/b", infos)
    assert _tree(Path(storage.download(f"{root_uri}/b", tmp_path / "back"))) == files
    assert storage.read_manifest(f"{root_uri}/b") is None  # the caller writes the manifest, if it wants one

    storage.write_bytes(f"{root_uri}/c/intruder.txt", b"another writer")
    with pytest.raises(storage.IntegrityError, match="intruder.txt: unexpected file"):
        storage.copy_dir(f"{root_uri}/a", f"{root_uri}/c", infos)
    wrong = dict(infos, **{"a.txt": storage.FileInfo(5, "0" * 64, "0" * 32)})
    with pytest.raises(storage.IntegrityError):
        storage.copy_dir(f"{root_uri}/a", f"{root_uri}/d", wrong)


def test_copy_dir_stays_within_one_store(s3: S3Bucket, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="within one store"):
        storage.copy_dir(str(tmp_path), s3.uri("x"), {})


def test_the_wheel_ships_the_storage_package() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "preftune.io.storage" in pyproject["tool"]["setuptools"]["packages"], (
        'add "preftune.io.storage" to [tool.setuptools] packages in pyproject.toml'
    )


def test_files_are_read_as_streams_and_outputs_put_in_place(s3: S3Bucket, tmp_path: Path) -> None:
    data = b"".join(b"line %d\n" % i for i in range(300_000))  # ~2.5 MB: several chunks
    (tmp_path / "big.txt").write_bytes(data)
    s3.put("big/big.txt", data)
    for uri in (str(tmp_path / "big.txt"), s3.uri("big/big.txt")):
        with storage.open_input(uri) as stream:
            assert stream.read(5) == b"line " and stream.read() == data[5:]
    with pytest.raises(FileNotFoundError):
        storage.open_input(s3.uri("big/missing.txt"))
    assert storage.sizes(s3.uri("big")) == {s3.uri("big/big.txt"): len(data)}
    assert storage.sizes(str(tmp_path)) == {str(tmp_path / "big.txt"): len(data)}
    for target in (str(tmp_path / "out" / "put.txt"), s3.uri("out/put.txt")):
        local = tmp_path / "made.txt"
        local.write_bytes(b"made")
        storage.put_file(local, target)
        assert storage.read_bytes(target) == b"made" and not local.exists()
    filesystem, path = storage.arrow_filesystem(s3.uri("big/big.txt"))
    with filesystem.open_input_stream(path) as stream:
        assert stream.read() == data
