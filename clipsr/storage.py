"""URIs -> filesystems, listing, whole-object reads and writes, retries.

The only module that knows about filesystems and credentials. A URI is a local path, file://...,
s3://bucket/prefix (credentials, region and endpoint from the standard AWS environment variables,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL included) or any other fsspec protocol.

Keys: a listing yields keys relative to the listed root exactly as stored. They are not
validated there, so that a job can record an unsafe key (`..`, absolute, ...) as a failed row
instead of losing it: call `safe_relative_key` before reading or writing anything derived from one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import posixpath
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from clipsr.imaging import IMAGE_EXTENSIONS, is_image_path

if TYPE_CHECKING:
    import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Variables that select credentials or region: a change to any of them needs a new S3 client.
_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
           "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_LOCAL_PROTOCOLS = ("", "file")


class UnsafeKeyError(ValueError):
    """A key that must never be read or written (it could escape its prefix or is malformed)."""


class NoImagesError(FileNotFoundError):
    """The folder or prefix holds no image files."""


class ConditionalWritesIgnoredError(ValueError):
    """The store accepts conditional writes but does not enforce them (see probe_conditional_writes)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listing entry: enough to decide from the listing alone whether an input changed."""

    uri: str  # full URI: the listed root joined with key
    key: str  # relative to the listed root, as stored (not validated)
    size: int
    etag: str | None  # S3 ETag without quotes; None on local disks
    mtime: float | None  # seconds since the epoch


# --- URIs and keys ---------------------------------------------------------------------------


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.lower().startswith("file://") else uri


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from the environment; the S3-specific variable wins, as in the AWS SDKs."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path within it.

    S3 filesystems are cached per process, endpoint and credential environment (the cache key holds
    a digest of the credential variables, never their values). Their listings cache is off: a
    long job writes while it lists, and a stale listing would hide its own outputs.
    """
    protocol = _protocol(uri)
    if protocol in _LOCAL_PROTOCOLS:
        return LocalFileSystem(), os.path.abspath(_local_path(uri))
    if protocol in ("s3", "s3a"):
        fs = _s3_filesystem(s3_endpoint_url(), _env_digest(), os.getpid())
        return fs, fs._strip_protocol(uri)
    return fsspec.url_to_fs(uri)


def _env_digest() -> str:
    joined = "\0".join(os.environ.get(name, "") for name in _S3_ENV)
    return hashlib.sha256(joined.encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, env_digest: str, pid: int) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs = {}
    if endpoint_url:  # s3fs does not read AWS_ENDPOINT_URL itself
        client_kwargs["endpoint_url"] = endpoint_url
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True, use_listings_cache=False)


def is_local(uri: str) -> bool:
    """A path or file:// URI on this machine's disks."""
    return _protocol(uri) in _LOCAL_PROTOCOLS


def absolute(uri: str) -> str:
    """Local paths made absolute (workers do not share the driver's working directory)."""
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        return os.path.abspath(_local_path(uri))
    return uri


