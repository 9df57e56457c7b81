"""The cluster definitions in cluster/: they parse, use only fields KubeRay and Ray know (an unknown
field in a custom resource is dropped without a word), every job command line in them is one
clipsr accepts, and no credential is written in them. No Ray is started."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from clipsr.cli import build_parser
from clipsr.enhance.options import EnhanceOptions
from clipsr.train.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
EXPECTED = {"runtime_env.yaml", "local-runtime-env.yaml", "rayjob-nightly-enhance.yaml",
            "cronjob-nightly-enhance.yaml", "raycluster.yaml", "aws-cluster.yaml", "README.md"}
RAY_PIN = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)

# Field names from KubeRay's ray.io/v1 Go types (ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go).
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                   "managedBy", "authOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                "template", "scaleStrategy", "suspend", "idleTimeoutSeconds"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts",
                      "securityContext", "idleTimeoutSeconds", "upscalingMode", "version"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
GPU = "nvidia.com/gpu"

CREDENTIAL = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY", re.IGNORECASE)
REFERENCE_KEYS = {"ssh_private_key"}  # a path to a key file on the submitting machine, not a key
INLINE_SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"),  # an AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_ACCESS_KEY_ID)[ \t]*[=:][ \t]*[\"']?[A-Za-z0-9/+=]{16,}"),
]
DEPENDENCY_INSTALLERS = {"pip", "conda", "uv", "py_executable", "container", "image_uri"}
SHELL_OPERATORS = {";", "&", "&&", "|", "||", ">", ">>", "<", "(", ")"}


# --- loading -------------------------------------------------------------------------------------

def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _embedded_texts(doc: Any) -> dict[str, str]:
    """YAML documents kept as strings: a ConfigMap's *.yaml data (the nightly RayJob)."""
    if not (isinstance(doc, dict) and doc.get("kind") == "ConfigMap"):
        return {}
    return {k: v for k, v in (doc.get("data") or {}).items() if k.endswith((".yaml", ".yml"))}


def _all_docs() -> list[tuple[str, Any]]:
    """(where, document) for every YAML document in cluster/, embedded ones included."""
    out = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for doc in _yaml_docs(path):
            out.append((path.name, doc))
            out.extend((f"{path.name}#{key}", yaml.safe_load(text)) for key, text in _embedded_texts(doc).items())
    return out


def _of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, d) for where, d in _all_docs() if isinstance(d, dict) and d.get("kind") == kind]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _string_leaves(doc: Any) -> Iterator[str]:
    """Every string in a document, except embedded YAML documents (walked as documents of their own)."""
    embedded = {id(text) for text in _embedded_texts(doc).values()}
    for node in _walk(doc):
        if isinstance(node, str) and id(node) not in embedded:
            yield node


def _runtime_envs() -> list[tuple[str, Any]]:
    """The runtime environments: the two files and every RayJob's runtimeEnvYAML."""
    envs = [(name, yaml.safe_load((CLUSTER / name).read_text()))
            for name in ("runtime_env.yaml", "local-runtime-env.yaml")]
    envs += [(f"{where} runtimeEnvYAML", yaml.safe_load(job["spec"]["runtimeEnvYAML"]))
             for where, job in _of_kind("RayJob") if "runtimeEnvYAML" in job["spec"]]
    return envs


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(where, d["spec"]) for where, d in _of_kind("RayCluster")]
    specs += [(f"{where} rayClusterSpec", d["spec"]["rayClusterSpec"]) for where, d in _of_kind("RayJob")
              if "rayClusterSpec" in d["spec"]]
    return specs


def _pod_templates(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]) for name, g in groups]


def _gpus(group: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get(GPU, 0))
               for c in group["template"]["spec"]["containers"])


# --- command lines -------------------------------------------------------------------------------

