"""What a person sees: the messages of a refused start (and that it writes nothing), the failures
named above the summary, single-file input, a quiet Ray (pretraining's too), `registry show` and --help."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsr import storage
from clipsr.cli import build_parser, main
from clipsr.enhance.failure_list import LIMIT, FailureList

ROOT = Path(__file__).resolve().parents[1]
BICUBIC = ["--model", "bicubic", "--scale", "2"]
#: What Ray prints by itself on a driver's console: none of it may reach a quiet job's console.
RAY_NOISE = ("core_worker", "WARNING", "Token authentication", "Execution plan", "Starting execution",
             "Running Dataset", "Total Progress", "RayDeprecationWarning", "actor_locality", "Started a local Ray",
             "MapBatches", "streaming_executor")


def _png(seed: int, h: int = 8, w: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _enhance(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = main(["enhance", *argv])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- a refused start names the problem and the fix, and writes nothing ------------------------


@pytest.fixture
def folder(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "brick.png").write_bytes(_png(0))
    return inp


@pytest.mark.parametrize("case", ["missing input", "output is a file", "manifest is a file",
                                  "output is the file's folder", "x2 asked of the x4 model", "bad fraction"])
def test_a_refused_start_says_why_and_writes_nothing(tmp_path, folder, capsys, case):
    (tmp_path / "taken.txt").write_text("a file, not a folder")
    out = tmp_path / "out"
    args = {
        "missing input": ["--input", str(tmp_path / "nope"), "--output", str(out), *BICUBIC],
        "output is a file": ["--input", str(folder), "--output", str(tmp_path / "taken.txt"), *BICUBIC],
        "manifest is a file": ["--input", str(folder), "--output", str(out), "--manifest",
                               str(tmp_path / "taken.txt"), *BICUBIC],
        "output is the file's folder": ["--input", str(folder / "brick.png"), "--output", str(folder), *BICUBIC],
        "x2 asked of the x4 model": ["--input", str(folder), "--output", str(out), "--scale", "2"],
        "bad fraction": ["--input", str(folder), "--output", str(out), "--max-failed-fraction", "2", *BICUBIC],
    }[case]
    expected = {
        "missing input": f"--input {tmp_path / 'nope'}: no such file, and no files below it",
        "output is a file": f"--output {tmp_path / 'taken.txt'} is a file; give a folder",
        "manifest is a file": f"--manifest {tmp_path / 'taken.txt'} is a file; give a folder",
        "output is the file's folder": "the output would replace the input; choose another --output",
        "x2 asked of the x4 model": "is a x4 model, but x2 was asked for (--scale 2); for x2 use --model default-x2",
        "bad fraction": "--max-failed-fraction must be in [0, 1], got 2.0",
    }[case]
    before = _tree(tmp_path)
    code, lines, err = _enhance(capsys, *args)
    assert code == 1 and lines[-1].endswith("(exit 1)") and expected in lines[-1], lines
    assert "partial manifest" not in lines[-1] and "Errno" not in lines[-1] and "Traceback" not in err
    assert _tree(tmp_path) == before  # no output folder, no _index, no lock, no manifest


def test_an_object_store_prefix_without_objects_is_refused_and_nothing_written(s3_bucket, capsys):
    storage.write_bytes_atomic(f"{s3_bucket}/scans/a.png", _png(0))
    code, lines, _ = _enhance(capsys, "--input", f"{s3_bucket}/scan", "--output", f"{s3_bucket}/out", *BICUBIC)
    assert code == 1 and f"--input {s3_bucket}/scan: no such file, and no files below it" in lines[-1]
    assert [info.key for info in storage.iter_objects(s3_bucket)] == ["scans/a.png"]


def test_a_run_stopped_after_the_lock_names_no_manifest_that_does_not_exist(tmp_path, folder, capsys):
    out = tmp_path / "out"
    (out / "_index").mkdir(parents=True)
    (out / "_index" / "index.json").write_text(json.dumps({"version": 99}))  # written by a newer clipsr
    code, lines, _ = _enhance(capsys, "--input", str(folder), "--output", str(out), *BICUBIC)
    assert code == 1 and "unsupported index version 99" in lines[-1], lines
    assert "partial manifest" not in lines[-1] and not (out / "_manifests").exists()
    assert not (out / "_lock").exists()


# --- the failures named ------------------------------------------------------------------------


def test_the_failure_list_names_the_first_ones_then_counts_the_rest():
    failures = FailureList()
    for i in range(LIMIT + 5):
        failures.add({"input_key": f"bad{i:02d}.png", "status": "failed", "error": "empty file (0 bytes)"})
    failures.add({"input_key": "raw.cr2", "status": "unsupported", "error": "camera raw: not decoded"})
    failures.add({"input_key": "old.png", "status": "failed", "error": "carried forward from run R: x",
                  "carried_forward": True})
    failures.add({"input_key": "SOURCES.md", "status": "skipped",
                  "error": "not an image file name (.md): not an input"})
    failures.add({"input_key": "a.png", "status": "skipped", "error": "unchanged since run R: same size"})
    failures.add({"input_key": "b.png", "status": "ok", "error": None})
    lines = failures.lines("s3://m/run=R/")
    assert lines[0] == f"failed or unsupported ({LIMIT + 6}):"
    named = [line for line in lines if line.startswith("  bad")]
    assert named == [f"  bad{i:02d}.png: empty file (0 bytes)" for i in range(LIMIT)]
    assert "  ... and 6 more in the manifest s3://m/run=R/" in lines
    assert "1 failed input(s) carried forward unread from earlier runs" in lines[-2]
    assert lines[-1] == "skipped as not inputs (1): SOURCES.md"
    assert FailureList().lines() == []


def test_a_dry_run_names_the_failures_it_can_foresee(tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "good.png").write_bytes(_png(0))
    (inp / "zero.jpg").write_bytes(b"")
    (inp / "raw.cr2").write_bytes(b"raw bytes")
    (inp / "big.png").write_bytes(_png(1, 64, 64))
    (inp / "notes.md").write_text("sources")
    os.close(os.open(os.fsencode(inp) + b"/bad\xff.png", os.O_CREAT | os.O_WRONLY))  # not valid UTF-8
    code, lines, _ = _enhance(capsys, "--input", str(inp), "--output", str(tmp_path / "out"), *BICUBIC,
                              "--max-input-bytes", "1000", "--dry-run")
    assert code == 0
    assert "6 listed: would process 1 (1 with bicubic), skip 1, fail 3, unsupported 1" in lines[-1]
    assert lines[0] == "would fail (4):"
    named = {line.split(":", 1)[0].strip(): line for line in lines[1:5]}
    assert set(named) == {"bad\\xff.png", "big.png", "raw.cr2 (unsupported)", "zero.jpg"}
    assert named["zero.jpg"].endswith("empty file (0 bytes)")
    assert "more than --max-input-bytes=1,000" in named["big.png"]
    assert "unsafe key" in named["bad\\xff.png"]
    assert lines[5] == "skipped as not inputs (1): notes.md"
    assert not (tmp_path / "out").exists()


# --- single-file input, and a run that names its failures with Ray kept quiet ----------------


@pytest.mark.slow
def test_a_single_file_is_an_input_keyed_by_its_name(ray_local, tmp_path, folder, capsys):
    (folder / "other.png").write_bytes(_png(1))
    out = folder / "enhanced"  # beside the file: only the file itself is listed
    code, lines, _ = _enhance(capsys, "--input", str(folder / "brick.png"), "--output", str(out), *BICUBIC)
    assert code == 0 and "1 listed, 1 ok, 0 failed, 0 skipped" in lines[-1], lines
    with Image.open(out / "brick.png") as im:
        assert im.size == (20, 16)
    assert not (out / "other.png").exists()
    code, lines, _ = _enhance(capsys, "--input", str(folder / "brick.png"), "--output", str(out), *BICUBIC)
    assert code == 0 and "1 listed, 0 ok, 0 failed, 1 skipped" in lines[-1]  # reruns skip it like any input


@pytest.mark.slow
def test_a_run_names_its_failures_shows_plain_progress_and_keeps_ray_quiet(tmp_path):
    """In its own process, as a person runs it (stderr a pipe, not a terminal): Ray started by the job."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        (inp / f"good{i}.png").write_bytes(_png(i))
    (inp / "fake.png").write_text("a text file renamed .png")
    (inp / "zero.jpg").write_bytes(b"")
    (inp / "SOURCES.md").write_text("where the images come from")
    env = {**os.environ, "CLIPSR_LOG_DIR": str(tmp_path / "logs"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "clipsr.cli", "enhance", "--input", str(inp), "--output",
                           str(tmp_path / "out"), *BICUBIC], env=env, capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert lines[0] == "failed or unsupported (2):"
    assert lines[1].startswith("  fake.png: not a supported image")
    assert lines[2] == "  zero.jpg: empty file (0 bytes)"
    assert lines[3] == "skipped as not inputs (1): SOURCES.md"
    assert "5 listed, 2 ok, 2 failed, 1 skipped" in lines[-1] and lines[-1].endswith("(exit 2)")
    progress = [line for line in done.stderr.splitlines() if line.startswith("clipsr enhance: ")]
    assert progress and progress[-1].startswith("clipsr enhance: 4/4 images (100%), ok 2, failed 2")
    assert all(re.match(r"clipsr enhance: [1-4]/4 images", line) for line in progress)
    assert "\r" not in done.stderr  # plain lines, not a terminal's live line
    for noise in RAY_NOISE:
        assert noise not in done.stdout + done.stderr, noise
    log_file = Path(re.search(r"Ray's log: (\S+) \(exit", lines[-1]).group(1))
    assert log_file.parent == tmp_path / "logs"
    ray_lines = log_file.read_text()
    assert "Started a local Ray instance" in ray_lines and "Ray's session logs" in ray_lines
    assert "has constructor arguments in the object store" in ray_lines  # Ray's native core, sent there too


@pytest.mark.slow
def test_pretrain_shows_its_step_lines_and_not_ray_trains_reports(tmp_path):
    """The training worker's step lines are the progress; Ray Train's INFO lines (each report with
    its metrics dict, the worker group, each checkpoint) stay off the console unless --verbose."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(_png(i, 40, 40))
    env = {**os.environ, "CLIPSR_LOG_DIR": str(tmp_path / "logs"), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    sets = [f"storage_path={tmp_path / 'runs'}", f"data.train=[{data}]", "data.val={}", "model.arch=cdasr-tiny",
            "model.scale=2", "batch.size=2", "batch.lr_patch=12", "optim.steps=4", "optim.warmup=1",
            "checkpoint.every=2", "validation.log_every=2", "episodes.enabled=false",
            "scaling.cpus_per_worker=1", "scaling.torch_threads=1"]
    done = subprocess.run([sys.executable, "-m", "clipsr.cli", "pretrain", "--name", "quiet",
                           *[a for kv in sets for a in ("--set", kv)]],
                          env=env, capture_output=True, text=True, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console
    assert re.search(r"step 2/4 loss", console) and re.search(r"step 4/4 loss", console)
    assert "pretrain: run quiet finished: model cdasr-tiny-x2-" in done.stdout
    for noise in ("Reporting training result", "Requesting resources", "Started training worker group",
                  "Checkpoint successfully created"):
        assert noise not in console, noise


def test_quiet_ray_output_goes_to_the_file_and_comes_back(tmp_path):
    """Descriptor 2 (native code) and Ray's loggers to the file, Python's stderr on the console."""
    script = f"""
import logging, os, sys, warnings
from clipsr import ray_logs
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
ray_logger = logging.getLogger("ray")
ray_logger.addHandler(logging.StreamHandler(sys.stderr)); ray_logger.propagate = False
path = ray_logs.start({str(tmp_path / "ray.log")!r})
os.write(2, b"native line\\n")
logging.getLogger("ray.data").warning("ray warning")
logging.getLogger("clipsr.x").info("job line")
print("progress line", file=sys.stderr)
exec(compile("warnings.warn('pool note')", os.path.join("site-packages", "ray", "data", "x.py"), "exec"))
warnings.warn("job warning")
ray_logs.stop()
os.write(2, b"native after\\n")
ray_logger.warning("ray after")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("  ")]  # a warning's source line
    assert lines == ["clipsr.x: job line", "progress line", "<string>:13: UserWarning: job warning",
                     "native after", "ray after"]
    logged = (tmp_path / "ray.log").read_text()
    assert "native line" in logged and "ray warning" in logged and "UserWarning: pool note" in logged
    assert "job line" not in logged and "progress line" not in logged and "after" not in logged


