"""The published schemas: valid JSON Schema, versioned ids that match their file names, and
reachable both from the package and from the repository's top-level schemas/ folder."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from clipsr.config import ConfigError, load_schema, validate

REPO = Path(__file__).resolve().parents[1]
PACKAGED = sorted((REPO / "clipsr" / "schemas").glob("*.schema.json"))


def test_every_schema_is_published_at_the_top_level():
    assert {p.name for p in PACKAGED} == {p.name for p in (REPO / "schemas").glob("*.schema.json")}
    assert {p.name.removesuffix(".schema.json") for p in PACKAGED} >= {
        "checkpoint", "domain-spec", "manifest", "pretrain", "registry-entry", "route-map"}


@pytest.mark.parametrize("path", PACKAGED, ids=lambda p: p.name)
def test_schemas_are_valid_and_versioned(path):
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    name = path.name.removesuffix(".schema.json")
    assert re.fullmatch(rf"clipsr/{re.escape(name)}/v[1-9][0-9]*", schema["$id"]), schema["$id"]
    assert schema["title"] and schema["description"]
    assert load_schema(name) == schema  # what the code validates against is what is published
    for example in schema.get("examples", []):
        validate(example, name)


def test_validation_names_the_offending_field():
    with pytest.raises(ConfigError, match=r"route-map: scans/: 'a b' does not match"):
        validate({"scans/": "a b"}, "route-map")
    with pytest.raises(ConfigError, match="no schema named"):
        validate({}, "nonexistent")
