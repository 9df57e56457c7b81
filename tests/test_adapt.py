"""Few-shot adaptation: parallel domains on a local Ray, failures isolated, results in the registry."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from clipsr import storage
from clipsr.adapt.fast import adapt_domain
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.spec import DomainSpec
from clipsr.factory import create_model, load_checkpoint, save_checkpoint
from clipsr.models.checkpoint import CheckpointError
from clipsr.provenance import code_revision

SETTINGS = AdaptSettings(candidates=(("adaptive+bias", 1e-3),), steps=16, batch=2, lr_patch=12, holdout=1,
                         budget_seconds=600)


def _png(seed: int, grey: bool = False, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin((3 + c + seed % 3) * np.pi * (xx + c * yy)) for c in range(3)], -1) * 0.4 + 0.5
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    arr = (img * 255).astype(np.uint8)
    pil = Image.fromarray(arr[..., 0] if grey else arr)
    buf = io.BytesIO()
    pil.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def source(tiny_checkpoint):
    return tiny_checkpoint


def _domain(root, name: str, n: int = 4, grey: bool = False, size: int = 40) -> str:
    for i in range(n):
        storage.write_bytes_atomic(f"{root}/{name}/{i:02d}.png", _png(i + 10 * len(name), grey, size))
    return f"{root}/{name}"


def test_adapt_domain_stores_only_what_changed(source, tmp_path):
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    result = adapt_domain(model, meta, shots, SETTINGS)
    # 4 steps at a constant rate (a quarter of the steps), then 12 decaying ones; the held-out shot
    # is never trained on, and scores the weights returned after their last step; with one
    # candidate there is nothing to choose, so nothing is scored in between
    curve = result.curve["adaptive+bias@0.001"]
    assert [step for step, _ in curve] == [16]
    assert (result.steps, result.probe_steps, result.stop_reason) == (16, 4, "steps")
    assert (result.train_shots, result.heldout_shots) == ([0, 1, 2], [3])
    assert result.heldout_after == curve[-1][1]
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed <= set(model.adaptation_names("adaptive+bias"))
    with pytest.raises(ValueError, match="smaller than one"):
        adapt_domain(model, meta, [s[:10, :10] for s in shots], SETTINGS)


def _spans(registry: str, names: list[str]) -> dict[str, tuple[str, str, str]]:
    """(started, finished, node id) of each domain's first version, as its registry entry recorded."""
    import json

    runs = {n: json.loads(storage.read_bytes(f"{registry}/{n}/versions/v1.json"))["run"] for n in names}
    return {n: (r["started"], r["finished"], r["node_id"]) for n, r in runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("node_cpus", [(1, 1), (2,)], ids=["two-one-cpu-nodes", "one-two-cpu-node"])
def test_two_domains_given_two_cpus_run_side_by_side(node_cpus, tiny, tmp_path):
    """`clipsr adapt` of two domains, one CPU each (the default), joining a cluster through
    RAY_ADDRESS as a submitted job would: whether the two CPUs are on two nodes or on one, the
    domains' spans overlap."""
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    data = str(tmp_path / "data")
    folders = {name: _domain(data, name, size=112) for name in ("photos", "pages")}
    registry = str(tmp_path / "registry")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for cpus in node_cpus:
            cluster.add_node(num_cpus=cpus)
        cluster.wait_for_nodes()
        done = subprocess.run(
            [sys.executable, "-m", "clipsr.cli", "adapt", "--source-model", tiny[0], "--shots", "4", "--scale", "2",
             *[a for name, folder in folders.items() for a in ("--domain", f"{name}={folder}")],
             "--out", registry, "--steps", "150"],
            env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=600)
    finally:
        cluster.shutdown()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to 2 at once" in done.stderr
    spans = _spans(registry, list(folders))
    (start_a, end_a, node_a), (start_b, end_b, node_b) = spans.values()
    assert max(start_a, start_b) < min(end_a, end_b), spans  # ISO times of one format compare as text
    assert (node_a != node_b) == (len(node_cpus) == 2), spans


@pytest.mark.slow
def test_parallel_domains_publish_and_a_broken_one_is_reported(ray_local, s3_bucket, source, tmp_path):
    from clipsr.adapt.run import adapt_many
    from clipsr.registry import Registry

    data = str(tmp_path / "data")
    good_a, good_b = _domain(data, "photos"), _domain(data, "pages", grey=True)
    broken = _domain(data, "broken")
    storage.write_bytes_atomic(f"{broken}/01.png", b"not an image at all")
    registry = f"{s3_bucket}/registry"
    specs = [DomainSpec.shorthand(f"photos={good_a}", 4, 2), DomainSpec.shorthand(f"pages={good_b}", 4, 2),
             DomainSpec.shorthand(f"broken={broken}", 4, 2)]
    events, finished = [], []
    rows = adapt_many(specs, source, SETTINGS, registry, {"arch": "color-stats"}, cpus_per_domain=0.5,
                      on_progress=lambda e: events.append((e, len(finished))), on_done=finished.append)

    by = {r["domain"]: r for r in rows}
    assert by["broken"]["status"] == "failed" and "01.png" in by["broken"]["error"]
    # each domain's progress reached the driver while it trained, not only when it ended
    for name in ("photos", "pages"):
        mine = [(e, ended) for e, ended in events if e.domain == name]
        ended_at = [r["domain"] for r in finished].index(name)
        assert any(e.steps < e.total and ended <= ended_at for e, ended in mine), mine
        assert [e.steps for e, _ in mine] == sorted(e.steps for e, _ in mine)
        last = mine[-1][0]
        assert (last.phase, last.steps, last.total) == ("scored", 16, 16)
        assert last.heldout_gain_db == pytest.approx(by[name]["gain_db"])
    assert not [e for e, _ in events if e.domain == "broken"]  # it failed reading its exemplars
    reg = Registry(registry)
    for name in ("photos", "pages"):
        row = by[name]
        assert row["status"] == "ok" and row["version"] == 1, row
        assert row["promoted"] == (row["gain_db"] > 0)
        entry = reg.get(name, 1)
        doc = entry.doc
        assert doc["source_model"]["weights_sha256"] and doc["seconds"] > 0
        # written on a Ray worker, recorded as the driver knows it (in a checkout: the git commit)
        assert doc["code_revision"] == code_revision()
        assert [e["uri"] for e in doc["exemplars"]] == storage.list_images(f"{data}/{name}")
        assert all(len(e["sha256"]) == 64 for e in doc["exemplars"])
        # the settings as they ran on the worker: "auto" precision resolved, the loss named
        selection = doc["settings"]["selection"]
        assert selection["precision"] in ("bf16", "fp32") and selection["loss"] == SETTINGS.loss
        assert entry.centroid is not None and abs(np.linalg.norm(entry.centroid) - 1) < 1e-5
        # the stored model is a delta on the source, loadable by reference
        model, meta = load_checkpoint(f"{registry}/{name}/v1")
        assert meta["kind"] == "delta" and meta["parent"]["weights_sha256"] == load_checkpoint(source)[1]["weights_sha256"]
        assert meta["code_revision"] == code_revision()
    assert "broken" not in reg.domains()

    # a second run is a new version; the first stays as it was
    rows2 = adapt_many(specs[:1], source, SETTINGS, registry, {"arch": "color-stats"}, cpus_per_domain=0.5)
    assert rows2[0]["version"] == 2
    assert reg.get("photos", 1).doc == Registry(registry).get("photos", 1).doc


def test_the_gate_judges_the_published_weights_and_never_promotes_a_worse_model(source, tmp_path):
    """Three real adaptations of one domain: one whose learning rate makes it diverge (nothing
    becomes current), a sane one (current, its recorded score that of the published weights on the
    held-out shots), then the diverging one again (published, but the sane one stays current)."""
    from clipsr.adapt.run import adapt_one
    from clipsr.evaluate import evaluate
    from clipsr.factory import load_upscaler
    from clipsr.registry import Registry

    folder = _domain(str(tmp_path / "data"), "maps", n=5)
    registry = Registry(str(tmp_path / "registry"))
    s = dataclasses.replace(SETTINGS, holdout=2)
    diverging, sane = (dataclasses.replace(s, candidates=(("all", lr),)) for lr in (5.0, 1e-3))

    def adapt(settings: AdaptSettings):
        row = adapt_one(DomainSpec.shorthand(f"maps={folder}", 5, 2), source, settings, registry.uri,
                        {"arch": "color-stats"}, threads=1)
        assert row["status"] == "ok", row
        return registry.get("maps", row["version"])

    worse = adapt(diverging)
    assert worse.doc["scores"]["gain_db"] < 0 and not worse.promoted
    assert registry.current("maps") is None

    better = adapt(sane)
    scores = better.doc["scores"]
    assert scores["gain_db"] > 0 and better.promoted and registry.current("maps").version == better.version
    assert scores["gate"] == "heldout_psnr_y_after > heldout_psnr_y_before"
    uris = storage.list_images(folder)
    assert [(e["uri"], e["role"]) for e in better.doc["exemplars"]] == (
        [(u, "train") for u in uris[:3]] + [(u, "heldout") for u in uris[3:]])
    # the published weights, loaded from the registry and scored by `clipsr evaluate`'s code on the
    # held-out shots (the folder's last two), give the score that decided promotion
    rescored = evaluate(load_upscaler(better.ref), {"maps": folder}, skip_first=3)["datasets"]["maps"]
    assert rescored["images"] == 2
    assert scores["heldout_psnr_y_after"] == pytest.approx(rescored["psnr_y"], abs=1e-9)

    again = adapt(diverging)
    assert again.version > better.version and not again.promoted
    assert registry.current("maps").version == better.version


def test_a_delta_refuses_a_different_parent(source, tmp_path):
    from clipsr.factory import encode_checkpoint

    model, meta = load_checkpoint(source)
    with torch.no_grad():
        model.adaptive.fusion.bias.add_(0.1)
    data, _ = encode_checkpoint(model, "cdasr-tiny", parent={"id": meta["id"], "weights_sha256": meta["weights_sha256"]},
                                parent_spec=source, delta_keys=model.adaptation_names("adaptive"))
    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(data)
    loaded, _ = load_checkpoint(str(delta))
    torch.testing.assert_close(loaded.adaptive.fusion.bias, model.adaptive.fusion.bias)
    # the source is replaced by different weights under the same name: refused, not silently wrong
    torch.manual_seed(1)
    save_checkpoint(source, create_model("cdasr-tiny", 2), "cdasr-tiny")
    with pytest.raises(CheckpointError, match="was adapted from"):
        load_checkpoint(str(delta))


def test_an_adapted_domain_is_evaluated_and_routed_by_reference(source, tmp_path, capsys):
    import json

    from clipsr.adapt.run import adapt_one
    from clipsr.cli import main
    from clipsr.enhance.routing import build_router, resolve_model

    data = str(tmp_path / "data")
    folder = _domain(data, "maps", n=5)
    registry = str(tmp_path / "registry")
    row = adapt_one(DomainSpec.shorthand(f"maps={folder}", 4, 2), source, SETTINGS, registry,
                    {"arch": "color-stats"}, threads=1)
    assert row["status"] == "ok", row
    if not row["promoted"]:  # make it current by hand, as an operator's rollback/promotion would
        from clipsr.registry import Registry

        Registry(registry).set_current("maps", row["version"])

    # clipsr evaluate --model REGISTRY/DOMAIN: the current version; REGISTRY/DOMAIN/vN: that one
    for ref in (f"{registry}/maps", f"{registry}/maps/v{row['version']}"):
        report = tmp_path / "r.json"
        assert main(["evaluate", "--model", ref, "--scale", "2", "--data", f"maps={folder}",
                     "--skip-first", "4", "--report", str(report)]) == 0
        assert json.loads(report.read_text())["model"]["id"] == row["model_id"]

    # enhancement backfill of one domain pins that version
    router = build_router(resolve_model(source, 2), registry=registry, domain="maps")
    route = router.route("any/key.png")
    assert (route.domain, route.model.version, route.model.id) == ("maps", f"v{row['version']}", row["model_id"])


@pytest.mark.slow
def test_a_delta_outlives_the_file_it_was_adapted_from(ray_local, s3_bucket, source, tmp_path, capsys):
    """Adapt from a copy of the source, re-export another model over the copy, then delete it:
    the registry resolves the delta against its own copy of the source, and refuses a damaged one."""
    import hashlib
    import json
    import shutil

    import pyarrow.parquet as pq

    from clipsr.adapt.run import adapt_one
    from clipsr.cli import main
    from clipsr.registry import Registry

    folder = _domain(str(tmp_path / "data"), "manga", n=5)
    copied = tmp_path / "src.safetensors"
    shutil.copyfile(source, copied)
    registry = f"{s3_bucket}/registry"
    row = adapt_one(DomainSpec.shorthand(f"manga={folder}", 4, 2), str(copied), SETTINGS, registry,
                    {"arch": "color-stats"}, threads=1)
    assert row["status"] == "ok" and row["scope"] == "adaptive+bias", row
    reg = Registry(registry)
    reg.set_current("manga", row["version"])
    entry = reg.get("manga", row["version"])
    file_sha = hashlib.sha256(copied.read_bytes()).hexdigest()
    assert entry.doc["model"]["kind"] == "delta" and entry.doc["source_model"]["file_sha256"] == file_sha
    assert storage.read_bytes(reg.source_uri(file_sha)) == copied.read_bytes()
    assert reg.domains() == ["manga"]  # the source copies are not a domain
    assert main(["registry", "list", registry]) == 0 and "_sources" not in capsys.readouterr().out

    def evaluate(ref: str) -> int:
        return main(["evaluate", "--model", ref, "--scale", "2", "--data", f"manga={folder}", "--skip-first", "4",
                     "--report", str(tmp_path / "r.json")])

    ref = f"{registry}/manga/v{row['version']}"
    torch.manual_seed(1)
    save_checkpoint(str(copied), create_model("cdasr-tiny", 2), "cdasr-tiny")  # re-exported over the source
    assert evaluate(ref) == 0
    copied.unlink()
    assert evaluate(ref) == 0
    assert json.loads((tmp_path / "r.json").read_text())["model"]["id"] == row["model_id"]

    inputs, out = tmp_path / "in", tmp_path / "out"
    storage.write_bytes_atomic(str(inputs / "page.png"), _png(101, grey=True))
    code = main(["enhance", "--input", str(inputs), "--output", str(out), "--models", registry, "--domain", "manga",
                 "--model", "bicubic", "--scale", "2", "--threads", "1", "--device", "cpu"])
    rows = pq.read_table(str(out / "_manifests")).to_pylist()
    assert [(r["status"], r["error"], r["model_id"]) for r in rows] == [("ok", None, row["model_id"])]
    assert code == 0

    # a copy whose bytes no longer match its name is refused, naming both hashes
    damaged = b"not the source model"
    storage.write_bytes_atomic(reg.source_uri(file_sha), damaged)
    capsys.readouterr()
    assert evaluate(ref) == 1
    err = capsys.readouterr().err
    assert file_sha in err and hashlib.sha256(damaged).hexdigest() in err


def test_a_registry_delta_without_a_source_copy_still_finds_its_source_by_path(source, tmp_path):
    """Entries published before the registry kept source copies name their source only by locator."""
    from clipsr.factory import encode_checkpoint
    from clipsr.registry import Registry

    model, meta = load_checkpoint(source)
    with torch.no_grad():
        model.adaptive.fusion.bias.add_(0.1)
    parent = {"id": meta["id"], "weights_sha256": meta["weights_sha256"]}  # no file_sha256: written before copies
    data, dmeta = encode_checkpoint(model, "cdasr-tiny", parent=parent, parent_spec=source,
                                    delta_keys=model.adaptation_names("adaptive"))
    registry = str(tmp_path / "registry")
    Registry(registry).publish("manga", data, {
        "model": {"id": dmeta["id"], "kind": "delta", "weights_sha256": dmeta["weights_sha256"]},
        "source_model": {"id": meta["id"], "weights_sha256": meta["weights_sha256"], "spec": source},
        "clip_encoder": None, "exemplars": [{"uri": "manga/00.png", "sha256": "b" * 64}], "settings": {},
        "scores": {}, "seconds": 1.0, "code_revision": "0123abc", "reason": "test"}, promote=True)
    assert not (tmp_path / "registry" / "_sources").exists()
    loaded, _ = load_checkpoint(f"{registry}/manga")
    torch.testing.assert_close(loaded.adaptive.fusion.bias, model.adaptive.fusion.bias)


def test_a_model_adapted_from_a_since_replaced_bundled_model_finds_it_under_its_versioned_name(tmp_path):
    """A delta records its bundled source by name ("default"); when the package's default is
    replaced, the model it was adapted from stays installed as default-x4-v1 and is found by id."""
    from clipsr.factory import encode_checkpoint
    from clipsr.models.checkpoint import CheckpointError

    model, meta = load_checkpoint("default-x4-v1")
    assert load_checkpoint("default")[1]["id"] != meta["id"]  # "default" names another model now
    with torch.no_grad():
        model.adaptive.fusion.bias.add_(0.1)
    keys = model.adaptation_names("adaptive")
    data, _ = encode_checkpoint(model, "cdasr-lite", parent={"id": meta["id"], "weights_sha256": meta["weights_sha256"]},
                                parent_spec="default", delta_keys=keys)
    (tmp_path / "adapted.safetensors").write_bytes(data)
    loaded, _ = load_checkpoint(str(tmp_path / "adapted.safetensors"))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())

    # a source that no bundled file holds is still refused, as before
    data, _ = encode_checkpoint(model, "cdasr-lite", parent={"id": "cdasr-lite-x4-000000000000",
                                                             "weights_sha256": "0" * 64},
                                parent_spec="default", delta_keys=keys)
    (tmp_path / "orphan.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="was adapted from cdasr-lite-x4-000000000000, but 'default' now holds"):
        load_checkpoint(str(tmp_path / "orphan.safetensors"))


def test_the_candidate_best_on_heldout_shots_is_trained_on_and_a_harmful_one_never_promoted(source):
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    harmful, sane = ("all", 5.0), ("all", 1e-3)
    s = dataclasses.replace(SETTINGS, candidates=(harmful, sane), steps=40)
    result = adapt_domain(model, meta, shots, s)
    assert set(result.curve) == {"all@5", "all@0.001"}
    assert result.curve["all@5"] == [(10, result.curve["all@5"][0][1])]  # probed for a quarter of the steps
    assert result.curve["all@5"][0][1] < result.heldout_before  # the probe saw it wreck the model
    # an untrained source model: the sane candidate beats it, and goes on training to the last step
    assert result.gain_db > 0 and (result.scope, result.lr) == sane
    assert (result.steps, result.probe_steps, result.stop_reason) == (40, 10, "steps")

    # alone, a harmful candidate is trained all the same (nothing is scored before the end) and
    # judged at the end: worse, so it would be kept but not promoted
    only_harmful = adapt_domain(model, meta, shots, dataclasses.replace(s, candidates=(harmful,)))
    assert only_harmful.curve == {"all@5": [(40, only_harmful.heldout_after)]}
    assert only_harmful.gain_db < 0


def test_the_same_exemplars_seed_and_settings_give_the_same_weights(source):
    """Steps, not seconds, are the budget: two runs give bit-identical weights (on a CPU, the
    same thread count); another seed gives others, so the comparison can fail."""
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    s = dataclasses.replace(SETTINGS, candidates=(("all", 1e-3), ("adaptive+bias", 2e-3)), steps=12)
    first, again = (adapt_domain(model, meta, shots, s) for _ in range(2))
    other = adapt_domain(model, meta, shots, dataclasses.replace(s, seed=1))
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    assert (first.steps, first.curve, first.heldout_after) == (again.steps, again.curve, again.heldout_after)
    assert any(not torch.equal(v, other.model.state_dict()[k]) for k, v in first.model.state_dict().items())


def test_the_time_cap_stops_a_domain_early_and_says_so(source):
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    result = adapt_domain(model, meta, shots, dataclasses.replace(SETTINGS, steps=10**9, budget_seconds=1.0))
    assert result.stop_reason == "time cap" and 0 <= result.steps < 10**9
    assert result.curve["adaptive+bias@0.001"] == [(result.steps, result.heldout_after)]


def test_plain_finetuning_baseline_changes_every_weight_within_its_time(source):
    from clipsr.adapt.fast import plain_finetune

    model, _ = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(3)]
    tuned = plain_finetune(model, shots, 1e-3, steps=3, s=SETTINGS)
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert "backbone.body.0.body.0.weight" in changed  # a conv weight: beyond the adaptation scope


