"""Fingerprints of settings: one convention for collect ids, filter's journal keys, format and run.

A fingerprint hashes every setting that decides *what* a stage produces. Settings of *how* the work
runs (concurrency, retries, URLs, client timeouts, pool sizes) are marked once, where they are
declared, with ``json_schema_extra=HOW``, and left out everywhere. The rule fails safe: a new
setting is in every fingerprint unless someone marks it, so stale work is never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel

HOW: dict[str, Any] = {"tracegen_how": True}
"""Field metadata: this setting changes how the work runs, not what it produces."""


def how_fields(model: type[BaseModel]) -> set[str]:
    """Names of ``model``'s fields marked :data:`HOW`."""
    return {
        name
        for name, field in model.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("tracegen_how")
    }


def deciding(model: BaseModel, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The settings of ``model`` that decide what it produces, as JSON values (nested models likewise)."""
    skip = how_fields(type(model)) | set(exclude)
    return {name: deciding_value(getattr(model, name)) for name in type(model).model_fields if name not in skip}


def deciding_value(value: Any) -> Any:
    """``value`` as JSON values, with every settings model in it reduced to its :func:`deciding` settings."""
    if isinstance(value, BaseModel):
        return deciding(value)
    if isinstance(value, dict):
        return {str(k): deciding_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [deciding_value(v) for v in value]
    return value


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value (16 hex digits)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_settings(old: Any, new: Any, path: str = "") -> list[str]:
    """``path: old -> new`` for every leaf that differs between two JSON-like settings trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            changes += changed_settings(old.get(key), new.get(key), where)
        return changes
    if old == new:
        return []
    return [f"{path or 'settings'}: {json.dumps(old)} -> {json.dumps(new)}"]
