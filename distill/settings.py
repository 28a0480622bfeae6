"""Typed configs from JSON-able dicts (run configs, UI fields, checkpoints): one check of the keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def checked_settings(cls: type, d: Mapping[str, Any], unknown: str) -> dict[str, Any]:
    """A copy of ``d`` ready for ``cls(**...)``.

    Every key must be a field of the dataclass ``cls``; otherwise ValueError with ``unknown``
    formatted with ``names`` (the unknown keys, sorted). ``target_modules`` comes back as a tuple
    (JSON has only lists).
    """
    extra = set(d) - {f.name for f in fields(cls)}
    if extra:
        raise ValueError(unknown.format(names=", ".join(sorted(extra))))
    out = dict(d)
    if "target_modules" in out:
        out["target_modules"] = tuple(out["target_modules"])
    return out