def test_adapt_command_line_validates_candidates():
    import argparse

    from clipsr.commands._args import scope_at_lr as _scope_at_lr

    assert _scope_at_lr("all@3e-4") == ("all", 3e-4)
    for bad in ("all", "everything@1e-3", "all@-1", "all@x"):
        with pytest.raises(argparse.ArgumentTypeError, match="SCOPE@LR"):
            _scope_at_lr(bad)
    # exit 2 means "some domain failed": a usage error must not look like that
    from clipsr.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["adapt", "--out", "registry", "--candidate", "all"])
    assert exc.value.code == 1


@pytest.mark.slow
def test_enhance_routes_each_image_to_the_nearest_domain(ray_local, source, tmp_path):
    """Grey pages and colourful photos, two adapted domains: --route auto sends each to its own."""
    import pyarrow.parquet as pq

    from clipsr.adapt.run import adapt_one
    from clipsr.enhance.options import EnhanceOptions
    from clipsr.enhance.run import run_enhance
    from clipsr.registry import Registry

    data, registry = str(tmp_path / "data"), str(tmp_path / "registry")
    encoder = {"arch": "color-stats"}
    for name, grey in (("photos", False), ("pages", True)):
        row = adapt_one(DomainSpec.shorthand(f"{name}={_domain(data, name, grey=grey)}", 4, 2), source,
                        SETTINGS, registry, encoder, threads=1)
        assert row["status"] == "ok", row
        Registry(registry).set_current(name, row["version"])
    inputs = tmp_path / "in"
    storage.write_bytes_atomic(str(inputs / "scan_grey.png"), _png(101, grey=True))
    storage.write_bytes_atomic(str(inputs / "photo_colour.png"), _png(102))
    out = str(tmp_path / "out")

    def run(threshold: float):
        result = run_enhance(EnhanceOptions(input=str(inputs), output=out, model=source, models=registry,
                                            route="auto", route_threshold=threshold, threads=1, device="cpu"))
        table = pq.read_table(result.manifest_uri).to_pylist()
        return result, {r["input_uri"].rsplit("/", 1)[-1]: r for r in table}

    result, rows = run(0.0)
    assert result.exit_code == 0, result.summary
    assert rows["scan_grey.png"]["domain"] == "pages" and rows["photo_colour.png"]["domain"] == "photos"
    for r in rows.values():
        assert r["status"] == "ok" and r["model_version"] == "v1" and -1 <= r["route_similarity"] <= 1
        assert "routed to" in r["notes"]
        # manifest v3: the other domain was the runner-up, and the encoder of the stored embedding
        assert r["route_runner_up"] == ({"pages", "photos"} - {r["domain"]}).pop() and r["route_margin"] > 0
        assert r["route_descriptor"].startswith("color-stats random:0 sha256:")
    _, again = run(0.0)  # the registry did not change: nothing is redone
    assert {r["status"] for r in again.values()} == {"skipped"}
    # a new threshold is a new routing: every input is routed again, and none is that close
    _, strict = run(0.999999)
    for r in strict.values():
        assert (r["status"], r["domain"], r["model_version"]) == ("ok", "default", None)


