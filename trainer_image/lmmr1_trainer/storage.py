"""Object storage behind one small interface: S3 (boto3, multipart, parallel) or a local
directory (tests, `pvc://` volumes, the demo).

Keys are `/`-separated and relative to the storage's root (`s3://bucket/prefix` or a
directory). Checkpoints, datasets and model downloads all go through `open_storage(uri)`.
S3's endpoint and region come from the stage config (`S3Settings`), credentials from the
environment (AWS_ACCESS_KEY_ID/...) or the pod identity, as boto3 finds them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from lmmr1_trainer.config import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, S3Settings

_MULTIPART_THRESHOLD = 64 * 1024 * 1024
# An S3 endpoint that cannot be reached at all (restarting, failing over, a network blip)
# is waited out for this long before a call fails. boto3's own retries span a few seconds
# at most, and a stage that fails on a short outage is restarted and counted against the
# run's backoffLimit. Errors the server answers with are not retried here.
OUTAGE_ENV = "LMMR1_S3_OUTAGE_SECONDS"
DEFAULT_OUTAGE_S = 120.0
_OUTAGE_MAX_WAIT_S = 10.0
log = logging.getLogger("lmmr1.storage")
T = TypeVar("T")
_PARALLEL_FILES = 8


class StorageError(RuntimeError):
    """An object is missing or storage cannot be reached; the message names the URI."""


class ObjectNotFound(StorageError):
    """The storage answered, and the object is not there (S3 404 / NoSuchKey, no file)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    version: str = ""  # S3: the ETag; local files: the modification time (ns)


class Storage(Protocol):
    uri: str

    def put_file(self, key: str, path: Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def delete(self, keys: Iterable[str]) -> None: ...


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LocalStorage:
    """A directory; writes go through a temporary name so a reader never sees half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        shutil.copyfile(path, tmp)
        tmp.replace(target)

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(target)

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such file")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)

    def get_bytes(self, key: str) -> bytes:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.uri}/{key}: no such file")
        return source.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            (
                ObjectInfo(
                    str(p.relative_to(self.root)).replace(os.sep, "/"),
                    p.stat().st_size,
                    str(p.stat().st_mtime_ns),
                )
                for p in base.rglob("*")
                if p.is_file() and not p.name.endswith(".partial")
            ),
            key=lambda info: info.key,
        )

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            for parent in path.parents:  # drop directories left empty, up to the root
                if parent == self.root or not parent.is_relative_to(self.root):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break


class S3Storage:
    """`s3://bucket/prefix` through boto3: multipart uploads and downloads above 64 MiB,
    several parts in parallel."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._transfer = TransferConfig(
            multipart_threshold=_MULTIPART_THRESHOLD,
            multipart_chunksize=_MULTIPART_THRESHOLD,
            max_concurrency=8,
        )

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _fail(self, key: str, err: Exception) -> StorageError:
        kind = ObjectNotFound if _not_found(err) else StorageError
        return kind(f"{self.uri}/{key}: {err}")

    def _call(self, key: str, operation: Callable[[], T]) -> T:
        """Run one S3 operation (idempotent: a put, get, list or delete), waiting out an
        endpoint that cannot be reached for up to LMMR1_S3_OUTAGE_SECONDS (default 120)."""
        budget = float(os.environ.get(OUTAGE_ENV) or DEFAULT_OUTAGE_S)
        deadline = time.monotonic() + budget
        wait = 1.0
        while True:
            try:
                return operation()
            except Exception as err:
                if not _unreachable(err) or time.monotonic() + wait > deadline:
                    raise self._fail(key, err) from err
                log.warning(
                    "%s/%s: S3 unreachable (%s); retrying in %.0fs", self.uri, key, err, wait
                )
                time.sleep(wait)
                wait = min(wait * 2, _OUTAGE_MAX_WAIT_S)

    def put_file(self, key: str, path: Path) -> None:
        self._call(
            key,
            lambda: self.client.upload_file(
                str(path), self.bucket, self._key(key), Config=self._transfer
            ),
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            key,
            lambda: self.client.download_file(
                self.bucket, self._key(key), str(path), Config=self._transfer
            ),
        )

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            data: bytes = body.read()
            return data

        return self._call(key, read)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as err:
                if _not_found(err):
                    return False
                raise
            return True

        return self._call(key, head)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix)
        if full and (not prefix or prefix.endswith("/")):
            full += "/"  # a "directory": never match `step-10` when asked for `step-1/`
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listed() -> list[ObjectInfo]:  # from the start again after an outage
            found: list[ObjectInfo] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj.get("ETag", ""))
                    )
            return found

        return sorted(self._call(prefix, listed), key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        batch = [{"Key": self._key(k)} for k in keys]
        for start in range(0, len(batch), 1000):
            chunk = batch[start : start + 1000]
            self._call(
                chunk[0]["Key"],
                lambda chunk=chunk: self.client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": chunk}
                ),
            )


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err` and what caused it, a few links deep (s3transfer wraps what botocore raised)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _not_found(err: BaseException) -> bool:
    """S3 answered that the object does not exist (a 404 on the key; a missing bucket is a
    configuration error, reported as one)."""
    from botocore.exceptions import ClientError

    answer = next((e for e in _chain(err) if isinstance(e, ClientError)), None)
    return answer is not None and answer.response.get("Error", {}).get("Code") in (
        "404",
        "NoSuchKey",
        "NotFound",
    )


def _unreachable(err: BaseException) -> bool:
    """The endpoint could not be reached or dropped the connection (no answer from S3)."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    kinds = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)
    return any(isinstance(e, kinds) for e in _chain(err))


def s3_client(settings: S3Settings | None = None) -> Any:
    """A client whose credentials are resolved now (environment, then the pod identity).

    Each client gets a session of its own: `boto3.client` shares one default session per
    process, which resolves credentials once and keeps them, so every later client would
    sign with whatever keys the environment had at the first call."""
    import boto3
    from botocore.config import Config

    settings = settings or S3Settings()
    endpoint = settings.endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=settings.region or os.environ.get("AWS_DEFAULT_REGION") or None,
        config=Config(
            # S3-compatible servers (MinIO, Ceph, the test bed) want path-style addressing.
            s3={"addressing_style": "path"} if endpoint else {},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
        ),
    )


def local_path(uri: str) -> Path:
    """The local path of a `file://`, `pvc://claim/path` or plain path URI."""
    parts = urlsplit(uri)
    if parts.scheme == "pvc":
        root = Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))
        return root / parts.netloc / parts.path.lstrip("/")
    if parts.scheme == "file":
        return Path(parts.netloc + parts.path) if parts.netloc else Path(parts.path)
    if parts.scheme:
        raise StorageError(f"{uri}: not a local URI (file://, pvc:// or a path)")
    return Path(uri)


