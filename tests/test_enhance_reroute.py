"""--route auto across registry changes: a nightly redoes only the inputs whose model changed."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipsr import storage
from clipsr.adapt.run import adapt_one
from clipsr.adapt.settings import AdaptSettings
from clipsr.adapt.spec import DomainSpec
from clipsr.enhance.options import EnhanceOptions
from clipsr.enhance.run import run_enhance
from clipsr.registry import Registry

SETTINGS = AdaptSettings(candidates=(("adaptive+bias", 1e-3),), steps=8, batch=2, lr_patch=12,
                         holdout=1)
HUES = {"reds": (0.8, 0.15, 0.1), "blues": (0.1, 0.2, 0.85), "greens": (0.15, 0.8, 0.2)}


def _png(hue: tuple[float, float, float], seed: int, size: int = 40) -> bytes:
    """A textured image of one dominant colour: the colour-statistics encoder tells the hues apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    texture = 0.15 * np.sin((3 + seed % 4) * np.pi * (xx + yy))[..., None]
    img = np.clip(np.asarray(hue)[None, None, :] + texture + rng.normal(0, 0.03, (size, size, 3)), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _adapt(registry: str, data: str, name: str, seed: int, source: str) -> None:
    for i in range(4):
        storage.write_bytes_atomic(f"{data}/{name}-{seed}/{i:02d}.png", _png(HUES[name], seed * 100 + i))
    row = adapt_one(DomainSpec.shorthand(f"{name}={data}/{name}-{seed}", 4, 2), source, SETTINGS, registry,
                    {"arch": "color-stats"}, threads=1)
    assert row["status"] == "ok", row
    Registry(registry).set_current(name, row["version"])


@pytest.mark.slow
def test_a_registry_change_redoes_exactly_the_inputs_whose_model_changed(ray_local, tiny_checkpoint, tmp_path):
    data, registry, inputs, out = (str(tmp_path / d) for d in ("data", "registry", "in", "out"))
    _adapt(registry, data, "reds", 1, tiny_checkpoint)
    _adapt(registry, data, "blues", 1, tiny_checkpoint)
    for name in HUES:
        for i in range(3):
            storage.write_bytes_atomic(f"{inputs}/{name}-{i}.png", _png(HUES[name], 1000 + 10 * i))
    opts = EnhanceOptions(input=inputs, output=out, model=tiny_checkpoint, models=registry, route="auto",
                          route_threshold=0.0, threads=1, device="cpu")

    def run() -> dict[str, dict]:
        result = run_enhance(opts)
        assert result.exit_code == 0, result.summary
        return {r["input_key"]: r for r in pq.read_table(result.manifest_uri).to_pylist()}

    first = run()
    assert {r["status"] for r in first.values()} == {"ok"}
    for key in ("reds-0.png", "blues-0.png"):
        assert first[key]["domain"] == key.split("-")[0] and first[key]["model_version"] == "v1"
    assert all(r["route_embedding"] for r in first.values())
    assert {r["status"] for r in run().values()} == {"skipped"}  # nothing changed, nothing redone

    _adapt(registry, data, "reds", 2, tiny_checkpoint)  # reds: a new version
    _adapt(registry, data, "greens", 1, tiny_checkpoint)  # a new domain
    second = run()
    redone = {k for k, r in second.items() if r["status"] == "ok"}
    assert redone == {f"{n}-{i}.png" for n in ("reds", "greens") for i in range(3)}
    for key, row in second.items():
        name = key.split("-")[0]
        assert row["domain"] == name, row
        assert row["model_version"] == ("v2" if name == "reds" else "v1")
        if row["status"] == "skipped":  # routed from the stored embedding, never read
            assert row["input_sha256"] is None and row["previous_run_id"] == first[key]["run_id"]
        else:  # routed on the driver: the embedding is carried over, the image is not embedded again
            assert row["route_embedding"] == first[key]["route_embedding"]
            assert row["model_id"] == Registry(registry).current(name).doc["model"]["id"]
