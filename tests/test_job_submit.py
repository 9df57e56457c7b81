"""`ray job submit` as operators use it: a real Ray head started with `ray start --head` on
loopback, the jobs in jobs/ submitted with the repository as working dir and
cluster/local-runtime-env.yaml, data and models on a local S3 server.

The head gets its own temp dir, ports and token file, and is stopped by killing its process
group: `ray stop` would kill every Ray on the machine, the tests' own included.
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
from PIL import Image

from clipsr import storage
from clipsr.factory import create_model, encode_checkpoint
from clipsr.provenance import REVISION_ENV, code_revision

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# moto accepts any key: a distinctive one can be searched for in Ray's logs.
SECRET = f"clipsr-test-secret-{secrets.token_hex(8)}"


@dataclass
class Head:
    address: str  # the dashboard URL jobs are submitted to
    env: dict[str, str]  # what an operator's shell has: RAY_AUTH_MODE, token path, AWS settings
    temp_dir: str
    token: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(address: str, token: str, timeout: float = 120.0) -> None:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Ray head at {address} did not come up in {timeout:.0f}s")
        time.sleep(1)


@pytest.fixture(scope="module")
def ray_head(s3_server):
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live below it
    token = secrets.token_hex(32)
    token_file = Path(temp) / "auth_token"
    token_file.write_text(token)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent = _free_ports(4)
    address = f"http://127.0.0.1:{dashboard}"
    with open(Path(temp) / "head.log", "wb") as log:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
             "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats", "--include-dashboard", "true"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _ready(address, token)
        yield Head(address, env, temp, token)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Submitted:
    job_id: str
    returncode: int  # of `ray job submit`
    stdout: str  # the job's output, streamed by `ray job submit`
    stderr: str


def submit(head: Head, job: str, *args: str, env: dict[str, str] | None = None) -> Submitted:
    """``ray job submit`` from the repository root, as the README shows; waits for the job.

    ``env`` is set on the entrypoint (``NAME=value python jobs/...``), as docs/operations.md shows.
    Retried while the head's job agent is still starting ("No available agent").
    """
    for _ in range(30):
        job_id = f"clipsr-test-{secrets.token_hex(4)}"
        cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", job_id,
               "--working-dir", ".", "--runtime-env", "cluster/local-runtime-env.yaml",
               "--", *(f"{k}={v}" for k, v in (env or {}).items()), "python", f"jobs/{job}.py", *args]
        done = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stdout + done.stderr:
            return Submitted(job_id, done.returncode, done.stdout, done.stderr)
        time.sleep(2)
    raise TimeoutError(f"the head never accepted the job: {done.stderr[-2000:]}")


def _png(seed: int, size: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.cos((2 + c + seed) * np.pi * (xx * yy + c * xx)) for c in range(3)], -1) * 0.45 + 0.5
    arr = (np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _summary(done: Submitted, prefix: str) -> str:
    lines = [line for line in done.stdout.splitlines() if line.startswith(prefix)]
    assert lines, f"no '{prefix}' line in the job's output:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    return lines[-1]


def _job_status(head: Head, done: Submitted) -> str:
    """The status `ray job status` reports, as an operator would read it."""
    out = subprocess.run([RAY, "job", "status", "--address", head.address, done.job_id],
                         env=head.env, capture_output=True, text=True, timeout=60)
    found = re.search(rf"Job '{done.job_id}' (succeeded|failed|was stopped|is currently)", out.stdout)
    assert found, f"no status in `ray job status` output: {out.stdout} {out.stderr}"
    return found.group(1)


def _no_secrets_in_logs(head: Head) -> None:
    for path in Path(head.temp_dir).rglob("*"):
        if path.is_file() and path.name != "auth_token":
            text = path.read_bytes()
            assert SECRET.encode() not in text, f"the S3 secret key was written to {path}"
            assert head.token.encode() not in text, f"the Ray auth token was written to {path}"


def test_submitted_enhancement_writes_outputs_and_one_manifest_row_per_input(ray_head, s3_bucket):
    keys = [f"scans/{i:02d}.png" for i in range(3)]
    for i, key in enumerate(keys):
        storage.write_bytes_atomic(f"{s3_bucket}/in/{key}", _png(i, 40))
    storage.write_bytes_atomic(f"{s3_bucket}/in/scans/broken.png", b"\x89PNG not really")

    done = submit(ray_head, "enhance", "--input", f"{s3_bucket}/in/", "--output", f"{s3_bucket}/out/",
                  "--max-failed-fraction", "0.5")
    summary = _summary(done, "clipsr enhance: run ")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 listed, 3 ok, 1 failed" in summary and "(exit 0)" in summary
    assert _job_status(ray_head, done) == "succeeded"
    for key in keys:
        with Image.open(io.BytesIO(storage.read_bytes(f"{s3_bucket}/out/{key}"))) as out:
            assert out.size == (160, 160)  # the bundled x4 model
    fs, path = storage.pyarrow_filesystem(f"{s3_bucket}/out/_manifests/")
    rows = ds.dataset(path, format="parquet", filesystem=fs, partitioning="hive").to_table().to_pylist()
    by_key = {r["input_key"]: r for r in rows}
    assert len(rows) == 4 and set(by_key) == {*keys, "scans/broken.png"}
    assert by_key["scans/broken.png"]["status"] == "failed" and by_key["scans/broken.png"]["error"]
    assert all(by_key[k]["status"] == "ok" for k in keys)

    # Above --max-failed-fraction: clipsr exits 2, `ray job submit` exits 1 and the job is FAILED;
    # the summary line says which.
    storage.write_bytes_atomic(f"{s3_bucket}/in/scans/empty.png", b"")
    done = submit(ray_head, "enhance", "--input", f"{s3_bucket}/in/", "--output", f"{s3_bucket}/out/",
                  "--max-failed-fraction", "0")
    summary = _summary(done, "clipsr enhance: run ")
    assert done.returncode == 1 and "(exit 2)" in summary and "3 skipped" in summary, summary
    assert _job_status(ray_head, done) == "failed"
    _no_secrets_in_logs(ray_head)


def test_submitted_adaptation_publishes_to_the_registry(ray_head, s3_bucket):
    torch.manual_seed(0)
    data, _ = encode_checkpoint(create_model("cdasr-tiny", 2), "cdasr-tiny")
    storage.write_bytes_atomic(f"{s3_bucket}/models/tiny-x2.safetensors", data)
    for i in range(4):
        storage.write_bytes_atomic(f"{s3_bucket}/exemplars/photos/{i:02d}.png", _png(i, 112))
    registry = f"{s3_bucket}/registry"

    # The upload has no .git: the submitter passes the revision, and the driver hands it to the
    # worker that adapts and publishes.
    done = submit(ray_head, "adapt", "--source-model", f"{s3_bucket}/models/tiny-x2.safetensors",
                  "--domain", f"photos={s3_bucket}/exemplars/photos/", "--domain",
                  f"missing={s3_bucket}/exemplars/none/", "--shots", "4", "--scale", "2", "--out", registry,
                  "--steps", "20", "--cpus-per-domain", "1", env={REVISION_ENV: code_revision()})
    summary = _summary(done, "adapt: ")
    assert done.returncode == 1 and summary.startswith("adapt: 1 ok, 1 failed"), done.stdout[-3000:]
    entry = json.loads(storage.read_bytes(f"{registry}/photos/versions/v1.json"))
    assert entry["source_model"]["weights_sha256"] and len(entry["exemplars"]) == 4
    assert entry["code_revision"] == code_revision()
    assert not storage.exists(f"{registry}/missing/versions/v1.json")
    _no_secrets_in_logs(ray_head)
