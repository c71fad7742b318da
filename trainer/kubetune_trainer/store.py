"""Object storage behind one small API: S3 (boto3) or a local directory.

Keys are always relative to a store and use "/" separators. `list`, `delete_prefix` and
`download_dir` treat their argument as a folder: `list("checkpoints")` returns keys relative to
`checkpoints/` and never matches `checkpoints-old/`.

Errors are mapped onto three classes so callers can decide what to do:

* `StoreNotFound`       the key does not exist (permanent for that key)
* `StorageUnavailable`  endpoint unreachable, 5xx or throttled after botocore's retries (retryable)
* `StoreError`          everything else (access denied, missing bucket, bad credentials)
"""

from __future__ import annotations

import abc
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
_TMP_PREFIX = ".kubetune-tmp-"


class StoreError(RuntimeError):
    """A storage operation failed for a reason retrying will not fix."""


class StoreNotFound(StoreError):
    """The key or object does not exist."""


class StorageUnavailable(StoreError):
    """The storage endpoint is unreachable, failing (5xx) or throttling, after retries."""


def _clean_rel(rel: str) -> str:
    """Normalise a relative key; refuse anything that could escape the store's root."""
    rel = rel.replace("\\", "/").strip("/")
    if not rel:
        return ""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise StoreError(f"key {rel!r} must not contain '..'")
    return "/".join(parts)


def _join(a: str, b: str) -> str:
    return "/".join(p for p in (a, b) if p)


def _local_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(path, relative posix key) for every regular file under root, sorted by key like S3."""
    found = [
        (path, path.relative_to(root).as_posix())
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith(_TMP_PREFIX)
    ]
    yield from sorted(found, key=lambda item: item[1])


class Store(abc.ABC):
    """A place to read and write objects. See LocalStore and S3Store."""

    uri: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @abc.abstractmethod
    def child(self, rel: str) -> Store:
        """A store rooted at uri/rel."""

    @abc.abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The object's content; StoreNotFound when it does not exist."""

    @abc.abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write an object atomically: readers see the old or the new content, never a part."""

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StoreError(f"{self.uri}/{_clean_rel(rel)}: not valid JSON: {err}") from None

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    @abc.abstractmethod
    def exists(self, rel: str) -> bool:
        """Whether an object exists at exactly this key (folders do not count)."""

    @abc.abstractmethod
    def list(self, rel_prefix: str = "") -> list[str]:
        """Every key under the folder rel_prefix, relative to it, recursive and sorted."""

    @abc.abstractmethod
    def upload_dir(self, local_dir: Path, rel: str) -> int:
        """Copy every file under local_dir to rel/...; returns the bytes uploaded."""

    @abc.abstractmethod
    def download_dir(self, rel: str, local_dir: Path) -> Path:
        """Copy every object under the folder rel into local_dir; StoreNotFound when empty."""

    @abc.abstractmethod
    def download_file(self, rel: str, local_path: Path) -> Path:
        """Copy one object to local_path; StoreNotFound when it does not exist."""

    @abc.abstractmethod
    def delete_prefix(self, rel: str) -> int:
        """Delete the object rel and everything under the folder rel; returns how many."""

    def local_path(self) -> Path | None:
        """The root directory when the store is local, else None."""
        return None


# -- local --------------------------------------------------------------------------------------


class LocalStore(Store):
    """A directory on a local (or mounted) filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, rel: str) -> Path:
        rel = _clean_rel(rel)
        return self.root / rel if rel else self.root

    def child(self, rel: str) -> LocalStore:
        return LocalStore(self._path(rel))

    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise StoreNotFound(f"{path}: no such file") from None
        except OSError as err:
            raise StoreError(f"{path}: cannot read: {err.strerror or err}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._atomic_write(path, lambda f: f.write(data))
        except OSError as err:
            raise StoreError(f"{path}: cannot write: {err.strerror or err}") from None

    @staticmethod
    def _atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
        # Temp file in the same directory, so os.replace is a rename on one filesystem.
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            # mkstemp creates 0600; other readers of a shared volume (operator, server) need 0644.
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def list(self, rel_prefix: str = "") -> list[str]:
        base = self._path(rel_prefix)
        if not base.is_dir():
            return []
        return [key for _, key in _local_files(base)]

    def upload_dir(self, local_dir: Path, rel: str) -> int:
        src = Path(local_dir).resolve()
        if not src.is_dir():
            raise StoreError(f"upload_dir: {src} is not a directory")
        dest = self._path(rel)
        total = 0
        try:
            for path, key in _local_files(src):
                size = path.stat().st_size
                total += size
                target = dest / key
                if target.resolve() == path:
                    continue  # already in place (the run writes straight into a local store)
                target.parent.mkdir(parents=True, exist_ok=True)
                with path.open("rb") as fin:
                    self._atomic_write(target, _copier(fin))
        except OSError as err:
            raise StoreError(f"upload {src} -> {dest}: {err}") from None
        return total

    def download_dir(self, rel: str, local_dir: Path) -> Path:
        src = self._path(rel)
        files = list(_local_files(src)) if src.is_dir() else []
        if not files:
            raise StoreNotFound(f"{src}: no such directory, or it is empty")
        local_dir = Path(local_dir)
        try:
            for path, key in files:
                target = local_dir / key
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        except OSError as err:
            raise StoreError(f"download {src} -> {local_dir}: {err}") from None
        return local_dir

    def download_file(self, rel: str, local_path: Path) -> Path:
        src = self._path(rel)
        if not src.is_file():
            raise StoreNotFound(f"{src}: no such file")
        local_path = Path(local_path)
        try:
            local_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, local_path)
        except OSError as err:
            raise StoreError(f"download {src} -> {local_path}: {err}") from None
        return local_path

    def delete_prefix(self, rel: str) -> int:
        path = self._path(rel)
        try:
            if path.is_file():
                path.unlink()
                return 1
            if not path.is_dir():
                return 0
            count = sum(1 for p in path.rglob("*") if p.is_file())
            if path == self.root:
                for entry in path.iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            else:
                shutil.rmtree(path)
            return count
        except OSError as err:
            raise StoreError(f"{path}: cannot delete: {err}") from None

    def local_path(self) -> Path | None:
        return self.root


