"""--route auto's data and decision: the weight-free descriptor, leave-one-out thresholds and
confusion, runner-up and margin, and embeddings never compared across descriptors."""
from __future__ import annotations

import io
import json
import sqlite3

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipsr import domain_routing as dr
from clipsr import routing_descriptor as rd
from clipsr import storage
from clipsr.adapt.routing_fit import degrade, fit_domain, report_confusion
from clipsr.enhance import index as idx
from clipsr.enhance import plan
from clipsr.enhance.layout import RunLayout
from clipsr.enhance.routing import AUTO_PREFIX, AutoRouter, ModelRef, RegistryUnavailableError, pack_embedding
from clipsr.registry import Registry

RUN = "20261201T000000Z-abcdef"


def drawing(seed: int, size: int = 200) -> np.ndarray:
    """A drawn page: flat saturated shapes with dark outlines and a few strokes on white paper."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (250, 248, 240))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(0, size - 40, 2)
        w, h = rng.integers(30, 90, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x), int(y), int(x + w), int(y + h)], fill=colour, outline=(20, 20, 20), width=3)
    for _ in range(4):
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)]
        draw.line(pts, fill=(10, 10, 10), width=2)
    return np.asarray(img)


def facade(seed: int, size: int = 200) -> np.ndarray:
    """A photographed facade: a periodic grid of windows in a textured, weakly coloured wall."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(14, 22))
    wall = 0.55 + 0.1 * rng.random() + 0.05 * np.sin(xx / 37.0)
    window = ((xx % period) < period // 2) & ((yy % period) < period // 2)
    luma = np.where(window, 0.2, wall) + rng.normal(0, 0.03, (size, size))
    tint = np.array([1.0, 0.97, 0.9]) if seed % 2 else np.array([0.95, 0.97, 1.0])
    return (np.clip(luma[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def lineage() -> dict:
    return {"model": {"id": "cdasr-x2-0123456789ab", "kind": "delta", "weights_sha256": "d" * 64},
            "source_model": {"id": "cdasr-x2-fedcba987654", "weights_sha256": "a" * 64},
            "clip_encoder": None, "exemplars": [{"uri": "s3://data/x.png", "sha256": "b" * 64}],
            "settings": {}, "scores": {}, "seconds": 1.0, "code_revision": "test", "reason": "test"}


def publish(registry: str, name: str, shots: list[np.ndarray], encoder: dict | None = None) -> None:
    """A domain version with the routing data adaptation would give it (no training: routing
    does not depend on the weights)."""
    block, centroid = fit_domain([degrade(s, 2) for s in shots], 2, encoder or {"arch": rd.ARCH})
    entry = {**lineage(), "centroid_encoder": block["encoder"], "routing": block}
    Registry(registry).publish(name, f"weights of {name}".encode(), entry, centroid=centroid, promote=True)


# --- the descriptor --------------------------------------------------------------------------


def test_descriptor_views_are_unit_vectors_the_same_for_integer_and_float_pixels():
    page = drawing(1)
    views = rd.embed(page)
    assert views.shape == (6, len(rd.FEATURES) + 1)  # the whole image, four quadrants, the centre
    np.testing.assert_allclose(np.linalg.norm(views, axis=1), 1.0, rtol=1e-5)
    # exemplars are embedded from uint8, inputs as the decoder gives them (float in [0, 1])
    np.testing.assert_allclose(rd.embed(page.astype(np.float32) / 255.0), views, atol=1e-5)
    assert rd.embed(page[:60, :60]).shape == (1, len(rd.FEATURES) + 1)  # too small for parts
    grey = rd.embed(page[..., :1])
    assert grey.shape == views.shape and np.isfinite(grey).all()
    flat = rd.embed(np.full((120, 120, 3), 128, np.uint8))  # no edges, no colour: defined, not NaN
    assert np.isfinite(flat).all()
    with pytest.raises(ValueError, match="sides >= 4"):
        rd.embed(np.zeros((3, 50, 3), np.uint8))


def test_the_descriptor_identity_changes_with_its_definition(monkeypatch):
    before = rd.identity()
    assert before == rd.identity() and before["arch"] == "route-stats" and before["embed_dim"] == 33
    monkeypatch.setattr(rd, "WEIGHTS", tuple(1.0 for _ in rd.FEATURES))
    assert rd.identity()["sha256"] != before["sha256"]


def test_drawings_and_facades_are_told_apart_from_their_downscales():
    shots = {"drawn": [drawing(s) for s in range(5)], "facades": [facade(s) for s in range(5)]}
    domains = {n: dr.DomainRouting.from_entry({"routing": fit_domain([degrade(x, 2) for x in s], 2,
                                                                     {"arch": rd.ARCH})[0]})
               for n, s in shots.items()}
    names = sorted(domains)
    for name, make in (("drawn", drawing), ("facades", facade)):
        for seed in (100, 101, 102):
            d = dr.decide(rd.embed(degrade(make(seed), 2)), [domains[n] for n in names])
            assert names[d.chosen] == name and d.margin > 0
    # the block holds the embeddings of the LR it was given, and says how that LR was made
    block, _ = fit_domain([degrade(s, 2) for s in shots["drawn"][:3]], 2, {"arch": rd.ARCH})
    from clipsr.degrade import make_lr

    np.testing.assert_allclose(np.asarray(block["exemplars"][0], np.float32), rd.embed(make_lr(shots["drawn"][0], 2)),
                               atol=1e-6)
    assert block["degradation"] == {"kind": "bicubic", "scale": 2, "function": "clipsr.degrade.make_lr",
                                   "archive": "clean"}


# --- calibration and decision ----------------------------------------------------------------


def test_the_threshold_is_a_prediction_bound_of_the_leave_one_out_similarities():
    tight = np.array([0.95, 0.96, 0.94, 0.95, 0.97, 0.95, 0.96, 0.94, 0.95, 0.96])
    spread = np.array([0.9, 0.6, 0.8, 0.7, 0.95, 0.75, 0.85, 0.65, 0.9, 0.8])
    t_tight, t_spread = dr.calibrate_threshold(tight), dr.calibrate_threshold(spread)
    assert t_tight <= tight.min() and t_spread <= spread.min()
    assert t_spread < t_tight  # a spread-out domain accepts farther inputs
    # few exemplars say little about the spread: the same values, fewer of them, a wider bound
    assert dr.calibrate_threshold(spread[:4]) < dr.calibrate_threshold(np.tile(spread[:4], 5))
    assert dr.calibrate_threshold(tight[:2]) is None
    # Student's t at 99%, from tables: 2.821 (9 degrees of freedom), 2.528 (20), 3.365 (5)
    for dof, exact in ((9, 2.821), (20, 2.528), (5, 3.365)):
        assert dr.student_t_quantile(dr.REJECT_Z, dof) == pytest.approx(exact, rel=5e-3)


def _unit(*v: float) -> np.ndarray:
    a = np.asarray(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def _domain(*vectors: np.ndarray, threshold: float | None = 0.5) -> dr.DomainRouting:
    return dr.DomainRouting(tuple(v[None] for v in vectors), threshold, {"arch": "t", "weights": "w", "sha256": "0" * 64})


def test_the_decision_names_the_runner_up_and_its_margin():
    a = _domain(_unit(1, 0, 0), _unit(1, 0.1, 0))
    b = _domain(_unit(0, 1, 0), _unit(0.1, 1, 0))
    c = _domain(_unit(0, 0, 1), threshold=0.99)
    x = _unit(1, 0.4, 0)[None]
    d = dr.decide(x, [a, b, c])
    sims = [dr.similarity(x, dom.pool) for dom in (a, b, c)]
    assert (d.chosen, d.runner_up) == (0, 1) and d.margin == pytest.approx(sims[0] - sims[1])
    # below the nearest domain's own threshold: the source model, the nearest as runner-up, a negative margin
    y = _unit(0.2, 0.1, 1)[None]
    d = dr.decide(y, [a, b, c])
    assert (d.chosen, d.runner_up) == (None, 2)
    assert d.margin == pytest.approx(dr.similarity(y, c.pool) - 0.99) and d.margin < 0
    assert dr.decide(y, [a, b, c], threshold=0.0).chosen == 2  # an operator's override
    # a legacy entry: one centroid, no calibration, the old fixed threshold
    legacy = dr.DomainRouting.from_entry({"centroid": [1.0, 0.0, 0.0], "centroid_encoder": {"arch": "x"}})
    assert legacy.threshold is None and dr.threshold_of(legacy) == dr.LEGACY_THRESHOLD


@pytest.mark.slow
def test_three_domains_leave_one_out_confusion_in_the_adaptation_report(ray_local, tiny_checkpoint, tmp_path, capsys):
    """Two easy domains and one drawn like the first: the report shows the first two confused and
    the facades clean, before any nightly run does."""
    from clipsr.cli import main

    data, registry = tmp_path / "data", str(tmp_path / "registry")
    for name, make, seeds in (("drawn", drawing, range(4)), ("posters", drawing, range(50, 54)),
                              ("facades", facade, range(4))):
        for s in seeds:
            storage.write_bytes_atomic(str(data / name / f"{s:02d}.png"), png(make(s)))
    code = main(["adapt", "--source-model", tiny_checkpoint, "--out", registry, "--scale", "2", "--shots", "4", "--budget-seconds", "2",
                 "--candidate", "adaptive+bias@1e-3", "--cpus-per-domain", "0.5", "--report", str(tmp_path / "report")]
                + [f"--domain={n}={data / n}" for n in ("drawn", "posters", "facades")])
    out = capsys.readouterr().out
    assert code == 0, out
    conf = json.loads((tmp_path / "report.routing.json").read_text())
    counts = conf["counts"]
    assert conf["domains"] == ["drawn", "facades", "posters"] and conf["descriptor"].startswith("route-stats v1")
    assert counts["facades"]["facades"] == 4 and conf["own_share"]["facades"] == 1.0
    assert counts["drawn"]["posters"] + counts["posters"]["drawn"] > 0  # confusable, and the report says so
    assert {conf["closest_other"][n]["domain"] for n in ("drawn", "posters")} == {"drawn", "posters"}
    assert conf["versions"] == {"drawn": 1, "facades": 1, "posters": 1}
    table = out[out.index("routing, leave-one-out over 3 domain(s)"):]
    assert "exemplars of" in table and "facades" in table and str(tmp_path / "report.routing.json") in table
    reg = Registry(registry)
    # versions the gate did not promote are in the report as routing would see them once current
    assert conf["not_current"] == sorted(n for n in conf["domains"] if reg.current(n) is None)
    for name in conf["domains"]:  # every threshold comes from the registry entry's calibration
        entry = reg.get(name, 1)
        assert conf["thresholds"][name] == pytest.approx(entry.doc["routing"]["threshold"], abs=1e-4)
        assert len(entry.doc["routing"]["leave_one_out"]) == 4


# --- the registry, the planner and stored embeddings -----------------------------------------


def test_confusion_of_a_registry_without_ray_and_mixed_encoders_refused(tmp_path, capsys):
    from clipsr.cli import main

    registry = str(tmp_path / "registry")
    publish(registry, "drawn", [drawing(s) for s in range(4)])
    publish(registry, "facades", [facade(s) for s in range(4)])
    text = report_confusion(registry, str(tmp_path / "r"))
    assert "facades" in text and json.loads((tmp_path / "r.routing.json").read_text())["own_share"] == {
        "drawn": 1.0, "facades": 1.0}
    assert main(["registry", "routing", registry]) == 0
    assert "leave-one-out over 2 domain(s)" in capsys.readouterr().out

    publish(registry, "scans", [facade(s) for s in range(10, 13)], {"arch": "color-stats"})
    with pytest.raises(RegistryUnavailableError, match="different encoders.*scans: color-stats"):
        AutoRouter(registry, ModelRef("default", "src", 2), None, resolve=lambda ref: ModelRef(ref, ref, 2))


def test_a_stored_embedding_of_another_descriptor_is_embedded_again(tmp_path):
    """The planner routes an unchanged input from its stored embedding only when the registry's
    domains were embedded by the same descriptor; otherwise the input goes back to the chooser."""
    registry = str(tmp_path / "registry")
    publish(registry, "drawn", [drawing(s) for s in range(4)])
    publish(registry, "facades", [facade(s) for s in range(4)])
    source = ModelRef("default", "src-model", 2)
    router = AutoRouter(registry, source, None, resolve=lambda ref: ModelRef(ref, "model-" + ref.split("/")[-2], 2))
    stored = pack_embedding(rd.embed(degrade(facade(77), 2)))
    route = router.reroute(stored, router.descriptor)
    assert (route.domain, route.runner_up, route.descriptor) == ("facades", "drawn", router.descriptor)
    assert route.margin > 0 and route.model.id == "model-facades"
    assert router.reroute(stored, "color-stats random:0 sha256:0123456789ab") is None
    assert router.reroute(stored, None) is None  # indexed before descriptors were recorded
    assert router.reroute(stored[:-2], router.descriptor) is None  # not whole views

    db = sqlite3.connect(":memory:")
    plan.create_tables(db)
    idx.create_table(db)
    layout = RunLayout.create("s3://in", "s3://out", None, RUN)
    old = "20261101T000000Z-000000"
    idx.upsert(db, [(key, 10, "e1", 0, "model-facades", "v1", "facades", 2, f"s3://out/{key}", 99, old, stored, None,
                     None, None, "ok", None, desc) for key, desc in (("same.png", router.descriptor), ("other.png", "color-stats x"),
                                                   ("none.png", None))])
    plan.load_outputs(db, [storage.ObjectInfo(uri=f"s3://out/{k}", key=k, size=99, etag="o", mtime=0.0)
                           for k in ("same.png", "other.png", "none.png")])
    plan.load_listing(db, [storage.ObjectInfo(uri=f"s3://in/{k}", key=k, size=10, etag="e1", mtime=0.0)
                           for k in ("same.png", "other.png", "none.png")], None)

    class Sink:
        processed, recorded = [], []

        def process(self, row):
            self.processed.append(row)

        def record(self, row):
            self.recorded.append(row)

    sink = Sink()
    plan.decide(db, layout, router, 2, None, sink)
    assert [(r["input_key"], r["status"], r["route_descriptor"]) for r in sink.recorded] == [
        ("same.png", "skipped", router.descriptor)]
    embedded_again = {r["input_key"]: r for r in sink.processed}
    assert set(embedded_again) == {"other.png", "none.png"}
    for row in embedded_again.values():
        assert row["model_spec"].startswith(AUTO_PREFIX) and row["route_embedding"] is None
