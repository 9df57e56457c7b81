"""Joining or starting Ray the same way in every job.

``ray.init()`` with no address silently joins any Ray already running on the machine, and workers
get that cluster's environment, not the driver's. So: join RAY_ADDRESS when it is set, otherwise
start a fresh local Ray; and hand workers the storage settings they need explicitly, and the
code revision the driver resolved (workers have no git checkout to find it in).

Credentials are *not* forwarded: Ray writes a runtime environment's variables into its own log
files. A local Ray inherits them from the driver's environment; on a cluster they come from the
workers' own environment (pod secrets, instance roles).

``quiet=True`` (the jobs, unless ``--verbose``) sends Ray's own driver-side output to a log file
(clipsr.ray_logs) that the job's last lines name, and :func:`shutdown_ray` brings it back. Workers'
output is then not copied to the driver either (unless ``worker_output``: pretraining's step lines
come from its workers): it stays in Ray's session logs, which that file names (a failed image or
domain reaches the console as the job's own failure line).
"""
from __future__ import annotations

import json
import logging
import os

import ray

from clipsr import ray_logs, reaper
from clipsr.provenance import REVISION_ENV, code_revision

log = logging.getLogger(__name__)

#: Non-secret settings workers need to reach object storage.
FORWARDED_ENV = (
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
)


#: Set by ``ray job submit`` in the driver's environment: the job's runtime environment.
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """The forwarded settings and the code revision, minus those the submitted job's runtime env
    already sets: Ray refuses a ``ray.init`` that names an env var the job's runtime env names too."""
    job_env = json.loads(os.environ.get(JOB_CONFIG_VAR) or "{}").get("runtime_env", {}).get("env_vars") or {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)} | {REVISION_ENV: code_revision()}
    return {k: v for k, v in env.items() if k not in job_env}


def init_ray(num_cpus: int | None = None, dashboard: bool = True, quiet: bool = False,
             worker_output: bool | None = None) -> bool:
    """Connect to Ray; returns True when this call started it (the caller then calls
    :func:`shutdown_ray`). ``quiet``: Ray's own driver-side output goes to :func:`ray_log`.
    ``worker_output``: print what workers print (default: unless quiet)."""
    if ray.is_initialized():
        return False
    if quiet:
        ray_logs.start()
    runtime_env = {"env_vars": worker_env()}
    to_driver = not quiet if worker_output is None else worker_output
    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=to_driver)
        else:
            log.info("starting a local Ray (set RAY_ADDRESS to use a cluster)")
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=runtime_env,
                     log_to_driver=to_driver)
    except BaseException:
        ray_logs.stop()
        raise
    if not address:
        try:
            reaper.start()  # a killed driver takes its local Ray with it
        except OSError as e:
            log.warning("could not start the watcher of the local Ray: %s", e)
    node = ray._private.worker._global_node
    if node is not None:
        ray_logs.note(f"Ray's session logs (raylet, workers, ray-data): {node.get_session_dir_path()}/logs")
    return True


def shutdown_ray() -> None:
    """Stop the Ray this process started, and give Ray's output back to the console."""
    try:
        ray.shutdown()
    finally:
        ray_logs.stop()


def ray_log() -> str | None:
    """The file Ray's driver-side output goes to (None: the console)."""
    return ray_logs.log_path()
