"""The enhancement stages called in-process (what each Ray task or actor runs), and routing."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pytest
import tifffile
import torch
from PIL import Image

from clipsr import imaging
from clipsr.config import validate
from clipsr.enhance import manifest
from clipsr.enhance import rows as R
from clipsr.enhance.decode import decode_batch
from clipsr.enhance.infer import InferStage
from clipsr.enhance.manifest import ManifestWriter
from clipsr.enhance.pipeline import plan_resources
from clipsr.enhance.routing import (
    ModelRef,
    PrefixRouter,
    RegistryUnavailableError,
    build_router,
    load_route_map,
    resolve_model,
)
from clipsr.enhance.write import write_batch
from clipsr.factory import create_model, save_checkpoint
from clipsr.provenance import REVISION_ENV, code_revision
from clipsr.ray_runtime import worker_env

RUN = "20261126T221500Z-abc123"


def _png(array, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with almost no data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _plan_rows(tmp_path, files: dict[str, bytes], model: tuple[str, str], fmt: dict[str, str] | None = None):
    rows = []
    for name, data in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
        out_fmt = (fmt or {}).get(name) or imaging.format_for_path(name)
        rows.append({"input_key": name, "input_uri": str(tmp_path / "in" / name),
                     "output_uri": str(tmp_path / "out" / name), "output_format": out_fmt,
                     "input_size": len(data), "input_etag": None, "input_mtime_ms": 0, "scale": 2,
                     "domain": "default", "model_spec": model[0], "model_id": model[1],
                     "model_version": None, "route_similarity": None, "clip_encoder": None})
    return pa.Table.from_pylist(rows, schema=R.PLAN)


def _by_key(table):
    return {r["input_key"]: r for r in table.to_pylist()}


def test_decode_records_why_an_input_cannot_be_read(tmp_path, tiny):
    rgb = np.random.default_rng(0).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    files = {"good.png": _png(rgb), "zero.png": b"", "text.jpg": b"hello", "trunc.png": _png(rgb)[:60],
             "bomb.png": _bomb_png(5000, 5000), "gone.png": _png(rgb)}
    table = _plan_rows(tmp_path, files, tiny)
    (tmp_path / "in" / "gone.png").unlink()
    out = _by_key(decode_batch(table, max_output_pixels=4_000_000))
    assert out["good.png"]["status"] is None and out["good.png"]["input_sha256"].startswith("sha256:")
    assert R.unpack(out["good.png"]["lr"]).dtype == np.uint8 and out["good.png"]["sharpness_bicubic"] > 0
    assert out["zero.png"]["error"] == "empty file (0 bytes)"
    assert out["text.jpg"]["error"].startswith("not a supported image")
    assert "corrupt" in out["trunc.png"]["error"] or "unreadable" in out["trunc.png"]["error"]
    assert out["bomb.png"]["error"].startswith("output too large: x2 would exceed --max-output-pixels=4,000,000")
    assert "5000x5000" in out["bomb.png"]["error"] and out["bomb.png"]["lr"] is None
    assert out["gone.png"]["error"] == "input not found: deleted since it was listed"
    assert all(r["output_uri"] is None for k, r in out.items() if k != "good.png")


def test_stages_in_order_write_outputs_in_kind_and_valid_manifest_rows(tmp_path, tiny):
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65535, (5, 7), dtype=np.uint16)
    rgba = rng.integers(0, 255, (6, 5, 4), dtype=np.uint8)
    files = {"rgb.png": _png(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)),
             "grey16.png": _png(grey16), "rgba.png": _png(rgba), "rgba-as-jpeg.png": _png(rgba)}
    table = _plan_rows(tmp_path, files, tiny, fmt={"rgba-as-jpeg.png": "JPEG"})
    stage = InferStage(threads=1)
    out = write_batch(stage(decode_batch(table, max_output_pixels=10**8)))
    rows = _by_key(out)
    assert {r["status"] for r in rows.values()} == {"ok"}, [r["error"] for r in rows.values()]
    assert all(r[p] is None for r in rows.values() for p in R.PAYLOADS)
    d = imaging.decode((tmp_path / "out" / "grey16.png").read_bytes())
    assert (d.height, d.width, d.bit_depth, d.pixels.shape[2]) == (10, 14, 16, 1)
    assert rows["grey16.png"]["output_bit_depth"] == 16
    d = imaging.decode((tmp_path / "out" / "rgba.png").read_bytes())
    assert d.alpha is not None and d.alpha.shape == (12, 10)
    jpeg = (tmp_path / "out" / "rgba-as-jpeg.png").read_bytes()
    assert jpeg[:2] == b"\xff\xd8" and "alpha composited onto white" in rows["rgba-as-jpeg.png"]["notes"]
    assert rows["rgb.png"]["infer_s"] > 0 and 0 <= rows["rgb.png"]["clipping_ratio"] <= 1
    assert rows["rgb.png"]["sharpness_gain"] == pytest.approx(
        rows["rgb.png"]["sharpness_output"] / rows["rgb.png"]["sharpness_bicubic"])
    writer = ManifestWriter(RUN, str(tmp_path / "manifest"))
    assert writer.add(out) == {"ok": 4} and not writer.parts  # under a part's rows and seconds: buffered
    assert len(writer.close()) == 1
    (part,) = manifest.iter_parts(str(tmp_path / "manifest"))
    written = manifest.read_part(part).to_pylist()
    for row in written:
        validate(manifest.json_row(row), "manifest")
    assert {r["output_width"] for r in written} == {16, 10, 14}


def test_rows_travel_between_the_stages_in_their_decode_groups(tmp_path, tiny):
    from clipsr.enhance.decode import decode_groups
    from clipsr.enhance.infer import InferGroups
    from clipsr.enhance.write import write_groups

    rng = np.random.default_rng(2)
    files = {f"{i}.png": _png(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)) for i in range(5)}
    files["broken.png"] = b"not an image"
    plan = _plan_rows(tmp_path, files, tiny)
    out = write_groups(InferGroups(threads=1)(decode_groups(R.group(plan, [2, 3, 1]), max_output_pixels=10**8)))
    table, lengths = R.ungroup(out, R.WORK)
    assert lengths == [2, 3, 1]  # every group keeps its rows, in order, failed ones included
    assert table.column("input_key").to_pylist() == list(files)
    assert table.column("status").to_pylist() == ["ok"] * 5 + ["failed"]
    assert all((tmp_path / "out" / f"{i}.png").exists() for i in range(5))


def test_exif_is_kept_where_the_output_format_can_hold_it_and_noted_where_not(tmp_path, tiny):
    rng = np.random.default_rng(2)
    exif = Image.Exif()
    exif[0x013B] = "An Archivist"  # Artist
    exif.get_ifd(0x8769)[0x9003] = "1999:12:31 23:59:59"  # DateTimeOriginal
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).save(jpeg, "JPEG", exif=exif.tobytes())
    tiff16 = io.BytesIO()
    tifffile.imwrite(tiff16, rng.integers(0, 65535, (6, 8, 3), dtype=np.uint16), photometric="rgb",
                     extratags=[(315, "s", 0, "An Archivist", True)])
    files = {"scan16.tif": tiff16.getvalue(), "photo.jpg": jpeg.getvalue(), "photo-as-bmp.jpg": jpeg.getvalue()}
    table = _plan_rows(tmp_path, files, tiny, fmt={"photo-as-bmp.jpg": "BMP"})
    rows = _by_key(write_batch(InferStage(threads=1)(decode_batch(table, max_output_pixels=10**8))))
    assert {r["status"] for r in rows.values()} == {"ok"}, [r["error"] for r in rows.values()]
    kept = {}
    for name in ("scan16.tif", "photo.jpg"):
        kept[name] = Image.Exif()
        kept[name].load(imaging.decode((tmp_path / "out" / name).read_bytes()).exif)
        assert kept[name][0x013B] == "An Archivist" and not rows[name]["notes"]
    assert kept["photo.jpg"].get_ifd(0x8769)[0x9003] == "1999:12:31 23:59:59"
    assert rows["scan16.tif"]["output_bit_depth"] == 16
    assert rows["photo-as-bmp.jpg"]["notes"] == "EXIF dropped (BMP has no place for it)"


def test_small_images_of_one_size_go_through_the_network_together(tmp_path, tiny):
    rng = np.random.default_rng(4)
    files = {f"s{i}.png": _png(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)) for i in range(5)}
    files["grey.png"] = _png(rng.integers(0, 255, (12, 10), dtype=np.uint8))  # same size, one channel
    files["other.png"] = _png(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8))  # another size
    decoded = decode_batch(_plan_rows(tmp_path, files, tiny), max_output_pixels=10**8)
    stage = InferStage(threads=1, precision="fp32")
    calls: list[int] = []
    stage.upscaler(tiny[0], 2).model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batched = _by_key(stage(decoded))
    assert sorted(calls) == [1, 6]  # one pass for the six 12x10 images, one for the 9x7 one
    for row in R.from_table(decoded):  # each on its own gives the same 8-bit output
        stage.upscale_row(row)
        alone, together = R.unpack(row["sr"]), R.unpack(batched[row["input_key"]]["sr"])
        assert alone.shape == together.shape and np.abs(alone.astype(int) - together.astype(int)).max() <= 1
    assert R.unpack(batched["grey.png"]["sr"]).shape == (24, 20, 1)
    assert {r["precision"] for r in batched.values()} == {"fp32"}


def test_bf16_on_the_cpu_agrees_with_fp32_and_rows_say_which_ran(tmp_path):
    from clipsr.factory import load_upscaler
    from clipsr.inference import resolve_precision

    torch.manual_seed(0)
    path = str(tmp_path / "lite-x4.safetensors")
    save_checkpoint(path, create_model("cdasr-lite", 4), "cdasr-lite")
    yy, xx = np.mgrid[0:48, 0:40] / 48
    lr = np.stack([np.sin(9 * xx + c) * np.cos(7 * yy) for c in range(3)], -1).astype(np.float32) * 0.4 + 0.5
    outs = {}
    for precision in ("fp32", "bf16"):
        up = load_upscaler(path, 4, precision=precision)
        outs[precision] = imaging.to_uint8(up.upscale(lr)).astype(np.float64)
        assert up.last_precision == precision
    mse = np.mean((outs["fp32"] - outs["bf16"]) ** 2)
    assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 45
    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("auto", "cpu") == ("bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32")
    with pytest.raises(ValueError, match="fp16 inference is only supported on GPU"):
        load_upscaler(path, 4, precision="fp16")


def test_inference_failures_are_rows_not_crashes(tmp_path, tiny):
    files = {"a.png": _png(np.zeros((6, 6, 3), np.uint8)), "b.png": _png(np.zeros((6, 6, 3), np.uint8))}
    table = decode_batch(_plan_rows(tmp_path, files, tiny), max_output_pixels=10**8)
    timed_out = _by_key(InferStage(image_timeout=1e-9)(table))
    assert {r["error"] for r in timed_out.values()} == {"inference stopped: over the per-image time limit of 1e-09 s"}
    stale = R.from_table(table)
    for row in stale:
        row["model_id"] = "cdasr-tiny-x2-000000000000"
    changed = _by_key(InferStage()(R.to_table(stale)))
    assert all("not the cdasr-tiny-x2-000000000000 the run was planned with" in r["error"] for r in changed.values())
    missing = R.from_table(table)
    missing[0]["model_spec"] = str(tmp_path / "no-such-model.safetensors")
    assert R.to_table(missing).num_rows == 2
    result = InferStage()(R.to_table(missing)).to_pylist()
    assert result[0]["error"].startswith("inference failed: FileNotFoundError") and result[1]["status"] is None


def test_one_small_machine_gives_its_one_actor_every_usable_cpu():
    two = plan_resources([{"CPU": 2.0}])
    assert (two.device, two.max_actors, two.threads) == ("cpu", 1, 2)
    assert two.actor_cpus + two.task_cpus <= 2.0
    assert two.io_tasks == 2  # never fewer, so decoding and writing overlap each other and inference
    one = plan_resources([{"CPU": 1.0}])
    assert (one.max_actors, one.threads) == (1, 1) and one.actor_cpus + one.task_cpus <= 1.0


def test_the_pool_grows_with_the_cluster_and_leaves_every_node_room_for_io():
    nodes = [{"CPU": 0.0, "memory": 1e9}] + [{"CPU": 16.0}] * 4  # a head without CPUs, four workers
    res = plan_resources(nodes)
    assert res.threads == 1 and res.actor_cpus == 1.0
    assert res.min_actors == res.max_actors == 4 * 14
    assert res.max_actors * res.actor_cpus <= 64 - 4 * 2  # an eighth of every node left to the I/O tasks
    assert res.io_tasks == 2 * 8  # two decode (and two write) tasks at once per CPU left free
    tiny = plan_resources([{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}])
    assert tiny.max_actors == 3  # one actor per one-CPU node, beside a decode or write task
    assert tiny.actor_cpus + 4 * tiny.task_cpus <= 1.0 and 2 * tiny.actor_cpus > 1.0 - 4 * tiny.task_cpus
    grow = plan_resources(nodes, max_actors=200)
    assert (grow.min_actors, grow.max_actors) == (56, 200)  # pending actors ask an autoscaler for nodes
    assert grow.io_tasks > res.io_tasks  # the I/O tasks may grow with the pool
    fixed = plan_resources(nodes, actors=3, threads=4)
    assert (fixed.min_actors, fixed.max_actors, fixed.threads, fixed.actor_cpus) == (3, 3, 4, 4.0)
    crowded = plan_resources([{"CPU": 2.0}], actors=3)  # more actors than a node holds: they share it
    assert crowded.max_actors == 3 and 3 * crowded.actor_cpus <= 2.0 - crowded.task_cpus


def test_gpu_clusters_get_one_actor_per_gpu_or_several_sharing_one():
    gpus = plan_resources([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert (gpus.device, gpus.max_actors, gpus.actor_gpus) == ("cuda", 2, 1.0)
    shared = plan_resources([{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], actors_per_gpu=3)
    assert (shared.max_actors, shared.actor_gpus) == (6, pytest.approx(1 / 3))
    assert 3 * shared.actor_cpus + shared.task_cpus <= 8.0
    cpu_only = plan_resources([{"CPU": 8.0, "GPU": 1.0}], device="cpu")
    assert cpu_only.device == "cpu" and cpu_only.actor_gpus == 0
    with pytest.raises(ValueError, match="no GPU"):
        plan_resources([{"CPU": 2.0}], device="cuda")
    with pytest.raises(ValueError, match="--actors must be at least 1"):
        plan_resources([{"CPU": 2.0}], actors=0)


def test_short_runs_are_cut_into_groups_enough_for_every_actor():
    from clipsr.enhance.pipeline import rows_per_group

    assert rows_per_group(16, 2000, actors=1) == 16  # a long run: one inference call's rows
    assert rows_per_group(16, 64, actors=2) == 8  # 8 groups: 4 for each actor
    assert rows_per_group(16, 5, actors=3) == 1
    assert rows_per_group(16, None, actors=3) == 16


def test_gpus_are_asked_for_only_where_an_autoscaler_can_bring_them():
    from clipsr.enhance.autoscale import gpus_to_request

    # GPU node types configured (up to 8 GPUs), none up yet: ask for the pool's GPUs
    assert gpus_to_request("auto", 0, 8, joined=True) == 1
    assert gpus_to_request("cuda", 0, 8, joined=True, max_actors=6, actors_per_gpu=2) == 3
    assert gpus_to_request("auto", 0, 8, joined=True, actors=20) == 8  # no more than the node types allow
    # --device cuda on a cluster that publishes no autoscaling config: ask, it may still come
    assert gpus_to_request("cuda", 0, None, joined=True, actors=2) == 2
    # nothing to ask for: a GPU is up, CPUs were chosen, no GPU node type, auto without a config,
    # or a Ray this driver started (no autoscaler)
    assert gpus_to_request("auto", 1, 8, joined=True) == 0
    assert gpus_to_request("cpu", 0, 8, joined=True) == 0
    assert gpus_to_request("cuda", 0, 0, joined=True) == 0
    assert gpus_to_request("auto", 0, None, joined=True) == 0
    assert gpus_to_request("cuda", 0, None, joined=False) == 0


def test_task_stages_do_not_import_torch():
    """Ray imports a task function's module in every worker: torch there costs ~400 MB a worker."""
    code = ("import sys, clipsr.enhance.plan, clipsr.enhance.decode, clipsr.enhance.write, "
            "clipsr.enhance.manifest, clipsr.enhance.autoscale; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_workers_get_the_storage_endpoint_but_never_credentials(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                        "AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret",
                        "AWS_SESSION_TOKEN": "token"}.items():
        monkeypatch.setenv(name, value)
    # Ray writes runtime_env values into its logs: only what is not a secret may go there. The
    # driver's code revision goes too: workers have no git checkout to find it in.
    assert worker_env() == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                            REVISION_ENV: code_revision()}
    # Under `ray job submit` the job's runtime env may set one of them already: Ray refuses a
    # ray.init that sets it again, so the driver leaves it to the job's.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1", REVISION_ENV: "0123abc"}}}))
    assert worker_env() == {"AWS_ENDPOINT_URL": "http://minio:9000"}


