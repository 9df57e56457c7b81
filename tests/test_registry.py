"""registry: versions are immutable, CURRENT moves only by compare-and-swap, references resolve;
on a local folder and on S3 (moto). Also the conditional writes in storage it is built on."""
from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest

from clipsr import storage
from clipsr.config import ConfigError
from clipsr.registry import (
    EntryNotFoundError,
    InvalidDomainError,
    Registry,
    resolve_ref,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"{request.getfixturevalue('s3_bucket')}/registry"


def lineage(**changes) -> dict:
    entry = {
        "model": {"id": "cdasr-x4-0123456789ab", "kind": "delta", "weights_sha256": "d" * 64},
        "source_model": {"id": "cdasr-x4-fedcba987654", "weights_sha256": "a" * 64, "spec": "default-x4"},
        "clip_encoder": {"arch": "ViT-B-32", "weights": "openai", "sha256": "c" * 64,
                         "semantic_prior": True, "embed_dim": 512},
        "exemplars": [{"uri": "s3://data/manga/001.png", "sha256": "b" * 64}],
        "settings": {"steps": 40, "lr": 1e-3, "chosen_by": "leave-one-out over the shots"},
        "scores": {"heldout_psnr_y_before": 27.1, "heldout_psnr_y_after": 27.9, "gain_db": 0.8},
        "seconds": 95.5,
        "code_revision": "0123abc",
        "reason": "beats the source model by +0.80 dB on the held-out shots",
    }
    entry.update(changes)
    return entry


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- storage: conditional writes -------------------------------------------------------------


def test_write_if_absent_never_replaces_an_object(root):
    uri = f"{root}/obj"
    assert storage.write_bytes_if_absent(uri, b"first")
    assert not storage.write_bytes_if_absent(uri, b"second")
    assert storage.read_bytes(uri) == b"first"
    assert storage.write_bytes_if_absent(uri, b"first")  # exactly these bytes: a retried create is fine


def test_write_if_match_is_a_compare_and_swap(root):
    uri = f"{root}/pointer"
    storage.write_bytes_if_absent(uri, b"1")
    data, token = storage.read_bytes_with_etag(uri)
    assert data == b"1"
    assert storage.write_bytes_if_match(uri, b"2", token)
    assert not storage.write_bytes_if_match(uri, b"3", token)  # stale token: refused
    assert storage.read_bytes(uri) == b"2"
    assert not storage.write_bytes_if_match(f"{root}/missing", b"x", token)
    assert not storage.write_bytes_if_match(f"{root}/no/such/folder", b"x", token)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes_with_etag(f"{root}/missing")


def test_concurrent_compare_and_swap_loses_no_update(root):
    uri = f"{root}/counter"
    storage.write_bytes_if_absent(uri, b"0")

    def add(times):
        for _ in range(times):
            while True:
                data, token = storage.read_bytes_with_etag(uri)
                if storage.write_bytes_if_match(uri, str(int(data) + 1).encode(), token):
                    break

    threads = [threading.Thread(target=add, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_bytes(uri) == b"20"


def test_conditional_writes_refuse_stores_without_them():
    with pytest.raises(ValueError, match="conditional writes"):
        storage.write_bytes_if_absent("memory://somewhere/x", b"x")


def test_the_probe_tells_a_store_that_enforces_conditional_writes_from_one_that_ignores_them(
        s3_bucket, s3_proxy, tmp_path):
    assert storage.probe_conditional_writes(str(tmp_path)) is None
    assert storage.probe_conditional_writes(f"{s3_bucket}/registry") is None  # moto enforces them
    s3_proxy.ignore_conditions = True  # a store that accepts the headers and overwrites anyway
    assert "If-None-Match" in storage.probe_conditional_writes(f"{s3_bucket}/registry")
    assert list(storage.iter_objects(s3_bucket)) == []  # the probe cleans up after itself


def test_a_store_that_ignores_conditional_writes_gets_no_publication(s3_bucket, s3_proxy):
    s3_proxy.ignore_conditions = True
    with pytest.raises(storage.ConditionalWritesIgnoredError, match="does not honour conditional writes"):
        Registry(f"{s3_bucket}/registry").publish("manga", b"w1", lineage(), promote=True)
    assert list(storage.iter_objects(s3_bucket)) == []


# --- registry --------------------------------------------------------------------------------


def test_a_version_that_does_not_beat_its_source_is_kept_but_not_made_current(root):
    reg = Registry(root)
    v1 = reg.publish("manga", b"weights-1", lineage(), centroid=np.arange(512, dtype=np.float32) / 512, promote=True)
    v2 = reg.publish("manga", b"weights-2", lineage(reason="no gain: -0.10 dB on the held-out shots"), promote=False)
    assert (v1.version, v1.promoted, v2.version, v2.promoted) == (1, True, 2, False)
    assert reg.current("manga").version == 1
    kept = reg.get("manga", 2)
    assert not kept.promoted and kept.doc["reason"].startswith("no gain")
    assert storage.read_bytes(kept.model_uri) == b"weights-2"
    assert kept.doc["model"]["file_sha256"] == sha(b"weights-2")
    assert v1.ref == f"{reg.uri}/manga/v1"


def test_entries_are_reloaded_by_a_fresh_registry_with_their_lineage(root):
    centroid = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    Registry(root).publish("urban", b"weights", lineage(), centroid=centroid, promote=True)
    entry = Registry(root).current("urban")
    assert entry.version == 1 and entry.domain == "urban"
    np.testing.assert_array_equal(entry.centroid, centroid)  # float32 survives JSON exactly
    doc = entry.doc
    assert doc["schema"] == "clipsr/registry-entry/v1"
    assert doc["source_model"] == lineage()["source_model"]
    assert doc["clip_encoder"]["sha256"] == "c" * 64
    assert doc["exemplars"] == lineage()["exemplars"]
    assert doc["scores"]["gain_db"] == 0.8 and doc["seconds"] == 95.5 and doc["code_revision"] == "0123abc"
    assert Registry(root).domains() == ["urban"]


def test_source_models_are_kept_by_content_hash_outside_every_domain(root):
    reg = Registry(root)
    reg.publish("manga", b"delta-1", lineage(), sources=[b"source", b"its parent"], promote=True)
    reg.publish("urban", b"delta-2", lineage(), sources=[b"source"], promote=True)  # shared: one copy
    doc = reg.get("manga", 1).doc
    assert doc["source_model"] == {**lineage()["source_model"], "file_sha256": sha(b"source")}
    assert storage.read_bytes(reg.source_uri(sha(b"source"))) == b"source"
    assert storage.read_bytes(reg.source_uri(sha(b"its parent"))) == b"its parent"
    assert Registry(root).domains() == ["manga", "urban"]
    with pytest.raises(ValueError, match="64 lowercase hex"):
        reg.source_uri("../manga/CURRENT")


def test_a_source_hash_that_does_not_match_the_source_is_refused(tmp_path):
    source = {**lineage()["source_model"], "file_sha256": "0" * 64}
    with pytest.raises(ValueError, match=f"the source bytes give '{sha(b'source')}'"):
        Registry(str(tmp_path / "registry")).publish("manga", b"w", lineage(source_model=source), sources=[b"source"])
    assert not (tmp_path / "registry").exists()


def test_publishing_never_overwrites_an_existing_version(root):
    reg = Registry(root)
    reg.publish("manga", b"w1", lineage(), promote=True)
    v2_key = f"{reg.uri}/manga/versions/v2.json"
    foreign = json.dumps({"written by": "a concurrent writer"}).encode()
    storage.write_bytes_if_absent(v2_key, foreign)  # another writer claims v2 first
    entry = reg.publish("manga", b"w3", lineage(), promote=True)
    assert entry.version == 3
    assert storage.read_bytes(v2_key) == foreign
    assert reg.current("manga").version == 3
    assert not storage.write_bytes_if_absent(f"{reg.uri}/manga/versions/v1.json", b"{}")
    assert reg.get("manga", 1).doc["model"]["file_sha256"] == sha(b"w1")


def test_set_current_rolls_back_and_refuses_unknown_versions(root):
    reg = Registry(root)
    for i in (1, 2):
        reg.publish("manga", f"w{i}".encode(), lineage(), promote=True)
    assert reg.current("manga").version == 2
    assert reg.set_current("manga", 1).version == 1
    assert Registry(root).current("manga").version == 1
    pointer = json.loads(storage.read_bytes(f"{reg.uri}/manga/CURRENT"))
    assert (pointer["version"], pointer["previous"]) == (1, 2)
    with pytest.raises(EntryNotFoundError, match=r"no version 7 .*\(versions: v1, v2\)"):
        reg.set_current("manga", 7)
    assert reg.current("manga").version == 1
    assert reg.publish("manga", b"w3", lineage(), promote=True).version == 3
    assert reg.current("manga").version == 3


def test_references_resolve_to_current_or_given_versions(root, tmp_path):
    reg = Registry(root)
    reg.publish("manga", b"w1", lineage(), promote=True)
    reg.publish("manga", b"w2", lineage(), promote=False)
    reg.publish("urban", b"u1", lineage(), promote=False)
    assert reg.resolve(f"{root}/manga").version == 1
    assert reg.resolve(f"{root}/manga/v2").version == 2
    assert resolve_ref(f"{root}/manga").version == 1
    assert resolve_ref(f"{root}/manga/v2/").model_uri == reg.get("manga", 2).model_uri
    with pytest.raises(EntryNotFoundError, match="no current version.*urban/v1"):
        resolve_ref(f"{root}/urban")
    with pytest.raises(EntryNotFoundError, match="no domain 'mangaa'.*manga, urban"):
        resolve_ref(f"{root}/mangaa")
    with pytest.raises(EntryNotFoundError, match="no version 9"):
        resolve_ref(f"{root}/manga/v9")
    # Not references: a checkpoint file, also one at a registry's top level, and plain names.
    checkpoint = tmp_path / "ckpt" / "model.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    storage.write_bytes_atomic(f"{root}/model.safetensors", b"x")
    assert resolve_ref(str(checkpoint)) is None
    assert resolve_ref(f"{root}/model.safetensors") is None
    assert resolve_ref("model.safetensors") is None


def test_centroids_are_those_of_current_entries(root):
    reg = Registry(root)
    reg.publish("manga", b"m1", lineage(), centroid=np.zeros(4), promote=True)
    reg.publish("manga", b"m2", lineage(), centroid=np.ones(4), promote=False)
    reg.publish("urban", b"u1", lineage(), centroid=np.ones(4), promote=False)  # never current
    reg.publish("nocentroid", b"n1", lineage(), promote=True)
    found = Registry(root).centroids()
    assert sorted(found) == ["manga"]
    entry, centroid = found["manga"]
    assert entry.version == 1 and centroid.dtype == np.float32 and not centroid.any()


def test_concurrent_publishers_get_distinct_versions_and_current_ends_on_the_newest(root):
    reg = Registry(root)
    start = threading.Barrier(4)
    results: dict[int, object] = {}

    def publish(i):
        start.wait()
        try:
            results[i] = Registry(root).publish("manga", f"weights-{i}".encode(), lineage(settings={"worker": i}),
                                                promote=True)
        except Exception as e:  # noqa: BLE001  reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert sorted(e.version for e in results.values()) == [1, 2, 3, 4]
    for i, entry in results.items():  # each version holds its own publisher's model
        assert reg.get("manga", entry.version).doc["model"]["file_sha256"] == sha(f"weights-{i}".encode())
    assert reg.current("manga").version == 4  # promotions only move CURRENT forward


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 65, "v2", "with space", None])
def test_bad_domain_names_are_refused_before_anything_is_written(tmp_path, name):
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(InvalidDomainError, match="invalid domain name"):
        reg.publish(name, b"w", lineage(), promote=True)
    with pytest.raises(InvalidDomainError):
        reg.current(name)
    assert not (tmp_path / "registry").exists()


def _without(path: str) -> dict:
    entry = lineage()
    *parents, last = path.split(".")
    node = entry
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    del node[last]
    return entry


@pytest.mark.parametrize("missing", ["source_model", "source_model.weights_sha256", "clip_encoder", "exemplars",
                                     "exemplars.0.sha256", "code_revision", "scores", "model.kind"])
def test_an_entry_missing_lineage_is_refused_before_anything_is_written(tmp_path, missing):
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(ConfigError, match="registry-entry"):
        reg.publish("manga", b"w", _without(missing), promote=True)
    assert not (tmp_path / "registry").exists()


@pytest.mark.parametrize("changes, message", [
    ({"version": 5}, "set by the registry"),
    ({"model": {"id": "m", "kind": "full", "weights_sha256": "d" * 64, "file_sha256": "0" * 64}}, "the model bytes give"),
    ({"settings": {"aws_secret_access_key": "x"}}, "looks like a credential"),
    ({"exemplars": [{"uri": "https://user:pw@example.com/a.png", "sha256": "b" * 64}]}, "credentials"),
    ({"exemplars": [{"uri": "https://h/a.png?X-Amz-Signature=abc", "sha256": "b" * 64}]}, "signature"),
    ({"scores": {"gain_db": float("nan")}}, "NaN"),
])
def test_inconsistent_or_secret_bearing_entries_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        Registry(str(tmp_path / "registry")).publish("manga", b"w", lineage(**changes))
    assert not (tmp_path / "registry").exists()


def test_s3_conflicts_between_writes_in_flight_are_retried(monkeypatch):
    """AWS answers 409 ConditionalRequestConflict when two conditional writes to one key overlap
    (moto never does): the write is retried, and a 412 then means the other one won."""

    class ClientError(Exception):
        response = {"Error": {"Code": "ConditionalRequestConflict"}, "ResponseMetadata": {"HTTPStatusCode": 409}}

    class FakeS3:
        def __init__(self):
            self.calls = 0

        def pipe_file(self, path, data, mode):
            self.calls += 1
            if self.calls == 1:
                raise OSError(5, "conflict") from ClientError()

    fs = FakeS3()
    monkeypatch.setattr(storage, "filesystem", lambda uri: (fs, uri[5:]))
    assert storage.write_bytes_if_absent("s3://bucket/key", b"x")
    assert fs.calls == 2


# --- the `clipsr registry` command -----------------------------------------------------------


def test_registry_command_lists_shows_and_rolls_back(tmp_path, capsys):
    from clipsr.cli import main

    reg = Registry(str(tmp_path / "registry"))
    reg.publish("manga", b"w1", lineage(), promote=True)
    reg.publish("manga", b"w2", lineage(scores={"gain_db": 0.3}), promote=True)
    reg.publish("urban", b"u1", lineage(scores={"gain_db": -0.1}), promote=False)

    assert main(["registry", "list", reg.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    manga = next(line for line in lines if " manga " in line)
    urban = next(line for line in lines if " urban " in line)
    assert manga.startswith("*") and "v2" in manga and "+0.300" in manga and "latest" not in manga
    assert not urban.startswith("*") and "v1" in urban and " no " in urban  # never promoted

    assert main(["registry", "set-current", f"{reg.uri}/manga/v1"]) == 0
    assert "current v2 -> v1" in capsys.readouterr().out
    assert Registry(reg.uri).current("manga").version == 1

    assert main(["registry", "list", reg.uri]) == 0
    assert "(latest v2)" in next(line for line in capsys.readouterr().out.splitlines() if " manga " in line)
    assert main(["registry", "list", f"{reg.uri}/manga"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if " manga " in line]
    assert [row.startswith("*") for row in rows] == [True, False]

    assert main(["registry", "show", f"{reg.uri}/manga"]) == 0
    assert capsys.readouterr().out.startswith(f"{reg.uri}/manga/v1: current;")
    assert main(["registry", "show", f"{reg.uri}/manga", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1

    assert main(["registry", "set-current", f"{reg.uri}/manga"]) == 1  # which version? never guessed
    assert "expected REGISTRY/DOMAIN/vN" in capsys.readouterr().err
    assert main(["registry", "set-current", f"{reg.uri}/manga/v9"]) == 1
    assert "no version 9" in capsys.readouterr().err
    assert main(["registry", "list", str(tmp_path)]) == 1
    assert "neither a registry" in capsys.readouterr().err
    assert Registry(reg.uri).current("manga").version == 1
