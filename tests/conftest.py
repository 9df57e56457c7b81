"""Shared fixtures: a real S3 HTTP API on loopback (moto's server) and a fresh bucket per test."""

from __future__ import annotations

import os
import uuid

import pytest


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


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, started after the S3 server so workers see its endpoint.

    Four logical CPUs on a 2-core machine: Train workers and Data tasks ask for fractions of them,
    and the slack keeps a pool from starving the tasks that feed it.
    """
    ray = pytest.importorskip("ray")
    from clipsr.ray_runtime import worker_env

    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": worker_env()}, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A seeded, untrained cdasr-tiny x2 checkpoint file: the smallest real model to run."""
    import torch

    from clipsr.factory import create_model, save_checkpoint

    torch.manual_seed(0)
    uri = str(tmp_path / "tiny-x2.safetensors")
    save_checkpoint(uri, create_model("cdasr-tiny", 2), "cdasr-tiny")
    return uri
