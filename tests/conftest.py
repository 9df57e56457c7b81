"""Shared fixtures: a real S3 HTTP API on loopback (moto's server), a fresh bucket per test, a
real HTTP proxy in front of it that misbehaves on demand, and the benchmark data's location.

Benchmark data (Set5, Set14, Urban100... as ``val/``, ``domains/``, ``source/``) is looked for in
``$CLIPSR_DATA``, by default ``../shared/data`` next to the checkout. A test that needs it skips,
saying where it looked, unless ``CLIPSR_REQUIRE_DATA=1`` (set by ``.ci/run``): then it fails.
"""

from __future__ import annotations

import http.client
import os
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

DATA_ENV, REQUIRE_DATA_ENV = "CLIPSR_DATA", "CLIPSR_REQUIRE_DATA"


def data_root() -> Path:
    """Where the benchmark data is looked for."""
    return Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture
def bench_data() -> Callable[..., Path]:
    """``bench_data("val", "set5")``: that folder of the benchmark data; a skip naming where it was
    looked for when it is not there, or a failure when CLIPSR_REQUIRE_DATA=1."""

    def need(*parts: str) -> Path:
        path = data_root().joinpath(*parts)
        if not path.is_dir():
            message = (f"benchmark data not found: {path} (set {DATA_ENV} to the folder that holds "
                       "val/, domains/ and source/)")
            if os.environ.get(REQUIRE_DATA_ENV) == "1":
                pytest.fail(f"{message}; {REQUIRE_DATA_ENV}=1 makes this a failure")
            pytest.skip(message)
        return path

    return need


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's S3 server on a free loopback port and point the AWS environment at it.

    The variables are restored when the session ends; config files are masked so that a
    developer's ~/.aws cannot leak into the tests.
    """
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION"):
            mp.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket for one test, as "s3://<bucket>"; emptied and removed afterwards."""
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3", endpoint_url=s3_server)
    name = f"test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", ()):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


class S3Proxy:
    """Forwards every request to moto, except what a switch changes:

    - ``ignore_conditions``: drop If-None-Match and If-Match, as S3-compatible stores without
      conditional writes do (they answer 200 and overwrite);
    - ``deny_writes``: answer PUT, POST and DELETE with 403 AccessDenied, as S3 does once the
      credentials have expired.

    Request bodies are read by Content-Length, which is how botocore sends them.
    """

    _DROPPED = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "content-length"}

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.ignore_conditions = False
        self.deny_writes = False
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                if proxy.deny_writes and self.command in ("PUT", "POST", "DELETE"):
                    error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                             b"<Message>Access Denied</Message></Error>")
                    self._answer(403, [("Content-Type", "application/xml"), ("Content-Length", str(len(error)))], error)
                    return
                dropped = proxy._DROPPED | ({"if-none-match", "if-match"} if proxy.ignore_conditions else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    out = [(k, v) for k, v in response.getheaders() if k.lower() not in proxy._DROPPED]
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self._answer(response.status, out + [("Content-Length", length or str(len(data)))], data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def s3_proxy(s3_server, monkeypatch):
    """An S3Proxy in front of moto, and the AWS endpoint pointed at it for this test."""
    proxy = S3Proxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, started after the S3 server so workers see its endpoint.

    Four logical CPUs on a 2-core machine: Train workers and Data tasks ask for fractions of them,
    and the slack keeps a pool from starving the tasks that feed it.
    """
    ray = pytest.importorskip("ray")
    _init_local_ray(ray)
    try:
        yield ray
    finally:
        ray.shutdown()


def _init_local_ray(ray) -> None:
    from clipsr.ray_runtime import worker_env

    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": worker_env()}, log_to_driver=False)


@pytest.fixture
def own_ray_driver():
    """For a test whose process must drive a cluster of its own: the session's local Ray (if an
    earlier test started it) is stopped for the test and started again after it."""
    ray = pytest.importorskip("ray")
    was_up = ray.is_initialized()
    ray.shutdown()
    try:
        yield ray
    finally:
        ray.shutdown()
        if was_up:
            _init_local_ray(ray)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A seeded, untrained cdasr-tiny x2 checkpoint file: the smallest real model to run."""
    import torch

    from clipsr.factory import create_model, save_checkpoint

    torch.manual_seed(0)
    uri = str(tmp_path / "tiny-x2.safetensors")
    save_checkpoint(uri, create_model("cdasr-tiny", 2), "cdasr-tiny")
    return uri


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The same seeded cdasr-tiny x2 model for a whole test module, as (path, model id)."""
    import torch

    from clipsr.factory import create_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny-x2.safetensors"
    meta = save_checkpoint(str(path), create_model("cdasr-tiny", 2), "cdasr-tiny")
    return str(path), meta["id"]
