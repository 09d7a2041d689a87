"""Frozen config dataclasses built from plain mappings (a recipe block, a ConfigDict's `to_dict()`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def known_fields(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` as keyword arguments of dataclass `cls`; a key that is not a field of `cls` is a KeyError
    naming the class, the unknown keys and the known ones (a typo in a recipe must not pass silently)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    return dict(values)
