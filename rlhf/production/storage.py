"""Run directories and checkpoints on a storage URI: a local path, `file://`, `s3://` or `gs://`.

On a multi-node cluster the learner rank that writes a checkpoint and the driver that resumes from it
may sit on different nodes; an object store is the place both reach. This module holds the few
operations the checkpoint code needs, over `pyarrow.fs`:

* writes retry with exponential back-off (a few attempts) unless the failure is permanent (a missing
  bucket, access denied); what still fails is a `StorageError`, one line naming the URI and the
  operation;
* an object store has no rename, so a checkpoint is never moved into place: its objects are written
  where they belong and the checkpoint is published by the small objects written last (`driver.json`,
  then `latest.json`; each a single PUT, which an object store shows whole or not at all);
* learner ranks write locally (`staged`) and upload their own files; a rank that loads downloads its
  copy (`local_copy`). A local path is used in place: no copy.

S3 endpoints (MinIO, Ceph, a test server): `logging.storage_endpoint`, else `AWS_ENDPOINT_URL_S3`,
else `AWS_ENDPOINT_URL`. Credentials come from the usual AWS / Google Cloud environment variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rlhf.config.uris import is_remote, local_path  # noqa: F401 (part of this module's interface)

logger = logging.getLogger(__name__)

ATTEMPTS = 3
BACKOFF_S = 0.5
# Failures a retry cannot mend: no bucket, no permission, credentials the server does not know.
_PERMANENT = (
    "NO_SUCH_BUCKET",
    "NoSuchBucket",
    "ACCESS_DENIED",
    "AccessDenied",
    "Forbidden",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch",
)
_endpoint: str | None = None
_filesystems: dict[tuple, Any] = {}


class StorageError(OSError):
    """A storage operation that failed for good: `op` on `uri`, after its retries."""

    def __init__(self, op: str, uri: str, cause: BaseException | str):
        self.op, self.uri = op, uri
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"storage: {op} {uri} failed: {reason}")

    def __reduce__(self):  # survives pickling through Ray
        return (StorageError, (self.op, self.uri, self.args[0].split(" failed: ", 1)[-1]))


def set_endpoint(url: str | None) -> None:
    """The S3 endpoint for this process (`logging.storage_endpoint`); None: the environment's."""
    global _endpoint
    _endpoint = url or None


def join(uri: str | os.PathLike, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(uri: str | os.PathLike) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str | os.PathLike) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[0]


def _s3(endpoint: str | None):
    from pyarrow import fs

    key = ("s3", endpoint)
    if key not in _filesystems:
        options: dict[str, Any] = {
            "connect_timeout": 5,
            "request_timeout": 60,
            # The retries are ours (with_retries): one attempt each, so a failure reaches us quickly.
            "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1),
        }
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        _filesystems[key] = fs.S3FileSystem(**options)
    return _filesystems[key]


def resolve(uri: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) of a URI or local path."""
    from pyarrow import fs

    text = str(uri)
    if not is_remote(text):
        return fs.LocalFileSystem(), str(local_path(text).absolute())
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        endpoint = _endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return _s3(endpoint), (parsed.netloc + parsed.path).rstrip("/")
    try:
        return fs.FileSystem.from_uri(text)
    except Exception as exc:  # noqa: BLE001 - an unknown scheme or missing credentials: one line
        raise StorageError("open", text, exc) from exc


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError | PermissionError) or any(s in str(exc) for s in _PERMANENT)


def with_retries(op: str, uri: str, fn: Callable[[], Any], attempts: int = ATTEMPTS) -> Any:
    """`fn()`, retried with exponential back-off on transient failures; else one StorageError line."""
    for attempt in range(attempts):
        try:
            return fn()
        except StorageError:
            raise
        except FileNotFoundError as exc:
            if op == "read":
                raise  # no such object: the caller asks whether it exists
            raise StorageError(op, uri, exc) from exc
        except OSError as exc:
            if attempt == attempts - 1 or _permanent(exc):
                raise StorageError(op, uri, exc) from exc
            wait = BACKOFF_S * 2**attempt
            logger.warning("storage: %s %s failed (%s); retrying in %.1fs", op, uri, exc, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------- objects
def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Written whole or not at all: locally a temporary file renamed over the target, on an object
    store one PUT (the object appears only when complete)."""
    uri = str(uri)
    if not is_remote(uri):
        path = local_path(uri)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk or no permission: one line too
            raise StorageError("write", uri, exc) from exc
        return
    filesystem, path = resolve(uri)

    def put() -> None:
        with filesystem.open_output_stream(path) as out:
            out.write(data)

    with_retries("write", uri, put)


def write_json(uri: str | os.PathLike, payload: Any, **dumps: Any) -> None:
    write_bytes(uri, json.dumps(payload, **dumps).encode())


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The object's bytes; FileNotFoundError when there is none."""
    uri = str(uri)
    if not is_remote(uri):
        return local_path(uri).read_bytes()
    filesystem, path = resolve(uri)

    def get() -> bytes:
        with filesystem.open_input_stream(path) as f:
            return f.read()

    return with_retries("read", uri, get)