def pyarrow_filesystem(uri: str) -> tuple["pafs.FileSystem", str]:
    """A pyarrow filesystem and path for ``uri``, for libraries that take one (Ray Train storage).

    A bare ``pyarrow.fs.S3FileSystem()`` ignores AWS_ENDPOINT_URL, so the endpoint is passed
    explicitly; credentials come from the standard AWS environment, as everywhere else.
    """
    import pyarrow.fs as pafs

    proto = _protocol(uri)
    if proto in _LOCAL_PROTOCOLS:
        return pafs.LocalFileSystem(), os.path.abspath(_local_path(uri))
    if proto in ("s3", "s3a"):
        endpoint = s3_endpoint_url()
        kwargs: dict = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri.split("://", 1)[1].rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def safe_relative_key(rel: str) -> str:
    """Return rel unchanged if it is a plain relative key, else raise UnsafeKeyError.

    Refused: empty, absolute, backslashes, control characters (NUL included), and empty, '.' or
    '..' segments. S3 allows all of these in keys; joined to an output prefix they could escape it
    or name a different object than the one listed.
    """
    if not rel:
        raise UnsafeKeyError("empty key")
    if rel.startswith("/"):
        raise UnsafeKeyError(f"absolute key: {rel!r}")
    if "\\" in rel:
        raise UnsafeKeyError(f"backslash in key: {rel!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rel):
        raise UnsafeKeyError(f"control character in key: {rel!r}")
    for segment in rel.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeKeyError(f"{'empty' if not segment else repr(segment)} path segment in key: {rel!r}")
    return rel


def _child(uri: str, rel: str) -> str:
    return uri + rel if uri.endswith("/") else f"{uri}/{rel}"


def join(uri: str, relative: str) -> str:
    """uri + '/' + relative, after checking that relative is a safe key."""
    return _child(uri, safe_relative_key(relative))


def relative_key(root_uri: str, full_uri: str) -> str:
    """The key of full_uri below root_uri (both as listed/joined here), not validated."""
    prefix = root_uri if root_uri.endswith("/") else root_uri + "/"
    if not full_uri.startswith(prefix) or len(full_uri) == len(prefix):
        raise ValueError(f"{full_uri!r} is not below {root_uri!r}")
    return full_uri[len(prefix):]


def sort_key(rel: str) -> bytes:
    """METHOD.md's "sorted order": byte order of the UTF-8 relative key ('B.png' < 'a.png')."""
    return rel.encode("utf-8", "surrogateescape")


def is_image_key(rel: str) -> bool:
    """An image by extension and not hidden (no segment starting with '.').

    '.' and '..' segments do not count as hidden: such keys must reach validation and be reported.
    """
    hidden = any(s.startswith(".") and s not in (".", "..") for s in rel.split("/"))
    return not hidden and is_image_path(rel)


# --- listing ---------------------------------------------------------------------------------


def iter_objects(uri: str, recursive: bool = True, page_size: int = 1000) -> Iterator[ObjectInfo]:
    """Stream the objects below uri, in no particular order, without holding the whole listing.

    Local: os.scandir, directory by directory (symlinked folders are not followed, so no loops).
    S3: list_objects_v2 page by page (page_size keys a request, 1,000 at most); folder markers
    (keys ending in '/') are skipped. Other protocols: fs.walk, which holds one directory's
    listing at a time (an object store without folders is then listed in one go: a memory cost).
    """
    protocol = _protocol(uri)
    if protocol in _LOCAL_PROTOCOLS:
        yield from _iter_local(uri, recursive)
    elif protocol in ("s3", "s3a"):
        yield from _iter_s3(uri, recursive, page_size)
    else:
        yield from _iter_fsspec(uri, recursive)


def _iter_local(uri: str, recursive: bool) -> Iterator[ObjectInfo]:
    root = os.path.abspath(_local_path(uri))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"folder not found: {uri}")
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        with os.scandir(os.path.join(root, rel_dir)) as entries:
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            pending.append(rel)
                        continue
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except FileNotFoundError:  # removed while we listed
                    continue
                yield ObjectInfo(uri=_child(uri, rel), key=rel, size=st.st_size, etag=None, mtime=st.st_mtime)


