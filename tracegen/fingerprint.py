"""Fingerprints of settings: one convention for collect ids, filter's journal keys, format and run.

A fingerprint hashes every setting that decides *what* a stage produces. Settings of *how* the work
runs (concurrency, retries, URLs, client timeouts, pool sizes) are marked once, where they are
declared, with ``json_schema_extra=HOW``, and left out everywhere. The rule fails safe: a new
setting is in every fingerprint unless someone marks it, so stale work is never silently reused.

A setting added later whose default reproduces what tracegen did before it existed is marked
:data:`ADDED`: it counts only when set to something else, so runs started before it was added keep
their ids and resume (``tests/test_fingerprint.py`` pins the default collect fingerprint, so a new
unmarked setting fails that test instead of silently orphaning every earlier run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel

HOW: dict[str, Any] = {"tracegen_how": True}
"""Field metadata: this setting changes how the work runs, not what it produces."""


ADDED: dict[str, Any] = {"tracegen_added": True}
"""Field metadata: added after ``fingerprint_version`` 2 with a default that changes nothing; it counts
only when it differs from that default."""


def _marked(field: Any, key: str) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get(key))


def how_fields(model: type[BaseModel]) -> set[str]:
    """Names of ``model``'s fields marked :data:`HOW`."""
    return {name for name, field in model.model_fields.items() if _marked(field, "tracegen_how")}


def deciding(model: BaseModel, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The settings of ``model`` that decide what it produces, as JSON values (nested models likewise)."""
    skip = how_fields(type(model)) | set(exclude)
    fields = type(model).model_fields
    return {
        name: deciding_value(getattr(model, name))
        for name, field in fields.items()
        if name not in skip
        and not (
            _marked(field, "tracegen_added") and getattr(model, name) == field.get_default(call_default_factory=True)
        )
    }


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
