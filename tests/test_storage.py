"""storage: listing order and filters, key safety, atomic writes, retries; local and S3 (moto)."""

from __future__ import annotations

import errno
import hashlib
import os
import types
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from clipsr import storage
from clipsr.storage import NoImagesError, UnsafeKeyError


NAMES = ["a.png", "B.png", "img_10.png", "img_2.png", "Z.JPG", "sub/c.jpg", "sub/deeper/d.tiff", "é.webp"]
IGNORED = [".DS_Store", ".hidden.png", ".cache/x.png", "notes.txt", "scan.psd", "sub/README"]
SORTED = ["B.png", "Z.JPG", "a.png", "img_10.png", "img_2.png", "sub/c.jpg", "sub/deeper/d.tiff", "é.webp"]


def _populate(root: Path, names) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


# --- local listing ---------------------------------------------------------------------------


def test_list_images_is_in_byte_order_and_skips_hidden_and_non_images(tmp_path):
    _populate(tmp_path, NAMES + IGNORED)
    found = storage.list_images(str(tmp_path))
    assert [storage.relative_key(str(tmp_path), u) for u in found] == SORTED
    assert found[0] == f"{tmp_path}/B.png"


def test_list_images_not_recursive_stays_in_the_folder(tmp_path):
    _populate(tmp_path, NAMES)
    found = storage.list_images(str(tmp_path) + "/", recursive=False)
    assert [u.rsplit("/", 1)[1] for u in found] == [n for n in SORTED if "/" not in n]


def test_list_images_accepts_file_uris(tmp_path):
    _populate(tmp_path, ["x.png"])
    assert storage.list_images(f"file://{tmp_path}") == [f"file://{tmp_path}/x.png"]
    assert storage.read_bytes(f"file://{tmp_path}/x.png") == b"x.png"


def test_missing_folder_and_folder_without_images_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        storage.list_images(str(tmp_path / "nope"))
    _populate(tmp_path, IGNORED)
    with pytest.raises(NoImagesError, match="no image files"):
        storage.list_images(str(tmp_path))


def test_iter_objects_streams_entries_with_size_and_mtime(tmp_path):
    _populate(tmp_path, ["a.png", "sub/b.png"])
    it = storage.iter_objects(str(tmp_path))
    assert isinstance(it, types.GeneratorType)
    entries = {o.key: o for o in it}
    assert set(entries) == {"a.png", "sub/b.png"}
    assert entries["sub/b.png"].size == len(b"sub/b.png") and entries["sub/b.png"].mtime > 0
    assert entries["a.png"].uri == f"{tmp_path}/a.png"


def test_benchmark_shots_are_the_first_ten_in_sorted_order(bench_data):
    found = storage.list_images(str(bench_data("domains", "urban100")))
    assert [u.rsplit("/", 1)[1].split(".")[0] for u in found[:10]] == [f"img_{i:03d}" for i in range(1, 11)]


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "/abs.png", "a/../b.png", "../b.png", "a/./b.png", "a//b.png",
                                 "a/", "a\\b.png", "a\x00.png", "a\nb.png", "..", "."])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(UnsafeKeyError):
        storage.safe_relative_key(key)
    with pytest.raises(ValueError):  # UnsafeKeyError is a ValueError
        storage.join("s3://bucket/out", key)


@pytest.mark.parametrize("key", ["a.png", "sub/dir/b c.png", "é/ü.jpg", "..a.png", "a..b/c.png"])
def test_ordinary_keys_pass_unchanged(key):
    assert storage.safe_relative_key(key) == key


def test_join_and_relative_key_are_inverse():
    for root in ("s3://bucket/in", "s3://bucket/in/", "s3://bucket", "/data/in", "file:///"):
        full = storage.join(root, "sub/x.png")
        assert storage.relative_key(root, full) == "sub/x.png"
    assert storage.join("s3://b/out/", "x.png") == "s3://b/out/x.png"
    with pytest.raises(ValueError, match="not below"):
        storage.relative_key("s3://b/in", "s3://b/input/x.png")


