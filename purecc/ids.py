"""Concept identifiers: the only names that ever become path components in a store."""

from __future__ import annotations

import re

CONCEPT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_CONCEPT_ID = re.compile(CONCEPT_ID_PATTERN)
TRIGGER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"
_TRIGGER = re.compile(TRIGGER_PATTERN)


def validate_concept_id(value: str, field: str = "concept_id") -> str:
    """Return ``value`` if it is a valid concept id, else raise ValueError naming the field."""
    if not isinstance(value, str) or not _CONCEPT_ID.fullmatch(value):
        raise ValueError(
            f"{field}: {value!r} is not a valid concept id (expected {CONCEPT_ID_PATTERN}: "
            "lowercase letters, digits, '_' or '-', at most 64 characters)"
        )
    return value


def validate_trigger(value: str, field: str = "trigger") -> str:
    """A trigger word is one token-like word substituted for the ``[v]`` placeholder."""
    if not isinstance(value, str) or not _TRIGGER.fullmatch(value):
        raise ValueError(f"{field}: {value!r} is not a valid trigger word (expected {TRIGGER_PATTERN})")
    return value
