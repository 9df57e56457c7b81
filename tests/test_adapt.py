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

SETTINGS = AdaptSettings(candidates=(("adaptive+bias", 1e-3),), max_steps=16, chunk=2, batch=2, lr_patch=12, holdout=1,
                         budget_seconds=60)


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


def _domain(root, name: str, n: int = 4, grey: bool = False) -> str:
    for i in range(n):
        storage.write_bytes_atomic(f"{root}/{name}/{i:02d}.png", _png(i + 10 * len(name), grey))
    return f"{root}/{name}"


def test_adapt_domain_stores_only_what_changed(source, tmp_path):
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    result = adapt_domain(model, meta, shots, SETTINGS)
    # 4 probe steps (a quarter of max_steps), then 12 more on the same shots; the held-out one is
    # never trained on, and scores the weights returned after their last step
    curve = result.curve["adaptive+bias@0.001"]
    assert [step for step, _ in curve] == [4, 16]
    assert (result.steps, result.probe_steps) == (16, 4)
    assert (result.train_shots, result.heldout_shots) == ([0, 1, 2], [3])
    assert result.heldout_after == curve[-1][1]
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed <= set(model.adaptation_names("adaptive+bias"))
    with pytest.raises(ValueError, match="smaller than one"):
        adapt_domain(model, meta, [s[:10, :10] for s in shots], SETTINGS)


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
    rows = adapt_many(specs, source, SETTINGS, registry, {"arch": "color-stats"}, cpus_per_domain=0.5)

    by = {r["domain"]: r for r in rows}
    assert by["broken"]["status"] == "failed" and "01.png" in by["broken"]["error"]
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


def test_the_candidate_best_on_heldout_shots_is_trained_on_and_a_harmful_one_never_promoted(source):
    model, meta = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(4)]
    harmful, sane = ("all", 5.0), ("all", 1e-3)
    s = dataclasses.replace(SETTINGS, candidates=(harmful, sane), max_steps=100_000, budget_seconds=3.0)
    result = adapt_domain(model, meta, shots, s)
    assert set(result.curve) == {"all@5", "all@0.001"}
    assert result.curve["all@5"][0][1] < result.heldout_before  # the probe saw it wreck the model
    # an untrained source model: the sane candidate beats it, and goes on training
    assert result.gain_db > 0 and (result.scope, result.lr) == sane
    assert result.steps > result.probe_steps > 0
    assert result.seconds < s.budget_seconds + 2.0  # the budget bounds probing and training together

    # a candidate that loses to the source model is trained on all the same and judged at the end;
    # still worse, so it would be kept but not promoted
    only_harmful = adapt_domain(model, meta, shots, dataclasses.replace(s, candidates=(harmful,)))
    assert [step for step, _ in only_harmful.curve["all@5"]] == [only_harmful.probe_steps, only_harmful.steps]
    assert only_harmful.steps > only_harmful.probe_steps and only_harmful.gain_db < 0


def test_plain_finetuning_baseline_changes_every_weight_within_its_time(source):
    from clipsr.adapt.fast import plain_finetune

    model, _ = load_checkpoint(source)
    shots = [np.asarray(Image.open(io.BytesIO(_png(i)))) for i in range(3)]
    tuned = plain_finetune(model, shots, 1e-3, seconds=0.5, s=SETTINGS)
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert "backbone.body.0.body.0.weight" in changed  # a conv weight: beyond the adaptation scope


def test_adapt_command_line_validates_candidates():
    import argparse

    from clipsr.cli import _scope_at_lr

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
    out = bench_adaptation(source, {"photos": str(folder)}, shots=3, budget_seconds=2.0, finetune_lr=1e-3,
                           threads=1)
    row = out["domains"]["photos"]
    assert row["adapted"]["gain_db"] == pytest.approx(row["adapted"]["psnr_y"] - row["source_psnr_y"])
    assert row["finetuned"]["seconds"] == pytest.approx(row["adapted"]["seconds"], abs=1.5)
    no_baseline = bench_adaptation(source, {"photos": str(folder)}, 3, 2.0, finetune_lr=0, threads=1)
    assert "finetuned" not in no_baseline["domains"]["photos"]
    assert no_baseline["domains"]["photos"]["source_psnr_y"] == row["source_psnr_y"]



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


def test_training_precision_is_resolved_from_the_hardware_and_checked():
    from clipsr.adapt.fast import resolve_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision must be auto, bf16 or fp32"):
        resolve_precision("fp16", "cpu")