def test_adaptation_bench_scores_unseen_images_with_and_without_the_baseline(source, tmp_path):
    from clipsr.bench.adapt import bench_adaptation

    folder = tmp_path / "photos"
    for i in range(5):  # 3 shots (1 held out), 2 unseen images to score
        storage.write_bytes_atomic(str(folder / f"{i:02d}.png"), _png(i, size=104))
    out = bench_adaptation(source, {"photos": str(folder)}, shots=3, steps=4, budget_seconds=None, finetune_lr=1e-3,
                           threads=1)
    row = out["domains"]["photos"]
    assert row["adapted"]["gain_db"] == pytest.approx(row["adapted"]["psnr_y"] - row["source_psnr_y"])
    assert row["adapted"]["steps"] == row["finetuned"]["steps"] == 4 and row["adapted"]["stop_reason"] == "steps"
    no_baseline = bench_adaptation(source, {"photos": str(folder)}, 3, 4, None, finetune_lr=0, threads=1)
    assert "finetuned" not in no_baseline["domains"]["photos"]
    assert no_baseline["domains"]["photos"]["source_psnr_y"] == row["source_psnr_y"]
    # --batch reaches the training: fewer patches per step, another model
    small = bench_adaptation(source, {"photos": str(folder)}, 3, 4, None, finetune_lr=0, threads=1, batch=2)
    assert small["batch"] == 2 and no_baseline["batch"] == 12
    assert small["domains"]["photos"]["adapted"]["psnr_y"] != no_baseline["domains"]["photos"]["adapted"]["psnr_y"]