def _copier(src: BinaryIO) -> Callable[[BinaryIO], object]:
    def copy(dst: BinaryIO) -> None:
        shutil.copyfileobj(src, dst, MiB)

    return copy


# -- S3 -----------------------------------------------------------------------------------------

# Error codes that mean "the service is struggling": retrying later can succeed.
_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "503",
        "500",
        "502",
        "504",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


def _map_boto_error(err: BaseException, bucket: str, key: str) -> StoreError | None:
    """The StoreError for a botocore/s3transfer exception; None if it is not one of theirs."""
    from botocore import exceptions as bx

    where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if isinstance(err, bx.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "")) or code
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return StoreError(f"{where}: bucket {bucket!r} does not exist")
        if code in _NOT_FOUND_CODES or status == 404:
            return StoreNotFound(f"{where}: no such object")
        if code in _UNAVAILABLE_CODES or status >= 500:
            return StorageUnavailable(f"{where}: storage unavailable ({code}: {message})")
        if code in {"AccessDenied", "403", "Forbidden"} or status == 403:
            return StoreError(
                f"{where}: access denied (bucket {bucket!r}); check the credentials and the "
                "bucket policy"
            )
        if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            return StoreError(f"{where}: the S3 credentials were rejected ({code})")
        return StoreError(f"{where}: {code}: {message}")
    if isinstance(err, bx.NoCredentialsError | bx.PartialCredentialsError):
        return StoreError(
            f"{where}: no usable S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or another source of the default credential chain)"
        )
    if isinstance(
        err, bx.ConnectionError | bx.HTTPClientError | bx.IncompleteReadError | bx.ChecksumError
    ):
        return StorageUnavailable(f"{where}: storage endpoint unavailable: {err}")
    try:
        from s3transfer import exceptions as sx

        if isinstance(err, sx.RetriesExceededError):
            return StorageUnavailable(f"{where}: storage endpoint unavailable: {err}")
    except ImportError:  # pragma: no cover - s3transfer ships with boto3
        pass
    if isinstance(err, bx.BotoCoreError):
        return StoreError(f"{where}: {err}")
    return None