# --- registry show and --help ------------------------------------------------------------------


def test_registry_show_puts_lineage_and_scores_first_and_sums_up_the_centroid(tmp_path, capsys):
    from clipsr.registry import Registry

    reg = Registry(str(tmp_path / "registry"))
    centroid = np.random.default_rng(0).normal(size=512).astype(np.float32)
    entry = {"model": {"id": "cdasr-x4-0123456789ab", "kind": "delta", "weights_sha256": "d" * 64},
             "source_model": {"id": "cdasr-x4-fedcba987654", "spec": "default-x4", "weights_sha256": "a" * 64},
             "clip_encoder": None, "centroid_encoder": {"arch": "color-stats", "sha256": "e" * 64},
             "exemplars": [{"uri": f"s3://data/manga/{i:03d}.png", "sha256": "b" * 64} for i in range(10)],
             "settings": {"steps": 40, "lr": 1e-3}, "scores": {"gain_db": 0.8, "selection_curve": [1.0, 2.0]},
             "seconds": 95.5, "code_revision": "0123abc", "reason": "beats the source model by +0.80 dB"}
    reg.publish("manga", b"weights", entry, centroid=centroid / np.linalg.norm(centroid), promote=True)
    assert main(["registry", "show", f"{tmp_path}/registry/manga"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == f"{tmp_path}/registry/manga/v1: current; promoted when published: yes"
    assert len(lines) == 10 and len(text) < 1500  # the 512 numbers alone take about 10,000 characters as JSON
    assert "  scores        gain_db 0.8, selection_curve [2 values]" in lines
    assert "  exemplars     10: s3://data/manga/000.png ... s3://data/manga/009.png" in lines
    assert "  source model  id cdasr-x4-fedcba987654, spec default-x4, weights_sha256 aaaaaaaaaaaa..." in lines
    assert lines[-1] == ("  centroid      512 numbers, norm 1.000, encoder color-stats (sha256 eeeeeeeeeeee...) "
                         "(--json prints them)")
    assert main(["registry", "show", f"{tmp_path}/registry/manga/v1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["centroid"]) == 512 and doc["scores"]["selection_curve"] == [1.0, 2.0]


def _parsers(parser: argparse.ArgumentParser, name: str = "clipsr"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_has_plain_help():
    for name, parser in _parsers(build_parser()):
        for text in (parser.description, parser.format_help()):
            assert "``" not in (text or ""), name
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (name, action.option_strings or action.dest)


def test_verbose_is_accepted_after_the_subcommand_too():
    parser = build_parser()
    assert parser.parse_args(["enhance", "--input", "a", "--output", "b", "--verbose"]).verbose is True
    assert parser.parse_args(["-v", "enhance", "--input", "a", "--output", "b"]).verbose is True
    assert parser.parse_args(["enhance", "--input", "a", "--output", "b"]).verbose is False