def test_keys_with_dot_segments_are_listed_for_reporting_not_hidden():
    assert storage.is_image_key("a/../b.png")  # must reach safe_relative_key and become a failed row
    assert not storage.is_image_key("a/.thumbs/b.png")


# --- local writes --------------------------------------------------------------------------------


def test_write_bytes_atomic_creates_folders_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "out" / "deep" / "x.png"
    storage.write_bytes_atomic(str(target), b"first")
    storage.write_bytes_atomic(str(target), b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["x.png"]


def test_failed_write_keeps_the_old_object_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        storage.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.png"]


def test_read_exists_delete_and_hash_locally(tmp_path):
    uri = str(tmp_path / "x.bin")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"abc")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"abc"
    storage.delete(uri)
    storage.delete(uri)  # deleting again is not an error
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    assert storage.content_hash(b"abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


# --- retries -----------------------------------------------------------------------------------


def test_retry_backs_off_on_transient_errors_then_succeeds():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise OSError(errno.EBUSY, "SlowDown")  # what s3fs makes of throttling
        return "ok"

    assert storage.retry(flaky, attempts=5, base_delay=0.1, sleep=sleeps.append) == "ok"
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0.05 * 2**i <= s <= 0.1 * 2**i for i, s in enumerate(sleeps))


def test_retry_gives_up_after_attempts_and_never_retries_missing_or_forbidden():
    sleeps = []
    with pytest.raises(ConnectionResetError):
        storage.retry(lambda: (_ for _ in ()).throw(ConnectionResetError()), attempts=3, sleep=sleeps.append)
    assert len(sleeps) == 2
    for exc in (FileNotFoundError("gone"), PermissionError("denied"), ValueError("bug")):
        calls = []

        def failing(exc=exc):
            calls.append(1)
            raise exc

        with pytest.raises(type(exc)):
            storage.retry(failing, sleep=sleeps.append)
        assert len(calls) == 1


def test_transient_classification_of_botocore_errors():
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(code, status):
        response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(response, "PutObject")

    assert storage.is_transient_error(client_error("SlowDown", 503))
    assert storage.is_transient_error(client_error("InternalError", 500))
    assert storage.is_transient_error(EndpointConnectionError(endpoint_url="http://x"))
    assert not storage.is_transient_error(client_error("AccessDenied", 403))
    assert not storage.is_transient_error(client_error("NoSuchKey", 404))


# --- filesystems ---------------------------------------------------------------------------------


def test_filesystem_for_local_and_s3_with_endpoint_from_environment(monkeypatch, tmp_path):
    fs, path = storage.filesystem(str(tmp_path))
    assert isinstance(fs, LocalFileSystem) and path == str(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic.invalid:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific.invalid:2")
    fs, path = storage.filesystem("s3://bucket/some/key.png")
    assert path == "bucket/some/key.png"
    assert fs.client_kwargs["endpoint_url"] == "http://s3-specific.invalid:2"
    assert storage.filesystem("s3://bucket/other")[0] is fs  # cached
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert storage.filesystem("s3://bucket")[0].client_kwargs["endpoint_url"] == "http://generic.invalid:1"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "rotated")
    assert storage.filesystem("s3://bucket")[0] is not fs  # new credentials, new client


# --- S3 (moto server on loopback) ----------------------------------------------------------------


@pytest.mark.slow
def test_s3_write_list_read_in_sorted_order(s3_bucket):
    root = f"{s3_bucket}/in"
    for name in NAMES + IGNORED:
        storage.write_bytes_atomic(storage.join(root, name), name.encode())
    storage.write_bytes_atomic(f"{s3_bucket}/input-sibling/a.png", b"not below in/")
    found = storage.list_images(root)
    assert [storage.relative_key(root, u) for u in found] == SORTED
    assert storage.read_bytes(found[0]) == b"B.png"
    assert [storage.relative_key(root, u) for u in storage.list_images(root + "/", recursive=False)] == \
        ["B.png", "Z.JPG", "a.png", "img_10.png", "img_2.png", "é.webp"]