# --- routing ---------------------------------------------------------------------------------


def _ref(name):
    return ModelRef(spec=f"/models/{name}.safetensors", id=f"{name}-id", scale=4, version="3")


def test_prefix_routes_pick_the_longest_match_and_keep_the_source_model_elsewhere(tmp_path):
    route_map = tmp_path / "routes.yaml"
    route_map.write_text("scans/: newspapers\nscans/maps/: maps\n")
    source = _ref("source")
    router = build_router(source, route_map=str(route_map), resolve=lambda registry, domain: _ref(domain))
    assert router.route("scans/maps/a.png").domain == "maps"
    assert router.route("scans/b.png").model.id == "newspapers-id"
    other = router.route("photos/c.png")
    assert (other.domain, other.model) == ("default", source)
    backfill = build_router(source, domain="maps", resolve=lambda registry, domain: _ref(domain))
    assert backfill.route("anything.png").model.version == "3"
    assert isinstance(router, PrefixRouter)


def test_registry_routing_says_what_is_missing(tmp_path):
    source = _ref("source")
    with pytest.raises(RegistryUnavailableError, match="--route auto needs --models REGISTRY"):
        build_router(source, route="auto")
    with pytest.raises(RegistryUnavailableError, match="needs --models REGISTRY"):
        build_router(source, domain="maps")
    with pytest.raises(RegistryUnavailableError, match="no current version"):
        build_router(source, registry=str(tmp_path / "empty-registry"), domain="maps")
    assert build_router(source).route("x.png").model == source


def test_route_maps_are_validated(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"/abs/": "x"}')
    with pytest.raises(ValueError, match="relative to --input"):
        load_route_map(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping of key prefix"):
        load_route_map(str(bad))
    bad.write_text('{"scans/": "no spaces allowed"}')
    with pytest.raises(ValueError, match="route-map.*does not match"):
        load_route_map(str(bad))
    bad.write_text("scans/1890/: newspapers\ncomics/: manga\n")
    assert load_route_map(str(bad)) == {"scans/1890/": "newspapers", "comics/": "manga"}


def test_models_are_identified_from_the_checkpoint_header(tiny):
    ref = resolve_model(tiny[0], None)
    assert (ref.id, ref.scale, ref.clip_encoder) == (tiny[1], 2, None)
    with pytest.raises(ValueError, match="x2 model"):
        resolve_model(tiny[0], 4)
    assert resolve_model("bicubic", 3).id == "bicubic"
    with pytest.raises(ValueError, match="needs --scale"):
        resolve_model("bicubic", None)
