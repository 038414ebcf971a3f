"""A recipe from the command line: ``--recipe FILE.yaml`` and ``--set dotted.path=value`` on top.

Values are parsed as YAML scalars (``1e-4`` is a float, as YAML 1.2 reads it, ``true`` a bool, ``[a, b]`` a list), so a
``--set`` means what the same text means in a recipe file. The result is validated by
``purecc.recipe.RecipeFields``; every problem is reported as one ``ValueError`` naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from .recipe import RecipeFields

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_set(item: str) -> tuple[list[str], Any]:
    """``stage1.lr=1e-4`` -> (["stage1", "lr"], 0.0001); ``ValueError`` for a malformed item."""
    path, sep, raw = item.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise ValueError(f"--set {item!r}: expected FIELD=VALUE with a dotted field, e.g. stage1.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)   # YAML 1.1 (PyYAML) reads 1e-4 as a string; a recipe means the number
    return [k.strip() for k in keys], value


def apply_set(data: dict, keys: list[str], value: Any) -> dict:
    """A copy of ``data`` with ``value`` at the nested ``keys`` (sections are created as needed)."""
    out = dict(data)
    node = out
    for key in keys[:-1]:
        section = node.get(key, {})
        if not isinstance(section, dict):
            raise ValueError(f"--set {'.'.join(keys)}: {key} is a value, not a section")
        node[key] = dict(section)
        node = node[key]
    node[keys[-1]] = value
    return out


def read_recipe_file(path: str | Path) -> dict:
    """A recipe YAML (or JSON) file as a mapping; ``ValueError`` naming the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--recipe: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--recipe {p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--recipe {p}: expected a mapping of recipe fields, got {type(data).__name__}")
    return data


def validation_message(exc: ValidationError, where: str) -> str:
    """pydantic's errors as ``where: field.path: problem`` lines (unknown fields said so)."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        problem = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: {field}: {problem}")
    return "; ".join(lines)


def build_recipe(file: str | Path | None = None, sets: Iterable[str] = (),
                 flags: Iterable[tuple[list[str], Any]] = ()) -> RecipeFields:
    """The file, then the named flags (``(["stage1", "steps"], 3)``), then each ``--set`` in order,
    validated as a whole (``ValueError`` naming every bad field)."""
    data = read_recipe_file(file) if file else {}
    for keys, value in [*flags, *(parse_set(item) for item in sets)]:
        data = apply_set(data, keys, value)
    try:
        fields = RecipeFields(**data)
    except (ValidationError, TypeError) as exc:
        if isinstance(exc, TypeError):   # a section given a scalar, e.g. stage1=3
            raise ValueError(f"recipe: {exc}") from None
        raise ValueError(validation_message(exc, "recipe")) from None
    for stage in (1, 2):
        fields.stage(stage)  # combinations the schema cannot see (StageRecipe's own checks)
    return fields
