"""Configuration as data: YAML/JSON documents validated against the published JSON Schemas."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A configuration or metadata document that does not match its schema."""


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """A schema by name (``checkpoint`` -> ``schemas/checkpoint.schema.json``)."""
    try:
        text = resources.files("clipsr").joinpath("schemas").joinpath(f"{name}.schema.json").read_text()
    except FileNotFoundError:
        raise ConfigError(f"no schema named {name!r}") from None
    return json.loads(text)


def validate(doc: Any, schema: str) -> None:
    """Raise ConfigError naming the first offending field, if ``doc`` does not match ``schema``."""
    validator = jsonschema.Draft202012Validator(load_schema(schema))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"{schema}: {where}: {e.message}")


def parse_document(text: str | bytes) -> Any:
    """Parse YAML or JSON (JSON is YAML), with an error that says what was wrong."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML/JSON: {e}") from None