def _iter_s3(uri: str, recursive: bool, page_size: int) -> Iterator[ObjectInfo]:
    fs, path = filesystem(uri)
    bucket, _, prefix = path.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    if not recursive:
        request["Delimiter"] = "/"
    while True:
        page = retry(functools.partial(fs.call_s3, "list_objects_v2", **request))
        for obj in page.get("Contents", ()):
            key = obj["Key"]
            if key.endswith("/"):
                continue
            rel = key[len(prefix):]
            etag = obj.get("ETag", "").strip('"') or None
            yield ObjectInfo(uri=_child(uri, rel), key=rel, size=int(obj["Size"]), etag=etag,
                             mtime=obj["LastModified"].timestamp())
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _iter_fsspec(uri: str, recursive: bool) -> Iterator[ObjectInfo]:
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"folder not found: {uri}")
    root = path.rstrip("/")
    for _, _, files in fs.walk(path, maxdepth=None if recursive else 1, detail=True):
        for info in files.values():
            rel = posixpath.relpath(info["name"], root)
            etag = info.get("ETag") or info.get("etag")
            mtime = info.get("mtime") or info.get("LastModified")
            yield ObjectInfo(uri=_child(uri, rel), key=rel, size=int(info.get("size") or 0),
                             etag=str(etag).strip('"') if etag else None,
                             mtime=mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def file_info(uri: str) -> ObjectInfo | None:
    """The object ``uri`` names, as a listing of its parent would give it (``key``: its name);
    None when ``uri`` is a folder, a prefix or nothing (a URI ending in '/' is always a prefix)."""
    if uri.endswith("/"):
        return None
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        path = _local_path(uri)
        if not os.path.isfile(path):
            return None
        st = os.stat(path)
        return ObjectInfo(uri=uri, key=os.path.basename(path), size=st.st_size, etag=None, mtime=st.st_mtime)
    fs, path = filesystem(uri)
    try:
        info = retry(lambda: fs.info(path))
    except FileNotFoundError:
        return None
    if info.get("type") != "file":
        return None
    etag = info.get("ETag") or info.get("etag")
    mtime = info.get("LastModified") or info.get("mtime")
    return ObjectInfo(uri=uri, key=posixpath.basename(path), size=int(info.get("size") or 0),
                      etag=str(etag).strip('"') if etag else None,
                      mtime=mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)


def list_images(uri: str, recursive: bool = True) -> list[str]:
    """Full URIs of the image files below uri, in sorted order (byte order of the relative key).

    Hidden files and folders are ignored, and so are other extensions. For evaluation-sized
    folders: this holds the whole list; a job over millions of keys uses iter_objects.
    """
    found = [(o.key, o.uri) for o in iter_objects(uri, recursive) if is_image_key(o.key)]
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise NoImagesError(f"no image files ({extensions}) in {uri}")
    found.sort(key=lambda item: sort_key(item[0]))
    return [full for _, full in found]


# --- reading and writing ---------------------------------------------------------------------


def read_bytes(uri: str) -> bytes:
    """The whole object, retrying transient errors."""
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        path = _local_path(uri)
        return retry(lambda: _read_local(path))
    fs, path = filesystem(uri)
    return retry(lambda: fs.cat_file(path))


def _read_local(path: str, start: int = 0, end: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read() if end is None else f.read(max(0, end - start))


def read_range(uri: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of an object, fewer where it ends sooner, none past its
    end: one ranged GET on S3, so a header or a bounded prefix costs no more than its size."""
    if start < 0 or end < start:
        raise ValueError(f"bad byte range [{start}, {end})")
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        path = _local_path(uri)
        return retry(lambda: _read_local(path, start, end))
    fs, path = filesystem(uri)

    def ranged() -> bytes:
        try:
            return fs.cat_file(path, start=start, end=end)
        except OSError as e:  # a range that starts at or past the end: S3 answers 416 InvalidRange
            if _s3_status(e)[0] == "InvalidRange" or _s3_status(e)[1] == 416:
                return b""
            raise

    return retry(ranged)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write the whole object or nothing under its final name.

    Local: a hidden temporary file in the same folder (fsynced), then os.replace, which is atomic
    on one filesystem; the temporary is removed on failure. S3: a PUT is atomic per object (readers
    see the old object or the new one), and s3fs's multipart upload for large data only becomes
    visible on completion; an aborted one leaves invisible, billed parts: give the bucket an
    AbortIncompleteMultipartUpload lifecycle rule. Other protocols: one upload, as atomic as that
    store's single uploads (GCS and Azure blob uploads are).
    """
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        _write_local_atomic(_local_path(uri), data)
        return
    fs, path = filesystem(uri)
    retry(lambda: fs.pipe_file(path, data))


def _write_temp(path: str, data: bytes) -> str:
    """A complete, synced hidden temporary file next to ``path``, to be renamed or linked into place."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def _write_local_atomic(path: str, data: bytes) -> None:
    temp = _write_temp(path, data)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def exists(uri: str) -> bool:
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        return os.path.exists(_local_path(uri))
    fs, path = filesystem(uri)
    return retry(lambda: fs.exists(path))


def delete(uri: str) -> None:
    """Remove one object; deleting what is not there is not an error (reruns stay simple)."""
    if _protocol(uri) in _LOCAL_PROTOCOLS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local_path(uri))
        return
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm_file(path))


def remove_empty_folders(uri: str) -> None:
    """Remove the empty folders at and below ``uri`` on a local disk, which keeps folders after
    their files are deleted; object stores have no folders, so nothing to do there."""
    if _protocol(uri) not in _LOCAL_PROTOCOLS:
        return
    for folder, _, _ in os.walk(_local_path(uri), topdown=False):
        with contextlib.suppress(OSError):  # not empty: still in use
            os.rmdir(folder)


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- retries ---------------------------------------------------------------------------------

_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                     errno.ECONNABORTED, errno.EPIPE, getattr(errno, "EREMOTEIO", errno.EIO)}
# Network errors of botocore, aiohttp and urllib3, by name, so that this module imports none of them.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                    "ClientOSError", "ServerDisconnectedError", "ClientPayloadError", "ProtocolError"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                    "TooManyRequests", "RequestTimeout", "InternalError", "ServiceUnavailable"}


def is_transient_error(exc: BaseException) -> bool:
    """Throttling, connection trouble and 5xx: worth another try. Missing or forbidden: not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if type(exc).__name__ in _TRANSIENT_NAMES:
        return True
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in _TRANSIENT_CODES or status == 429 or status >= 500
    return False


def retry(fn: Callable[[], T], attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0,
          sleep: Callable[[float], None] = time.sleep) -> T:
    """Call fn, retrying transient errors with exponential backoff.

    The delay doubles from base_delay up to max_delay, times a random factor in [0.5, 1] so that
    many workers throttled together do not retry in lockstep. Other errors propagate at once.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient_error(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("transient storage error (attempt %d of %d, retrying in %.2f s): %s: %s",
                        attempt, attempts, delay, type(exc).__name__, exc)
            sleep(delay)
            attempt += 1


# --- conditional writes ----------------------------------------------------------------------
#
# For writers that must not overwrite each other (registry versions, pointers). Local disks and
# S3 only: other fsspec stores offer no conditional write here, and faking one with
# exists-then-write would hide exactly the race these functions exist to prevent.
#
# Version tokens ("etags"): S3's ETag without quotes; on a local disk the content hash of the
# file. Two versions with identical bytes then share a token, which is harmless for a
# compare-and-swap: the state it compares is the same.

# Local compare-and-swap also takes this lock: on NFS, flock is emulated with per-process POSIX
# locks, which do not exclude two threads of one process.
_LOCAL_CAS_LOCK = threading.Lock()


def require_conditional_writes(uri: str) -> str:
    """The URI's protocol, if this module can write to it conditionally (local, s3); else ValueError."""
    protocol = _protocol(uri)
    if protocol not in _LOCAL_PROTOCOLS + ("s3", "s3a"):
        raise ValueError(f"conditional writes need a local path or s3:// URI, got {protocol}:// in {uri}")
    return protocol


def _s3_bucket_key(uri: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    fs, path = filesystem(uri)
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise ValueError(f"need s3://BUCKET/KEY, got {uri!r}")
    return fs, bucket, key


def _s3_status(exc: BaseException) -> tuple[str, int]:
    """Error code and HTTP status of an S3 error as s3fs raises it (a Python exception with the
    botocore ClientError as its cause); ("", 0) for anything else."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            return code, int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    return "", 0


def _precondition_failed(exc: BaseException) -> bool:
    code, status = _s3_status(exc)
    return code == "PreconditionFailed" or status == 412


def _retry_conditional(fn: Callable[[], T], attempts: int = 5) -> T:
    """retry(fn), and also retry S3's 409 ConditionalRequestConflict: AWS answers it when another
    write to the key was in flight, and says to retry (moto never sends it)."""
    attempt = 1
    while True:
        try:
            return retry(fn)
        except OSError as exc:
            code, status = _s3_status(exc)
            if attempt >= attempts or not (code == "ConditionalRequestConflict" or status == 409):
                raise
            delay = min(2.0, 0.1 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.info("conditional write conflicted with another in flight; retrying in %.2f s", delay)
            time.sleep(delay)
            attempt += 1


def read_bytes_with_etag(uri: str) -> tuple[bytes, str]:
    """The whole object and its version token, from one consistent read (FileNotFoundError if
    absent). S3: one GetObject, so the ETag names exactly the bytes returned."""
    if require_conditional_writes(uri) in _LOCAL_PROTOCOLS:
        data = read_bytes(uri)
        return data, content_hash(data)
    fs, bucket, key = _s3_bucket_key(uri)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            body = await response["Body"].read()
        finally:
            response["Body"].close()
        return body, response["ETag"].strip('"')

    return retry(lambda: fsspec.asyn.sync(fs.loop, get))


def write_bytes_if_absent(uri: str, data: bytes) -> bool:
    """Create the object only if nothing exists under its key, atomically.

    True: the object now holds ``data``; False: another object was there, and is left alone.
    An existing object with exactly these bytes counts as True: on S3 a retried PUT whose first
    attempt landed (the SDK retries internally, out of our sight) answers 412 like a real
    conflict, and the two cannot be told apart; local disks answer the same way for consistency.
    Callers that need "created by me" put something unique in ``data``.

    Local: a complete temporary file in the same folder, hard-linked to the final name (link
    fails if the name exists; readers never see a partial file). S3: PutObject with
    ``If-None-Match: *`` (AWS conditional writes; moto honours it too), large objects through a
    multipart upload completed with the same condition.
    """
    if require_conditional_writes(uri) in _LOCAL_PROTOCOLS:
        if _create_local(_local_path(uri), data):
            return True
    else:
        fs, path = filesystem(uri)
        try:
            _retry_conditional(lambda: fs.pipe_file(path, data, mode="create"))
            return True
        except OSError as exc:
            if not (isinstance(exc, FileExistsError) or _precondition_failed(exc)):
                raise
    try:
        return read_bytes(uri) == data
    except FileNotFoundError:  # deleted since: still not ours to claim
        return False


def _create_local(path: str, data: bytes) -> bool:
    temp = _write_temp(path, data)
    try:
        os.link(temp, os.path.abspath(path))
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def write_bytes_if_match(uri: str, data: bytes, etag: str) -> bool:
    """Replace the object only if it is still the version ``etag`` (compare-and-swap).

    False: it changed or was deleted since that token was read; re-read and decide again (on S3 a
    retried PUT whose first attempt landed also answers 412, so the re-read may find this very
    write: compare before writing again).
    S3: PutObject with ``If-Match`` (one PUT, so up to 5 GiB: meant for small documents).
    Local: an exclusive flock on a hidden ``.NAME.lock`` next to the target around read, compare
    and atomic replace; every local writer of the object must come through here (plain writes
    do not take the lock). The lock file stays; the kernel drops the lock if a holder dies.
    """
    if require_conditional_writes(uri) in _LOCAL_PROTOCOLS:
        return _replace_local_if_match(_local_path(uri), data, etag)
    fs, bucket, key = _s3_bucket_key(uri)
    quoted = etag if etag.startswith('"') else f'"{etag}"'
    try:
        _retry_conditional(lambda: fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=quoted))
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        if _precondition_failed(exc):
            return False
        raise


def _replace_local_if_match(path: str, data: bytes, etag: str) -> bool:
    import fcntl

    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(folder):  # so the object is absent too
        return False
    with _LOCAL_CAS_LOCK, open(os.path.join(folder, f".{name}.lock"), "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            current = _read_local(path)
        except FileNotFoundError:
            return False
        if content_hash(current) != etag:
            return False
        _write_local_atomic(path, data)
        return True


def probe_conditional_writes(folder_uri: str) -> str | None:
    """Whether the store under ``folder_uri`` honours conditional writes: None if it does, else
    what it accepted that it should have refused.

    S3-compatible stores that ignore ``If-None-Match`` / ``If-Match`` answer 200 and overwrite,
    so nothing fails and the lock and registry immutability quietly stop working; only a write
    that must be refused shows it. Writes a unique hidden key twice with if-absent semantics (the
    second, with other bytes, must be refused), then once with a wrong version token (must be
    refused too), and deletes the key. Storage errors propagate. Local disks need no probe: there
    the conditions are the kernel's (an exclusive link, a flock).
    """
    if require_conditional_writes(folder_uri) in _LOCAL_PROTOCOLS:
        return None
    uri = _child(folder_uri.rstrip("/"), f".clipsr-probe-{uuid.uuid4().hex}")
    first, second = b"probe: first writer\n", b"probe: second writer\n"
    if not write_bytes_if_absent(uri, first):
        return f"a create-if-absent write of the new key {uri} was refused"
    try:
        if write_bytes_if_absent(uri, second):
            return "a second create-if-absent (If-None-Match: *) write of one key replaced the object"
        if write_bytes_if_match(uri, second, "0" * 32):  # no version has this token
            return "a write with a wrong version token (If-Match) replaced the object"
        return None
    finally:
        delete(uri)