def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n[ \t#]*", " ", text).splitlines()


def _comment_text(text: str) -> str:
    """The full-line comments of a YAML file, without their '#'."""
    return "\n".join(re.sub(r"^\s*# ?", "", line) for line in text.splitlines() if line.lstrip().startswith("#"))


def _readme_code(text: str) -> str:
    return "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL))


def _tokens(text: str) -> list[str]:
    """Shell words up to the first operator (;, &&, |, ...) or comment."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in SHELL_OPERATORS:
            break
        words.append(word)
    return words


def _sources() -> list[tuple[str, str]]:
    """(where, text) of everything that may hold a command line."""
    out = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        out.append((f"{path.name} comments", _comment_text(path.read_text())))
    for where, doc in _all_docs():
        out.extend((where, s) for s in _string_leaves(doc))
    out.append(("README.md", _readme_code((CLUSTER / "README.md").read_text())))
    return out


def _job_commands() -> list[tuple[str, str, list[str]]]:
    """(where, job, arguments) of every `python [.../]jobs/JOB.py ARGS` in cluster/."""
    found = []
    for where, text in _sources():
        for line in _logical_lines(text):
            for m in re.finditer(r"\bpython3?\s+(?:\S*/)?jobs/(\w+)\.py(?=\s|$)(.*)", line):
                found.append((where, m.group(1), _tokens(m.group(2))))
    return found


def _submit_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every `ray job submit ARGS` in cluster/."""
    found = []
    for where, text in _sources():
        for line in _logical_lines(text):
            for m in re.finditer(r"\bray job submit\b(.*)", line):
                found.append((where, shlex.split(m.group(1), comments=True)))
    return found


JOB_COMMANDS = _job_commands()
SUBMIT_COMMANDS = _submit_commands()


def _parse_job(job: str, args: list[str], capsys) -> Any:
    assert (REPO / "jobs" / f"{job}.py").is_file(), f"jobs/{job}.py does not exist"
    try:
        return build_parser().parse_args([job, *args])
    except SystemExit:
        pytest.fail(f"clipsr {job} refuses {shlex.join(args)}: {capsys.readouterr().err.strip()}")


# --- the files -----------------------------------------------------------------------------------

def test_every_cluster_file_is_there_and_every_yaml_parses():
    assert EXPECTED <= {p.name for p in CLUSTER.iterdir()}
    for path in CLUSTER.glob("*.yaml"):
        docs = _yaml_docs(path)
        assert docs, f"{path.name} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path.name}: every document must be a mapping"
    for where, doc in _all_docs():
        if "apiVersion" in doc:
            assert doc.get("kind") and doc.get("metadata", {}).get("name"), f"{where}: kind and metadata.name"


def test_kuberay_resources_are_ray_io_v1_with_the_kinds_expected():
    kinds = {}
    for where, doc in _all_docs():
        if doc.get("kind") in ("RayJob", "RayCluster", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1", where
            kinds.setdefault(doc["kind"], []).append(where)
    assert "rayjob-nightly-enhance.yaml" in kinds["RayJob"]
    assert "cronjob-nightly-enhance.yaml#rayjob.yaml" in kinds["RayJob"]
    assert kinds["RayCluster"] == ["raycluster.yaml"]


def test_rayjobs_delete_their_cluster_and_have_a_deadline():
    for where, job in _of_kind("RayJob"):
        spec = job["spec"]
        assert set(spec) <= RAYJOB_SPEC, f"{where}: unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
        assert spec["entrypoint"].strip() and "rayClusterSpec" in spec, where
        assert spec["shutdownAfterJobFinishes"] is True, where
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0, where
        assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0, where
        mode = spec.get("submissionMode", "K8sJobMode")
        assert mode in SUBMISSION_MODES, where
        working_dir = yaml.safe_load(spec.get("runtimeEnvYAML", "{}")).get("working_dir", "")
        if working_dir and "://" not in working_dir:  # a path in the image: uploaded by the submitter pod
            assert mode == "K8sJobMode", f"{where}: a local working_dir needs the K8sJobMode submitter"


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=[w for w, _ in _cluster_specs()])
def test_ray_cluster_specs_use_known_fields_and_a_cpu_head(where, spec):
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, where
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP, where
    assert str(spec["rayVersion"]) == RAY_PIN, f"{where}: rayVersion must be pyproject's Ray pin {RAY_PIN}"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups), f"{where}: groupName must be unique"
    for g in [spec["headGroupSpec"], *groups]:
        assert set(g) <= HEAD_GROUP | WORKER_GROUP, where
        params = g["rayStartParams"]  # required by older KubeRay CRDs; a map of strings in all of them
        assert isinstance(params, dict) and all(isinstance(v, str) for v in params.values()), \
            f"{where}: rayStartParams values must be quoted strings, got {params}"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: keep work off the head"
    for g in groups:
        assert set(g) <= WORKER_GROUP, f"{where}: unknown worker group fields {set(g) - WORKER_GROUP}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]
    assert any(_gpus(g) for g in groups), f"{where}: no GPU worker group ({GPU} limit)"
    assert any(not _gpus(g) for g in groups), f"{where}: no CPU worker group for decode/encode"
    images = set()
    for name, template in _pod_templates(spec):
        containers = template["spec"]["containers"]
        assert containers and all(c.get("image") for c in containers), f"{where}/{name}: container image"
        images.add(containers[0]["image"])
    assert len(images) == 1, f"{where}: head and workers must run one image (one Ray version), got {images}"