def test_adaptation_loss_measures_the_luma_the_domain_is_scored_on():
    from clipsr.adapt.fast import luma_l1
    from clipsr.metrics import rgb_to_y

    rng = np.random.default_rng(0)
    sr, hr = rng.random((2, 8, 8, 3))
    expected = np.abs(rgb_to_y(sr) - rgb_to_y(hr)).mean() / 255.0
    to_t = lambda a: torch.from_numpy(a.transpose(2, 0, 1)[None]).float()  # noqa: E731
    assert float(luma_l1(to_t(sr), to_t(hr))) == pytest.approx(expected, rel=1e-5)
    # a pure chroma change (equal luma) costs nothing; a luma change does
    grey = np.full((1, 3, 4, 4), 0.5)
    shifted = grey + np.array([0.1, -0.1 * 65.481 / 128.553, 0.0]).reshape(1, 3, 1, 1)
    assert float(luma_l1(torch.tensor(shifted).float(), torch.tensor(grey).float())) == pytest.approx(0, abs=1e-7)


def test_the_learning_rate_warms_up_over_the_first_steps(source):
    from clipsr.adapt.fast import Trajectory
    from clipsr.adapt.shots import degrade_shots

    model, _ = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(2)]
    s = dataclasses.replace(SETTINGS, warmup_steps=4)
    trajectory = Trajectory(model, "all", 1e-3, degrade_shots(shots, model.scale, s.lr_patch), s)
    used = []
    for _ in range(6):
        trajectory.step(1e-3)
        used.append(trajectory.opt.param_groups[0]["lr"])
    assert used == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_each_weight_is_updated_from_its_own_gradient(source):
    """The fused Adam of adaptation moves the weights as PyTorch's reference Adam does on the same
    gradients. (oneDNN's bf16 convolutions return gradients channels-last; handed over as they
    were, the fused kernel read them as contiguous and scrambled every convolution's update.)"""
    from clipsr.adapt.fast import Trajectory
    from clipsr.adapt.shots import degrade_shots

    model, _ = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(2)]
    s = dataclasses.replace(SETTINGS, warmup_steps=1, precision="auto")
    fused, reference = (Trajectory(model, "all", 1e-3, degrade_shots(shots, model.scale, s.lr_patch), s)
                        for _ in range(2))
    reference.opt = torch.optim.Adam(reference.params, lr=1e-3, foreach=False, fused=False)
    assert fused.opt.defaults["fused"]
    for _ in range(4):
        fused.step(1e-3)
        reference.step(1e-3)
    for (name, p), q in zip(fused.model.named_parameters(), reference.model.parameters()):
        assert not torch.equal(p, dict(model.named_parameters())[name]), name  # it trained
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)


