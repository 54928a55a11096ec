"""One way to read and write data wherever it lives: local paths (plain or ``file://``) and ``s3://`` URIs.

Pipelines run in containers whose artifacts live in S3-compatible object storage, while tests and laptops use
local paths; every module (the registry included) goes through this package so that both work the same, with
one S3 backend (boto3, credentials from its standard chain, never from code).

Object stores time out, throttle and drop connections, and processes die half-way through a transfer. So
requests are retried (:mod:`.s3`); files are renamed into place only once verified (:mod:`.local`,
:mod:`.transfers`); a directory is complete exactly when its manifest, written last, is there (:mod:`.manifests`);
transfers resume file by file; and nothing is ever written outside its destination.

The modules, lowest first: :mod:`.integrity` (what a file must be, the errors), :mod:`.uris`, :mod:`.local`
(atomic writes, safe paths), :mod:`.s3` (the backend and its retries), :mod:`.manifests`, :mod:`.transfers`
(downloads, uploads, copies), :mod:`.files` (single files and listings), :mod:`.streams` (reading a file as a
stream, and pyarrow's filesystem for random access), :mod:`.cache` (the download cache) and
:mod:`.hashing` (content hashes and fingerprints). Callers use the names below.
"""

from __future__ import annotations

from preftune.io.storage.cache import default_cache_dir, local_path
from preftune.io.storage.files import (
    exists,
    list_dirs,
    list_files,
    put_file,
    read_bytes,
    remove_tree,
    sizes,
    write_bytes,
)
from preftune.io.storage.hashing import fingerprint, sha256_of
from preftune.io.storage.integrity import (
    AlreadyExistsError,
    FileInfo,
    IncompleteError,
    IntegrityError,
    UnsafePathError,
)
from preftune.io.storage.local import PARTIAL_SUFFIX, publish_file
from preftune.io.storage.manifests import (
    MANIFEST,
    inventory,
    listing_problems,
    manifest_bytes,
    parse_manifest,
    read_manifest,
)
from preftune.io.storage.s3 import FETCH_ATTEMPTS, s3_client
from preftune.io.storage.streams import arrow_filesystem, open_input
from preftune.io.storage.transfers import Transfer, copy_dir, download, upload_dir
from preftune.io.storage.uris import SUPPORTED_SCHEMES, check_uri, is_s3, split_s3

__all__ = [
    "FETCH_ATTEMPTS",
    "MANIFEST",
    "PARTIAL_SUFFIX",
    "SUPPORTED_SCHEMES",
    "AlreadyExistsError",
    "FileInfo",
    "IncompleteError",
    "IntegrityError",
    "Transfer",
    "UnsafePathError",
    "arrow_filesystem",
    "check_uri",
    "copy_dir",
    "default_cache_dir",
    "download",
    "exists",
    "fingerprint",
    "inventory",
    "is_s3",
    "list_dirs",
    "list_files",
    "listing_problems",
    "local_path",
    "manifest_bytes",
    "open_input",
    "parse_manifest",
    "publish_file",
    "put_file",
    "read_bytes",
    "read_manifest",
    "remove_tree",
    "s3_client",
    "sha256_of",
    "sizes",
    "split_s3",
    "upload_dir",
    "write_bytes",
]