@pytest.mark.slow
def test_s3_listing_pages_and_reports_size_and_etag(s3_bucket):
    for i in range(5):
        storage.write_bytes_atomic(f"{s3_bucket}/p/{i}.png", bytes([i]) * (i + 1))
    entries = list(storage.iter_objects(f"{s3_bucket}/p", page_size=2))
    assert sorted(o.key for o in entries) == [f"{i}.png" for i in range(5)]
    by_key = {o.key: o for o in entries}
    assert by_key["3.png"].size == 4
    assert by_key["3.png"].etag == hashlib.md5(bytes([3]) * 4).hexdigest()
    assert by_key["3.png"].uri == f"{s3_bucket}/p/3.png" and by_key["3.png"].mtime > 0


@pytest.mark.slow
def test_s3_overwrite_is_seen_at_once_and_delete_is_idempotent(s3_bucket):
    uri = f"{s3_bucket}/x.png"
    storage.write_bytes_atomic(uri, b"one")
    first = next(storage.iter_objects(s3_bucket))
    storage.write_bytes_atomic(uri, b"two!")
    second = next(storage.iter_objects(s3_bucket))
    assert storage.read_bytes(uri) == b"two!" and second.size == 4 and second.etag != first.etag
    assert storage.exists(uri)
    storage.delete(uri)
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)


@pytest.mark.slow
def test_s3_unsafe_keys_are_listed_raw_for_the_caller_to_refuse(s3_bucket, s3_server):
    import boto3

    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=s3_server)
    for key in ("in/ok.png", "in/../escape.png", "in//empty.png", "in/folder/"):
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    keys = sorted(o.key for o in storage.iter_objects(f"{s3_bucket}/in"))
    assert keys == ["../escape.png", "/empty.png", "ok.png"]  # the folder marker is skipped
    safe = []
    for key in keys:
        try:
            safe.append(storage.safe_relative_key(key))
        except UnsafeKeyError:
            pass
    assert safe == ["ok.png"]


@pytest.mark.slow
def test_s3_write_retries_a_throttled_put(s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/t.png"
    fs, _ = storage.filesystem(uri)
    real_pipe = fs.pipe_file
    calls = []

    def throttled_once(path, data, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.EBUSY, "SlowDown")
        return real_pipe(path, data, **kw)

    monkeypatch.setattr(fs, "pipe_file", throttled_once)
    storage.write_bytes_atomic(uri, b"payload")
    assert len(calls) == 2 and storage.read_bytes(uri) == b"payload"


@pytest.mark.slow
def test_s3_missing_bucket_and_empty_prefix(s3_bucket):
    with pytest.raises(FileNotFoundError):
        storage.list_images("s3://no-such-bucket-for-clipsr/in")
    with pytest.raises(NoImagesError):
        storage.list_images(f"{s3_bucket}/nothing-here")


def test_other_fsspec_protocols_list_read_and_write():
    root = "memory://clipsr-test-storage"
    for name in ["b.png", "A.png", "sub/c.png", ".hidden.png", "x.txt"]:
        storage.write_bytes_atomic(storage.join(root, name), name.encode())
    found = storage.list_images(root)
    assert [storage.relative_key(root, u) for u in found] == ["A.png", "b.png", "sub/c.png"]
    assert storage.read_bytes(found[0]) == b"A.png"
    storage.delete(found[0])
    assert not storage.exists(found[0])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_range_reads_a_slice_and_nothing_past_the_end(where, tmp_path, request):
    root = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    uri = f"{root}/obj.bin"
    data = bytes(range(256)) * 4
    storage.write_bytes_atomic(uri, data)
    assert storage.read_range(uri, 0, 16) == data[:16]
    assert storage.read_range(uri, 1000, 5000) == data[1000:]  # fewer where the object ends sooner
    assert storage.read_range(uri, 1024, 2048) == b""  # starting at the end: nothing, no error
    assert storage.read_range(uri, 5000, 6000) == b""
    with pytest.raises(FileNotFoundError):
        storage.read_range(f"{root}/missing.bin", 0, 16)