def test_training_precision_is_resolved_from_the_hardware_and_checked():
    from clipsr.adapt.fast import resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        resolve_precision("fp16", "cpu")


def test_domains_at_once_counts_the_whole_domains_each_node_holds():
    from clipsr.adapt.run import domains_at_once

    assert domains_at_once([1.0, 1.0], 1.0) == 2
    assert domains_at_once([2.0], 1.0) == 2
    assert domains_at_once([0.0, 16.0], 2.0) == 8  # a head without CPUs runs none
    assert domains_at_once([1.0, 1.0], 2.0) == 0  # two CPUs, but on no one node
    assert domains_at_once([3.0], 1.5) == 2 and domains_at_once([1.0], 0.5) == 2
    with pytest.raises(ValueError, match="cpus_per_domain"):
        domains_at_once([4.0], 0)


@pytest.mark.slow
def test_a_clip_conditioned_model_from_pretraining_to_enhancement(ray_local, tmp_path, capsys):
    """The tiny CLIP tower through every step: pretraining embeds each image's LR and trains the
    null embedding too; adaptation conditions on the exemplars' LR and scores as `clipsr
    evaluate` does; the registry, the evaluation report and the manifest name the encoder; and
    an adapted model given another encoder's weights is refused."""
    import io
    import json

    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    from clipsr.cli import main
    from clipsr.clip import TINY_ARCH, ClipEncoder
    from clipsr.registry import Registry
    from clipsr.train.embeddings import lr_view
    from clipsr.train.settings import load_settings
    from clipsr.train.trainer import pretrain

    data = str(tmp_path / "data")
    roots = [_domain(data, name, n=3, size=48) for name in ("src-a", "src-b")]
    s = load_settings(None, [
        "name=clip", f"storage_path={tmp_path / 'runs'}", f"data.train={roots}", "model.arch=cdasr-tiny",
        "model.scale=2", "batch.size=2", "batch.lr_patch=12", "optim.steps=6", "optim.warmup=1",
        "checkpoint.every=6", "validation.log_every=6", "validation.every=6", "episodes.enabled=false",
        "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
        f"clip.arch={TINY_ARCH}", "clip.null_rate=0.5",
    ])
    source = pretrain(s)
    tower = ClipEncoder.load(TINY_ARCH, seed=0)
    identity = tower.identity.to_dict()
    assert source["clip_encoder"] == identity and "LR" in source["training_data"]["conditioning"]
    # the cached embeddings are those of each training image's x2 LR, as inference would embed it
    table = pq.read_table(io.BytesIO(storage.read_bytes(
        f"{tmp_path}/runs/clip/embeddings/{identity['sha256'][:16]}-x2.parquet"))).to_pydict()
    uri = table["uri"][0]
    hr = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))
    np.testing.assert_allclose(table["embedding"][0], tower.embed_images([lr_view(hr, 2)])[0], atol=1e-5)
    # the null embedding trained (half of the samples dropped their vector), not left at its start
    torch.manual_seed(s["seed"])
    start = create_model("cdasr-tiny", 2).adaptive.null_embedding
    trained, _ = load_checkpoint(source["uri"])
    assert not torch.allclose(trained.adaptive.null_embedding, start)

    folder = _domain(data, "maps", n=4, size=112)
    registry = str(tmp_path / "registry")
    assert main(["adapt", "--source-model", source["uri"], "--domain", f"maps={folder}", "--shots", "4",
                 "--scale", "2", "--steps", "6", "--out", registry]) == 0
    entry = Registry(registry).get("maps", 1)
    assert entry.doc["clip_encoder"] == identity
    ref = f"{registry}/maps/v1"

    # `clipsr evaluate` on the two held-out exemplars (the folder's last two) gives the score the
    # adaptation recorded: the same conditioning, the encoder included
    report = tmp_path / "r.json"
    assert main(["evaluate", "--model", ref, "--scale", "2", "--data", f"maps={folder}", "--skip-first", "2",
                 "--report", str(report)]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["datasets"]["maps"]["psnr_y"] == pytest.approx(entry.doc["scores"]["heldout_psnr_y_after"],
                                                                     abs=1e-9)
    assert evaluated["model"]["clip_encoder"] == identity

    Registry(registry).set_current("maps", 1)
    inputs, out = tmp_path / "in", tmp_path / "out"
    storage.write_bytes_atomic(str(inputs / "page.png"), _png(101, size=48))
    assert main(["enhance", "--input", str(inputs), "--output", str(out), "--models", registry, "--domain", "maps",
                 "--model", source["uri"], "--scale", "2", "--threads", "1", "--device", "cpu"]) == 0
    rows = pq.read_table(str(out / "_manifests")).to_pylist()
    assert [(r["status"], r["model_id"]) for r in rows] == [("ok", entry.doc["model"]["id"])]
    assert rows[0]["clip_encoder"] == f"{TINY_ARCH} random:0 sha256:{identity['sha256'][:12]}"

    # another tower's weights: refused by evaluation and by adaptation
    other = tmp_path / "other-tower.safetensors"
    save_file({k: v.contiguous() for k, v in ClipEncoder.load(TINY_ARCH, seed=1).visual.state_dict().items()},
              str(other))
    capsys.readouterr()
    assert main(["evaluate", "--model", ref, "--scale", "2", "--data", f"maps={folder}", "--skip-first", "2",
                 "--report", str(report), "--clip-weights", str(other)]) == 1
    assert "CLIP encoder mismatch" in capsys.readouterr().err
    assert main(["adapt", "--source-model", ref, "--domain", f"maps={folder}", "--shots", "4", "--scale", "2",
                 "--steps", "6", "--out", registry, "--clip-weights", str(other)]) == 2
    assert "CLIP encoder mismatch" in capsys.readouterr().out


def test_the_progress_board_shows_every_running_domain_and_each_one_that_ends():
    from clipsr.adapt.progress import DomainProgress, ProgressBoard

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    out, clock = io.StringIO(), Clock()
    board = ProgressBoard({"manga": 600, "urban": 200, "maps": 600}, stream=out, every_s=10, clock=clock)
    for t in range(1, 51):  # two domains at 4 steps a second; urban is scored at 50 s
        clock.now = float(t)
        board.update(DomainProgress("urban", 4 * t, 200, float(t), 0.25 if t == 50 else None,
                                    "scored" if t == 50 else "train"))
        board.update(DomainProgress("manga", 4 * t, 600, float(t)))
    board.finished({"domain": "urban", "status": "ok"}, "[urban] ok: v1 gain +0.250 dB (50s)")
    board.finished({"domain": "maps", "status": "failed"}, "[maps] failed: ValueError: no exemplars")
    board.close()
    lines = out.getvalue().splitlines()
    assert lines[:3] == [  # a line every 10 s, then one per running domain
        "adapt: 76/1400 steps (5%), running 2, 7.60 steps/s, about 2m54s left",
        "  urban: 40/200 steps, 4.00 steps/s, about 40s left",
        "  manga: 36/600 steps, 4.00 steps/s, about 2m21s left",
    ]
    assert "  urban: 200/200 steps (scored), 4.00 steps/s, held-out +0.250 dB" in lines
    # a domain that ends gets its line; one that failed counts the steps it ran, none here
    assert lines[-4:] == [
        "[urban] ok: v1 gain +0.250 dB (50s)",
        "[maps] failed: ValueError: no exemplars",
        "adapt: 400/800 steps (50%), ok 1, failed 1, running 1, 8.00 steps/s, about 50s left",
        "  manga: 200/600 steps, 4.00 steps/s, about 1m40s left",
    ]