def read_json(uri: str | os.PathLike) -> Any:
    return json.loads(read_bytes(uri))


def exists(uri: str | os.PathLike) -> bool:
    from pyarrow import fs

    filesystem, path = resolve(uri)
    info = with_retries("stat", str(uri), lambda: filesystem.get_file_info(path))
    return info.type != fs.FileType.NotFound


def is_file(uri: str | os.PathLike) -> bool:
    from pyarrow import fs

    filesystem, path = resolve(uri)
    return with_retries("stat", str(uri), lambda: filesystem.get_file_info(path)).type == fs.FileType.File


def list_names(uri: str | os.PathLike) -> list[str]:
    """Names directly under `uri` (files and directories), sorted; [] when there is nothing."""
    from pyarrow import fs

    filesystem, path = resolve(uri)
    selector = fs.FileSelector(path, allow_not_found=True)
    infos = with_retries("list", str(uri), lambda: filesystem.get_file_info(selector))
    return sorted(i.base_name for i in infos)


def list_files(uri: str | os.PathLike) -> list[str]:
    """Paths (relative to `uri`, '/'-separated) of every file under `uri`."""
    from pyarrow import fs

    filesystem, path = resolve(uri)
    selector = fs.FileSelector(path, allow_not_found=True, recursive=True)
    infos = with_retries("list", str(uri), lambda: filesystem.get_file_info(selector))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base) :] for i in infos if i.type == fs.FileType.File)


def delete(uri: str | os.PathLike) -> None:
    """Remove a file or everything under a prefix; nothing there is not an error."""
    from pyarrow import fs

    filesystem, path = resolve(uri)

    def remove() -> None:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(path)
        elif info.type == fs.FileType.File:
            filesystem.delete_file(path)

    with_retries("delete", str(uri), remove)


# ---------------------------------------------------------------------------------------- directories
def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike, threads: int = 8) -> None:
    """Copy every file under `local_dir` to `uri` (each file retried on its own)."""
    local_dir = Path(local_dir)
    files = [p for p in sorted(local_dir.rglob("*")) if p.is_file()]
    filesystem, base = resolve(uri)

    def put(src: Path) -> None:
        rel = src.relative_to(local_dir).as_posix()
        target = join(uri, rel)

        def copy() -> None:
            if not is_remote(uri):
                Path(base, rel).parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_output_stream(f"{base}/{rel}") as out, open(src, "rb") as f:
                shutil.copyfileobj(f, out, 8 << 20)

        with_retries("upload", target, copy)

    _each(put, files, threads)


def download(
    uri: str | os.PathLike,
    local_dir: str | os.PathLike,
    keep: Callable[[str], bool] | None = None,
    threads: int = 8,
) -> list[str]:
    """Copy the files under `uri` (those whose relative path `keep` accepts) into `local_dir`;
    returns their relative paths."""
    local_dir = Path(local_dir)
    rels = [r for r in list_files(uri) if keep is None or keep(r)]
    filesystem, base = resolve(uri)

    def get(rel: str) -> None:
        dst = local_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)

        def copy() -> None:
            with filesystem.open_input_stream(f"{base}/{rel}") as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)

        with_retries("download", join(uri, rel), copy)

    _each(get, rels, threads)
    return rels


def _each(fn: Callable[[Any], None], items: list, threads: int) -> None:
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()  # the first failure, as raised


def staging_root() -> Path:
    from rlhf.data.models import cache_root

    root = Path(cache_root()) / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def staged(uri: str | os.PathLike, label: str = "write") -> Iterator[Path]:
    """A local directory to write `uri`'s files into: `uri` itself when local, else a temporary
    directory uploaded to `uri` when the block succeeds (and removed either way)."""
    if not is_remote(uri):
        path = local_path(uri)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=staging_root()))
    try:
        yield tmp
        upload_dir(tmp, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_copy(
    uri: str | os.PathLike, keep: Callable[[str], bool] | None = None, label: str = "read"
) -> Iterator[Path]:
    """`uri` as a local directory for the block: itself when local, else a temporary download."""
    if not is_remote(uri):
        yield local_path(uri)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=staging_root()))
    try:
        download(uri, tmp, keep)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def storage_failure(exc: BaseException | None) -> StorageError | None:
    """The StorageError behind `exc` (raised here, or by a learner rank through Ray), else None."""
    for _ in range(10):
        if exc is None:
            return None
        # GroupCallError and Ray's RayTaskError keep the original exception in `cause` (a RayTaskError
        # may itself pass for a StorageError, with the whole remote traceback as its message).
        inner = getattr(exc, "cause", None)
        if isinstance(inner, BaseException):
            exc = inner
        elif isinstance(exc, StorageError):
            return exc
        else:
            exc = exc.__cause__
    return None