def open_storage(uri: str, settings: S3Settings | None = None) -> Storage:
    """Storage rooted at `uri`: `s3://bucket/prefix`, `file://…`, `pvc://claim/path` or a path."""
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return S3Storage(parts.netloc, parts.path, s3_client(settings))
    return LocalStorage(local_path(uri))


def upload_tree(storage: Storage, local_dir: Path, prefix: str) -> list[tuple[str, int, str]]:
    """Upload every file under `local_dir` to `prefix/…` in parallel; returns
    (relative path, size, sha256) for each, sorted."""
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())

    def one(path: Path) -> tuple[str, int, str]:
        relative = str(path.relative_to(local_dir)).replace(os.sep, "/")
        digest = sha256_file(path)
        storage.put_file(join_key(prefix, relative), path)
        return relative, path.stat().st_size, digest

    with ThreadPoolExecutor(max_workers=_PARALLEL_FILES) as pool:
        return sorted(pool.map(one, files))


def download_tree(
    storage: Storage, prefix: str, local_dir: Path, exclude: tuple[str, ...] = ()
) -> list[Path]:
    """Download every object under `prefix/` into `local_dir` (in parallel), leaving out
    relative paths that start with one of `exclude`."""
    return download_objects(storage, list_tree(storage, prefix, exclude), prefix, local_dir)


def list_tree(storage: Storage, prefix: str, exclude: tuple[str, ...] = ()) -> list[ObjectInfo]:
    """Every object under `prefix/`, less relative paths that start with one of `exclude`."""
    strip = len(join_key(prefix)) + 1 if prefix else 0
    return [
        info
        for info in storage.list(join_key(prefix) + "/" if prefix else "")
        if not (exclude and info.key[strip:].startswith(exclude))
    ]


def download_objects(
    storage: Storage, objects: list[ObjectInfo], prefix: str, local_dir: Path
) -> list[Path]:
    """Download `objects` (listed under `prefix/`) into `local_dir`, in parallel."""
    strip = len(join_key(prefix)) + 1 if prefix else 0

    def one(info: ObjectInfo) -> Path:
        target = local_dir / info.key[strip:]
        storage.get_file(info.key, target)
        return target

    with ThreadPoolExecutor(max_workers=_PARALLEL_FILES) as pool:
        return list(pool.map(one, objects))
