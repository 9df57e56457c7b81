"""Pretraining settings: packaged defaults, then a config file, then ``--set`` overrides, validated."""
from __future__ import annotations

import copy
import os
from importlib import resources
from typing import Any, Iterable

from clipsr import storage
from clipsr.config import ConfigError, parse_document, validate


def defaults() -> dict[str, Any]:
    return parse_document(resources.files("clipsr").joinpath("train/defaults.yaml").read_text())


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``optim.lr=1e-4`` -> {"optim": {"lr": 0.0001}} (values parsed as YAML scalars/lists)."""
    path, sep, raw = text.partition("=")
    if not sep or not path:
        raise ConfigError(f"override must look like key.sub=value, got {text!r}")
    value: Any = parse_document(raw)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def load_settings(config: str | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    settings = defaults()
    if config is not None:
        doc = parse_document(storage.read_bytes(config))
        if not isinstance(doc, dict):
            raise ConfigError(f"{config}: expected a mapping at the top level")
        settings = merge(settings, doc)
    for text in overrides:
        settings = merge(settings, parse_override(text))
    validate(settings, "pretrain")
    return _absolute_paths(settings)


def _absolute_paths(s: dict[str, Any]) -> dict[str, Any]:
    """Resolve local paths against the driver's working directory, once, before workers see them."""
    s = copy.deepcopy(s)
    s["storage_path"] = storage.absolute(s["storage_path"])
    s["data"]["train"] = [storage.absolute(u) for u in s["data"]["train"]]
    s["data"]["val"] = {k: storage.absolute(u) for k, u in s["data"]["val"].items()}
    for section, key in (("model", "init_from"), ("clip", "weights"), ("loss", "perceptual_weights")):
        value = s[section].get(key)
        if value and (os.path.exists(value) or "/" in value):  # a path, not a name like "default"
            s[section][key] = storage.absolute(value)
    return s
