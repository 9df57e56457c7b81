"""Adaptation that matches the archive: exemplars degraded as the domain's inputs are (given, or
measured from a sample of the archive), recorded in the registry's lineage."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipsr import routing_descriptor as route_stats
from clipsr import storage
from clipsr.adapt.archive_degradation import measure
from clipsr.adapt.shots import degrade_shots
from clipsr.adapt.spec import DomainSpec
from clipsr.cli import main
from clipsr.degrade import make_lr
from clipsr.degradations import jpeg_roundtrip
from clipsr.registry import Registry


def _photo(seed: int, size: int = 64) -> np.ndarray:
    """Smooth colour waves and mild noise: no 8x8 grid of its own for the blind estimate to see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin((3 + c + seed % 3) * np.pi * (xx + c * yy)) for c in range(3)], -1) * 0.4 + 0.5
    return (np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1) * 255).astype(np.uint8)


def _encoded(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def test_exemplars_degraded_as_the_archive_is():
    shots = [_photo(i) for i in range(3)]
    clean = degrade_shots(shots, 2, 8)
    jpeg = degrade_shots(shots, 2, 8, "jpeg:60")
    for c, j, shot in zip(clean, jpeg, shots):
        assert np.array_equal(c.lr, make_lr(shot, 2)) and np.array_equal(j.hr, c.hr)
        assert np.array_equal(j.lr, jpeg_roundtrip(make_lr(shot, 2), 60))
    # a range draws one quality per exemplar, the same for the same seed
    a, b = degrade_shots(shots, 2, 8, "jpeg:20-95", seed=3), degrade_shots(shots, 2, 8, "jpeg:20-95", seed=3)
    assert all(np.array_equal(x.lr, y.lr) for x, y in zip(a, b))


def test_the_archive_degradation_is_measured_from_a_sample(tmp_path):
    jpegs, pngs = tmp_path / "jpegs", tmp_path / "pngs"
    for i, q in enumerate((70, 75, 75, 80)):
        storage.write_bytes_atomic(str(jpegs / f"{i}.jpg"), _encoded(_photo(i), "JPEG", quality=q))
    storage.write_bytes_atomic(str(jpegs / "9.png"), _encoded(_photo(9), "PNG"))
    storage.write_bytes_atomic(str(jpegs / "broken.jpg"), b"\xff\xd8 not a JPEG")
    spec, found = measure(str(jpegs))
    assert spec == "jpeg:75"
    assert (found["sampled"], found["unreadable"], found["qualities"]) == (6, 1, [70, 75, 75, 80])
    for i in range(3):
        storage.write_bytes_atomic(str(pngs / f"{i}.png"), _encoded(_photo(i), "PNG"))
    assert measure(str(pngs))[0] == "clean"


@pytest.mark.slow
def test_adapt_records_the_degradation_it_measured(ray_local, tiny_checkpoint, tmp_path, capsys):
    exemplars, archive, registry = tmp_path / "ex", tmp_path / "archive", str(tmp_path / "registry")
    for i in range(3):
        storage.write_bytes_atomic(str(exemplars / f"{i}.png"), _encoded(_photo(i, 64), "PNG"))
        storage.write_bytes_atomic(str(archive / f"{i}.jpg"), _encoded(_photo(i + 5, 24), "JPEG", quality=50))
    assert main(["adapt", "--source-model", tiny_checkpoint, "--domain", f"scans={exemplars}", "--shots", "3",
                 "--steps", "3", "--out", registry, "--degradation-from", str(archive)]) == 0
    assert f"degradation measured from {archive}: jpeg:50 (3 of 3 sampled files" in capsys.readouterr().err
    doc = Registry(registry).get("scans", 1).doc
    selection = doc["settings"]["selection"]
    assert (selection["degradation"], selection["degradation_from"]) == ("jpeg:50", str(archive))
    # routing is fitted on the exemplars as the archive's inputs arrive: JPEG'd, not clean
    assert doc["routing"]["degradation"]["archive"] == "jpeg:50"
    for i, views in enumerate(doc["routing"]["exemplars"]):
        as_archived = route_stats.embed(jpeg_roundtrip(make_lr(_photo(i, 64), 2), 50))
        np.testing.assert_allclose(np.asarray(views, np.float32), as_archived, atol=1e-5)
        assert not np.allclose(np.asarray(views, np.float32), route_stats.embed(make_lr(_photo(i, 64), 2)), atol=1e-3)
    # given explicitly, a bad one is a usage error (exit 1) before anything starts
    with pytest.raises(SystemExit) as exc:
        main(["adapt", "--domain", f"scans={exemplars}", "--out", registry, "--degradation", "jpeg:0"])
    assert exc.value.code == 1


def test_a_domain_whose_archive_was_not_measured_fails_rather_than_adapting_clean(tiny_checkpoint, tmp_path):
    from clipsr.adapt.run import adapt_one
    from clipsr.adapt.settings import AdaptSettings

    for i in range(3):
        storage.write_bytes_atomic(str(tmp_path / "ex" / f"{i}.png"), _encoded(_photo(i, 64), "PNG"))
    spec = DomainSpec.from_dict({"name": "scans", "exemplars": {"prefix": str(tmp_path / "ex"), "take": 3},
                                 "degradation_from": str(tmp_path / "archive")})
    row = adapt_one(spec, tiny_checkpoint, AdaptSettings(steps=1), str(tmp_path / "registry"), {"arch": "route-stats"}, 1)
    assert row["status"] == "failed" and "was not measured" in row["error"]
    assert not (tmp_path / "registry").exists()


def test_a_domain_spec_names_its_own_archive_or_degradation(tmp_path):
    spec = DomainSpec.from_dict({"name": "scans", "exemplars": ["a.png", "b.png"], "degradation": "jpeg:80-80"})
    assert (spec.degradation, spec.degradation_from) == ("jpeg:80", None)  # canonical, as recorded
    with pytest.raises(ValueError, match="domain scans: .*1..100"):
        DomainSpec.from_dict({"name": "scans", "exemplars": ["a.png", "b.png"], "degradation": "jpeg:0"})
    with pytest.raises(ValueError, match="not both"):  # a measured archive and a given spec could disagree
        DomainSpec.from_dict({"name": "scans", "exemplars": ["a.png", "b.png"], "degradation": "jpeg:80",
                              "degradation_from": str(tmp_path)})


@pytest.mark.slow
def test_one_run_adapts_domains_of_different_archives(ray_local, tiny_checkpoint, tmp_path, capsys):
    registry, spec = str(tmp_path / "registry"), tmp_path / "domains.yaml"
    for name in ("scans", "photos", "plain"):
        for i in range(3):
            storage.write_bytes_atomic(str(tmp_path / name / f"{i}.png"), _encoded(_photo(i, 64), "PNG"))
    for i in range(3):  # the scans' archive is JPEG at quality 50
        storage.write_bytes_atomic(str(tmp_path / "archive" / f"{i}.jpg"),
                                   _encoded(_photo(i + 5, 24), "JPEG", quality=50))
    spec.write_text(
        f"domains:\n"
        f"  - {{name: scans, exemplars: {{prefix: '{tmp_path / 'scans'}', take: 3}},"
        f" degradation_from: '{tmp_path / 'archive'}'}}\n"
        f"  - {{name: photos, exemplars: {{prefix: '{tmp_path / 'photos'}', take: 3}}, degradation: 'jpeg:80'}}\n"
        f"  - {{name: plain, exemplars: {{prefix: '{tmp_path / 'plain'}', take: 3}}}}\n")
    assert main(["adapt", "--source-model", tiny_checkpoint, "--spec", str(spec), "--steps", "2", "--out", registry,
                 "--degradation", "jpeg:60"]) == 0
    assert f"degradation measured from {tmp_path / 'archive'}: jpeg:50" in capsys.readouterr().err
    got = {}
    for name in ("scans", "photos", "plain"):
        doc = Registry(registry).get(name, 1).doc
        selection = doc["settings"]["selection"]
        got[name] = (selection["degradation"], selection["degradation_from"], doc["routing"]["degradation"]["archive"])
    assert got == {"scans": ("jpeg:50", str(tmp_path / "archive"), "jpeg:50"),
                   "photos": ("jpeg:80", None, "jpeg:80"),
                   "plain": ("jpeg:60", None, "jpeg:60")}
