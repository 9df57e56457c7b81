"""`clipsr enhance` as a cluster runs it: several nodes, a node lost, a driver killed mid-run.

The job runs in its own process, as `ray job submit` would run it, joining a multi-node cluster
(`ray.cluster_utils.Cluster`: a head without CPUs and one-CPU worker nodes) through RAY_ADDRESS,
or starting its own local Ray for the kill test.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsr import storage
from clipsr.enhance import manifest
from clipsr.inference import resolve_precision

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "clipsr.cli"]


def _png(rng: np.random.Generator, size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(manifest_uri: str) -> dict[str, list[dict]]:
    """Every run's manifest rows under ``manifest_uri``, by run id."""
    runs: dict[str, list[dict]] = {}
    try:
        folders = {info.key.split("/", 1)[0] for info in storage.iter_objects(manifest_uri)}
    except FileNotFoundError:
        return runs
    for folder in sorted(folders):
        rows = []
        for part in manifest.iter_parts(f"{manifest_uri}/{folder}"):
            rows += manifest.read_part(part).to_pylist()
        runs[folder.removeprefix("run=")] = rows
    return runs


def _wait(predicate, what: str, proc: subprocess.Popen | None = None, limit_s: float = 300.0) -> None:
    """Poll for a state (never a fixed sleep); fail with ``what`` if it is not reached."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the job exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster(s3_server):
    """A head with no CPUs and two one-CPU worker nodes, started after the S3 server so its
    processes see the endpoint."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    try:
        yield c, workers
    finally:
        c.shutdown()


def _upload(bucket: str, n: int, size: int = 24) -> list[str]:
    rng = np.random.default_rng(7)
    keys = [f"scans/{i:03d}.png" for i in range(n)]
    for key in keys:
        storage.write_bytes_atomic(f"{bucket}/in/{key}", _png(rng, size))
    return keys


def test_inference_and_io_run_on_every_node_of_a_cluster(cluster, s3_bucket):
    c, _ = cluster
    keys = _upload(s3_bucket, 64, size=64)
    env = {**os.environ, "RAY_ADDRESS": c.address}
    # A second actor only gets work when the first is behind: Ray Data hands a decoded group to the
    # actor on its node while that actor has a free slot. The untrained tiny model infers a group
    # in milliseconds, so one actor kept up with the decode and did a whole run; the bundled model
    # (tens of ms per image) keeps both actors busy, as an archive does.
    done = subprocess.run([*CLI, "enhance", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out",
                           "--model", "default-x2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "64 listed, 64 ok" in done.stdout
    (rows,) = _rows(f"{s3_bucket}/out/_manifests").values()
    assert sorted(r["input_key"] for r in rows) == keys
    nodes = Counter(r["infer_node_id"] for r in rows)
    assert len(nodes) == 2 and None not in nodes, nodes  # both one-CPU nodes ran inference
    assert {r["precision"] for r in rows} == {resolve_precision("auto", "cpu")}


def test_a_node_lost_mid_run_loses_no_output_and_duplicates_no_row(cluster, s3_bucket, tiny_checkpoint):
    c, workers = cluster
    keys = _upload(s3_bucket, 40, size=48)
    env = {**os.environ, "RAY_ADDRESS": c.address}
    args = [*CLI, "enhance", "--input", f"{s3_bucket}/in", "--output", f"{s3_bucket}/out",
            "--model", tiny_checkpoint, "--commit-every", "0"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: sum(len(r) for r in _rows(f"{s3_bucket}/out/_manifests").values()) >= 4,
              "the first manifest rows", proc)
        c.remove_node(workers[1])
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode in (0, 1), out
    if proc.returncode == 1:  # could not finish on one node: the rerun does the rest
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    runs = _rows(f"{s3_bucket}/out/_manifests")
    for rows in runs.values():
        assert len({r["input_key"] for r in rows}) == len(rows)  # one row per input per run
    last = runs[max(runs)]
    assert sorted(r["input_key"] for r in last) == keys and {r["status"] for r in last} <= {"ok", "skipped"}
    ok_rows = [r for rows in runs.values() for r in rows if r["status"] == "ok"]
    assert {r["input_key"] for r in ok_rows} == set(keys)
    for key in keys:
        assert storage.exists(f"{s3_bucket}/out/{key}")


def test_a_killed_driver_keeps_its_finished_rows_and_the_rerun_does_only_the_rest(tmp_path, tiny_checkpoint):
    rng = np.random.default_rng(3)
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    keys = [f"{i:03d}.png" for i in range(80)]
    for key in keys:
        (src / key).write_bytes(_png(rng, 48))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [*CLI, "enhance", "--input", str(src), "--output", str(out), "--model", tiny_checkpoint,
            "--commit-every", "0"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the kill takes its Ray too
    try:
        recorded = lambda: [r for rows in _rows(str(out / "_manifests")).values() for r in rows]  # noqa: E731
        _wait(lambda: sum(r["status"] == "ok" for r in recorded()) >= 8, "8 recorded outputs", proc)
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (killed_run, killed_rows), = _rows(str(out / "_manifests")).items()
    kept = {r["input_key"] for r in killed_rows if r["status"] == "ok"}
    written = {p.name for p in out.glob("*.png")}
    assert 8 <= len(kept) < len(keys) and kept <= written

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    runs = _rows(str(out / "_manifests"))
    rows = runs[max(r for r in runs if r != killed_run)]
    assert sorted(r["input_key"] for r in rows) == keys  # every input, once
    redone = {r["input_key"] for r in rows if r["status"] == "ok"}
    assert redone == set(keys) - kept  # only what the killed run had not recorded
    assert {r["input_key"] for r in rows if r["status"] == "skipped"} == kept
    assert {p.name for p in out.glob("*.png")} == set(keys)


def test_a_gpu_run_asks_the_autoscaler_for_gpus_and_waits_for_one_to_join(own_ray_driver):
    """The test plays the autoscaler: it adds a GPU node once the request is in the cluster."""
    import threading

    import ray
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.cluster_utils import Cluster
    from ray.experimental.internal_kv import _internal_kv_get

    from clipsr.enhance.autoscale import nodes_for_run

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    requests: list[bytes | None] = []
    try:
        with pytest.raises(ValueError, match="none joined within --gpu-wait=1 s"):
            nodes_for_run("cuda", joined=True, wait_s=1)
        assert _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) == b"[]"  # withdrawn

        result: list = []
        run = threading.Thread(target=lambda: result.append(
            nodes_for_run("cuda", joined=True, wait_s=300, max_actors=4, actors_per_gpu=2)))
        run.start()
        _wait(lambda: _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) not in (None, b"[]"), "the GPU request")
        requests.append(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
        c.add_node(num_cpus=1, num_gpus=1)
        run.join()
        (nodes, device, max_actors), = result
        assert requests == [b'[{"GPU": 1}, {"GPU": 1}]']  # 4 actors, 2 to a GPU
        assert device == "cuda" and max_actors == 4 and sum(n.get("GPU", 0) for n in nodes) == 1
        assert _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) == b"[]"
        # auto on a cluster that publishes no GPU node types: sized on what is up, nothing asked
        assert nodes_for_run("auto", joined=True, wait_s=300)[1] == "auto"
    finally:
        ray.shutdown()
        c.shutdown()