class S3Store(Store):
    """Objects under s3://bucket/prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: Any,
        *,
        transfer_config: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = _clean_rel(prefix)
        self.client = client
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._transfer_config = transfer_config

    # -- helpers ------------------------------------------------------------------------------
    def _key(self, rel: str) -> str:
        return _join(self.prefix, _clean_rel(rel))

    def _folder(self, rel: str) -> str:
        key = self._key(rel)
        return f"{key}/" if key else ""

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as err:
            mapped = _map_boto_error(err, self.bucket, key)
            if mapped is None:
                raise
            raise mapped from err

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig, create_transfer_manager

        config = self._transfer_config or TransferConfig(
            multipart_threshold=8 * MiB,
            multipart_chunksize=8 * MiB,
            max_concurrency=4,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        return create_transfer_manager(self.client, config)

    def _wait_all(self, futures: list[tuple[str, Future[Any]]]) -> None:
        """Wait for every transfer, then raise the first failure (mapped)."""
        failed: tuple[str, Exception] | None = None
        for key, fut in futures:
            try:
                fut.result()
            except Exception as err:
                failed = failed or (key, err)
        if failed is not None:
            with self._errors(failed[0]):
                raise failed[1]

    def _iter_keys(self, folder: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(folder):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=folder):
                for obj in page.get("Contents", []):
                    yield str(obj["Key"]), int(obj.get("Size", 0))

    # -- API ----------------------------------------------------------------------------------
    def child(self, rel: str) -> S3Store:
        return S3Store(
            self.bucket, self._key(rel), self.client, transfer_config=self._transfer_config
        )

    def read_bytes(self, rel: str) -> bytes:
        key = self._key(rel)
        with self._errors(key):
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = resp["Body"].read()
            return data

    def write_bytes(self, rel: str, data: bytes) -> None:
        key = self._key(rel)
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def exists(self, rel: str) -> bool:
        key = self._key(rel)
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=key)
        except StoreNotFound:
            return False
        return True

    def list(self, rel_prefix: str = "") -> list[str]:
        folder = self._folder(rel_prefix)
        keys = [k[len(folder) :] for k, _ in self._iter_keys(folder)]
        return sorted(k for k in keys if k and not k.endswith("/"))

    def upload_dir(self, local_dir: Path, rel: str) -> int:
        src = Path(local_dir)
        if not src.is_dir():
            raise StoreError(f"upload_dir: {src} is not a directory")
        files = list(_local_files(src))
        total = sum(p.stat().st_size for p, _ in files)
        # One transfer manager: files go in parallel and big ones in 8 MiB parts, 4 threads.
        with self._transfer() as manager:
            futures = [
                (key, manager.upload(str(path), self.bucket, _join(self._key(rel), key)))
                for path, key in files
            ]
            self._wait_all(futures)
        return total

    def download_dir(self, rel: str, local_dir: Path) -> Path:
        folder = self._folder(rel)
        keys = [k for k, _ in self._iter_keys(folder) if not k.endswith("/")]
        if not keys:
            raise StoreNotFound(f"s3://{self.bucket}/{folder}: no objects under this prefix")
        local_dir = Path(local_dir)
        with self._transfer() as manager:
            futures = []
            for key in keys:
                relkey = _clean_rel(key[len(folder) :])  # refuses '..' in hostile keys
                target = local_dir / PurePosixPath(relkey)
                target.parent.mkdir(parents=True, exist_ok=True)
                futures.append((key, manager.download(self.bucket, key, str(target))))
            self._wait_all(futures)
        return local_dir

    def download_file(self, rel: str, local_path: Path) -> Path:
        key = self._key(rel)
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        with self._transfer() as manager:
            self._wait_all([(key, manager.download(self.bucket, key, str(local_path)))])
        return local_path

    def delete_prefix(self, rel: str) -> int:
        key = self._key(rel)
        keys = [k for k, _ in self._iter_keys(self._folder(rel))]
        if key and self.exists(rel):
            keys.append(key)
        deleted = 0
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[start : start + 1000]
            with self._errors(batch[0]):
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise StoreError(
                    f"s3://{self.bucket}/{first.get('Key')}: delete failed: "
                    f"{first.get('Code')}: {first.get('Message')} ({len(errors)} failures)"
                )
            deleted += len(batch)
        return deleted


# -- opening ------------------------------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix."""
    if not uri.startswith("s3://"):
        raise StoreError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise StoreError(f"{uri!r}: no bucket name")
    return bucket, _clean_rel(prefix)


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The endpoint argument, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else None (AWS)."""
    return (
        endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def ride_out_outage(fn: Callable[[], T], what: str, tolerance: float = 300.0) -> T:
    """Run `fn`, retrying StorageUnavailable with back-off for up to `tolerance` seconds.

    botocore's own retries cover a few seconds; a store that is down for half a minute must not
    end a run that has hours of progress in it. Other errors are raised at once."""
    deadline = time.monotonic() + tolerance
    delay = 1.0
    while True:
        try:
            return fn()
        except StorageUnavailable as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s; retrying in %.0fs", what, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 15.0)


def make_s3_client(
    endpoint: str | None = None,
    region: str = "us-east-1",
    *,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
) -> Any:
    """A boto3 S3 client with bounded retries and timeouts (credentials: the default chain)."""
    import boto3
    from botocore.config import Config

    url = s3_endpoint(endpoint)
    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # S3-compatible stores (MinIO, moto, Ceph) rarely support virtual-hosted buckets.
        s3={"addressing_style": "path"} if url else {},
        max_pool_connections=16,
    )
    # A fresh session per client: boto3's default session is not thread-safe to create.
    return boto3.session.Session().client("s3", endpoint_url=url, config=config)


def open_store(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str = "us-east-1",
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
) -> Store:
    """A Store for s3://bucket/prefix, file:///path or a plain path (relative: against cwd)."""
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        client = make_s3_client(
            endpoint,
            region,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        return S3Store(bucket, prefix, client)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise StoreError(f"{uri!r}: scheme {scheme!r} is not supported; use s3:// or a path")
    path = uri.removeprefix("file://")
    if not path:
        raise StoreError("empty store URI")
    return LocalStore(Path(path))


def download_tree(uri: str, dest: Path, *, endpoint: str | None = None) -> Path:
    """Copy everything under uri into dest, replacing dest only once the copy is complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dest.parent))
    try:
        open_store(uri, endpoint=endpoint).download_dir("", staging)
        # A half-finished download must never look like a cached model.
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