def test_enhance_finds_gpus_when_it_starts():
    """enhance sizes its inference actors from the cluster's GPUs at start-up: a GPU must be there."""
    for where, spec in _cluster_specs():
        gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g)]
        assert sum(g["minReplicas"] for g in gpu_groups) >= 1, f"{where}: GPU workers may all be scaled away"
    for where, job in _of_kind("RayJob"):
        groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        total = sum(g.get("replicas", g["minReplicas"]) * _gpus(g) for g in groups)
        tokens = _tokens(job["spec"]["entrypoint"])
        args = build_parser().parse_args([Path(tokens[1]).stem, *tokens[2:]])
        if getattr(args, "actors", None):
            assert args.actors <= total, f"{where}: --actors {args.actors} but only {total} GPU(s): it would hang"


def test_every_ray_pod_gets_s3_credentials_by_reference():
    """Head and workers all read or write S3; their credentials come from a Secret or a role."""
    for where, spec in _cluster_specs():
        file = where.split()[0].split("#")[0]
        accounts = {d["metadata"]["name"]: d for d in _yaml_docs(CLUSTER / file) if d.get("kind") == "ServiceAccount"}
        for name, template in _pod_templates(spec):
            pod = template["spec"]
            account = pod.get("serviceAccountName")
            if account and account != "default":
                if account in accounts:
                    assert "eks.amazonaws.com/role-arn" in accounts[account]["metadata"].get("annotations", {}), \
                        f"{where}/{name}: ServiceAccount {account} has no IAM role"
                continue
            for c in pod["containers"]:
                refs = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
                from_secret = any("secretRef" in e for e in c.get("envFrom", []))
                assert from_secret or {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= refs, \
                    f"{where}/{name}: no S3 credentials by reference (secretKeyRef, envFrom or IRSA)"


def test_no_credential_is_written_inline():
    for where, doc in _all_docs():
        for node in _walk(doc):
            if not isinstance(node, dict):
                continue
            name = node.get("name")
            if isinstance(name, str) and "value" in node and CREDENTIAL.search(name):
                pytest.fail(f"{where}: {name} has a literal value; use valueFrom.secretKeyRef")
            for key, value in node.items():
                if isinstance(key, str) and CREDENTIAL.search(key) and key not in REFERENCE_KEYS \
                        and isinstance(value, (str, int)) and str(value):
                    pytest.fail(f"{where}: {key} is set inline")
    for path in CLUSTER.iterdir():
        text = path.read_text()
        for pattern in INLINE_SECRET_TEXT:
            assert not pattern.search(text), f"{path.name}: looks like an inline credential ({pattern.pattern})"


# --- runtime environments ------------------------------------------------------------------------

def test_runtime_envs_use_known_keys_and_hold_no_credentials():
    from ray.runtime_env import RuntimeEnv

    envs = _runtime_envs()
    assert len(envs) >= 3
    for where, env in envs:
        assert isinstance(env, dict), f"{where}: must be a mapping (ray job submit reads it as one)"
        assert set(env) <= RuntimeEnv.known_fields, f"{where}: unknown keys {set(env) - RuntimeEnv.known_fields}"
        assert not set(env) & DEPENDENCY_INSTALLERS, \
            f"{where}: dependencies come from the image or virtualenv, not per job ({set(env) & DEPENDENCY_INSTALLERS})"
        env_vars = env.get("env_vars", {})
        assert all(isinstance(v, str) for v in env_vars.values()), f"{where}: env_vars values must be strings"
        assert not [k for k in env_vars if CREDENTIAL.search(k)], \
            f"{where}: credentials in a runtime env end up in Ray's logs"


def test_runtime_envs_leave_the_virtualenv_and_outputs_behind_and_keep_the_code():
    # The matcher Ray applies to excludes when it zips a working_dir.
    from ray._private.runtime_env.packaging import _get_excludes

    reference = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())["excludes"]
    code = [p for d in ("clipsr", "jobs", "configs") for p in (REPO / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
    code += [REPO / "pyproject.toml", REPO / "clipsr" / "weights" / "default-x4.safetensors"]
    for where, env in _runtime_envs():
        assert sorted(env["excludes"]) == sorted(reference), f"{where}: excludes differ from runtime_env.yaml"
        excluded = _get_excludes(REPO, env["excludes"])
        for big in (".venv", ".venv/bin/python", ".git", ".git/HEAD", "runs/x/ckpt.pt",
                    "enhanced-samples/a.png", "clipsr/__pycache__/cli.cpython-311.pyc"):
            assert excluded(REPO / big), f"{where}: {big} would be uploaded"
        kept = [p for p in code if excluded(p)]
        assert not kept, f"{where}: would leave out code the job needs: {kept[:5]}"


# --- command lines -------------------------------------------------------------------------------

def test_command_lines_are_found_in_every_file():
    """The scan below finds the commands (a scan that finds nothing would check nothing)."""
    wheres = {w.split()[0].split("#")[0] for w, _, _ in JOB_COMMANDS}
    assert wheres == EXPECTED
    assert {job for _, job, _ in JOB_COMMANDS} == {"enhance", "adapt", "pretrain"}
    assert len(SUBMIT_COMMANDS) >= 6


@pytest.mark.parametrize("where,job,args", JOB_COMMANDS,
                         ids=[f"{w}:{j}:{i}" for i, (w, j, _) in enumerate(JOB_COMMANDS)])
def test_job_command_lines_are_accepted_by_clipsr(where, job, args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    ns = _parse_job(job, args, capsys)
    if job == "enhance":
        opts = EnhanceOptions.from_args(ns)
        opts.check()
        if opts.route or opts.route_map or opts.domain:  # routing reads the registry (enhance/routing.py)
            assert opts.models, f"{where}: routing needs --models REGISTRY"
    elif job == "adapt":
        assert ns.domain or ns.spec, f"{where}: adapt needs --domain NAME=URI or --spec"
    elif job == "pretrain":
        overrides = [*ns.set, *([f"name={ns.name}"] if ns.name else []),
                     *([f"storage_path={ns.storage_path}"] if ns.storage_path else [])]
        load_settings(ns.config, overrides)  # the settings schema rejects unknown or mistyped keys


@pytest.mark.parametrize("where,args", SUBMIT_COMMANDS,
                         ids=[f"{w}:{i}" for i, (w, _) in enumerate(SUBMIT_COMMANDS)])
def test_ray_job_submit_lines_use_real_options_and_files(where, args):
    import click
    from ray.dashboard.modules.job.cli import submit

    try:
        ctx = submit.make_context("submit", list(args))
    except click.ClickException as e:
        pytest.fail(f"{where}: ray job submit {shlex.join(args)}: {e.format_message()}")
    params = ctx.params
    assert params["working_dir"] == ".", f"{where}: submit the repository root (--working-dir .)"
    assert params["runtime_env"] and (REPO / params["runtime_env"]).is_file(), f"{where}: --runtime-env FILE"
    entrypoint = list(params["entrypoint"])
    assert entrypoint[0] == "python" and re.fullmatch(r"jobs/\w+\.py", entrypoint[1]), where


# --- the nightly CronJob -------------------------------------------------------------------------

def test_nightly_cronjob_never_overlaps_and_waits_for_its_rayjob():
    docs = _yaml_docs(CLUSTER / "cronjob-nightly-enhance.yaml")
    by_kind = {d["kind"]: d for d in docs}
    cron = by_kind["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert isinstance(cron["spec"]["startingDeadlineSeconds"], int) and cron["spec"]["startingDeadlineSeconds"] > 0
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]

    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]]
    (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
    (key,) = config_map["data"]
    rayjob = yaml.safe_load(config_map["data"][key])
    reference = yaml.safe_load((CLUSTER / "rayjob-nightly-enhance.yaml").read_text())
    assert rayjob["spec"] == reference["spec"], "the ConfigMap's RayJob drifted from rayjob-nightly-enhance.yaml"
    assert rayjob["metadata"]["labels"] == reference["metadata"]["labels"]
    placeholder = rayjob["metadata"]["name"]

    (script,) = [a for c in pod["containers"] for a in c.get("args", []) if "kubectl" in a]
    assert f"{mount['mountPath']}/{key}" in script and placeholder in script, "the script reads the ConfigMap"
    assert "jobDeploymentStatus" in script and "Complete" in script and "Failed" in script
    assert job["activeDeadlineSeconds"] > rayjob["spec"]["activeDeadlineSeconds"], \
        "the waiter must outlast the RayJob's own deadline"
    if shutil.which("sh"):
        check = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True, check=False)
        assert check.returncode == 0, check.stderr


def test_nightly_cronjob_rbac_is_least_privilege():
    docs = {d["kind"]: d for d in _yaml_docs(CLUSTER / "cronjob-nightly-enhance.yaml")}
    account = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert docs["ServiceAccount"]["metadata"]["name"] == account
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": docs["Role"]["metadata"]["name"]}
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", account)]
    for rule in docs["Role"]["rules"]:
        assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"], rule
        assert {"create", "get"} <= set(rule["verbs"]) <= {"create", "get", "list", "watch", "delete"}, rule


# --- the cluster launcher ------------------------------------------------------------------------

def test_aws_cluster_config_is_valid_for_the_ray_launcher():
    config = yaml.safe_load((CLUSTER / "aws-cluster.yaml").read_text())
    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    jsonschema.validate(config, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "keep work off the head"
    for name, node in types.items():
        # Without a profile on the head, Ray creates one with EC2 and S3 full access; workers need S3.
        assert "IamInstanceProfile" in node["node_config"], f"{name}: S3 through an instance profile"
        assert node.get("min_workers", 0) <= node.get("max_workers", config["max_workers"]), name
    workers = [n for k, n in types.items() if k != config["head_node_type"]]
    assert sum(n.get("min_workers", 0) for n in workers) <= config["max_workers"]
    assert any(re.match(r"(g|p)\d", n["node_config"]["InstanceType"]) and n.get("min_workers", 0) >= 1
               for n in workers), "a GPU worker must be up when enhance starts"
    assert f":{RAY_PIN}-" in config["docker"]["image"], "the image's Ray must be pyproject's pin"
    (remote,) = [r for r, local in config["file_mounts"].items() if local == "."]
    assert any(f"pip install {remote}" in cmd for cmd in config["setup_commands"]), "install the checkout"
