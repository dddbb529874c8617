"""Loading spec files: YAML -> pydantic model, with every user mistake as one readable line."""

from __future__ import annotations

import difflib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from specs.errors import SpecError
from specs.files import read_bounded

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; missing files and bad syntax become SpecError."""
    source = str(path)
    text = read_bounded(path, "spec")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, [f"<yaml>: {where}{problem} (fix the YAML syntax there)"]) from None
    if not isinstance(data, dict):
        raise SpecError(source, [f"<top>: expected a mapping of fields (got {_short(data)}; "
                                 "the file must start with `name: ...` style keys)"])
    return data


def load_model(path: str | Path, model: type[M]) -> M:
    """Validate a YAML file against `model`, raising SpecError with one line per problem."""
    return validate_data(read_yaml(path), model, source=str(path))


def load_or_report(path: str | Path, model: type[M]) -> M | None:
    """`load_model` for a command's main: the problems printed to stderr and None (the caller
    exits 2) instead of SpecError."""
    try:
        return load_model(path, model)
    except SpecError as e:
        print(e.render(), file=sys.stderr)
        return None


def validate_data(data: object, model: type[M], *, source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(source, format_errors(e, model)) from None


def format_errors(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """One `path.to.field: problem (got X; hint)` line per field, union alternatives merged."""
    merged: dict[str, list[str]] = {}
    inputs: dict[str, object] = {}
    for err in error.errors(include_url=False):
        path, field, owner, rest = _walk(model, err["loc"])
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        kind = err["type"]
        if kind == "extra_forbidden" and owner is not None:
            name = str(err["loc"][-1])
            allowed = list(owner.model_fields)
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            line = f"unknown field (got {_short(err['input'])}; {hint})"
        elif kind == "missing":
            desc = field.description if field is not None else None
            line = "required field is missing (add it" + (f": {desc}" if desc else "") + ")"
        elif kind in ("value_error", "assertion_error"):
            line = msg
        elif kind == "string_pattern_mismatch":
            desc = field.description if field is not None else msg
            line = f"not an allowed value (got {_short(err['input'])}; {desc})"
        else:
            desc = field.description if field is not None else None
            line = f"{msg} (got {_short(err['input'])}" + (f"; {desc}" if desc else "") + ")"
        if rest:  # an alternative of a union (e.g. int | 'auto'): merge under the field
            inputs.setdefault(path, err["input"])
            line = msg
        merged.setdefault(path, [])
        if line not in merged[path]:
            merged[path].append(line)
    lines = []
    for path, problems in merged.items():
        if path in inputs:
            options = " or ".join(p.removeprefix("Input should be ") for p in problems)
            lines.append(f"{path}: should be {options} (got {_short(inputs[path])})")
        else:
            lines.extend(f"{path}: {p}" for p in problems)
    return lines


def _walk(model: type[BaseModel], loc: tuple) -> tuple[str, object, type[BaseModel] | None, tuple]:
    """Render `loc` as `a.b[0].c`, returning the last field's FieldInfo, its owner model and any
    trailing location parts that are union-branch tags rather than fields."""
    text, cls, field, owner = "", model, None, model
    annotation: object = model
    for i, part in enumerate(loc):
        if isinstance(part, int) and cls is None:  # an index into a list
            text += f"[{part}]"
            annotation = _item_type(annotation)
            cls = _model_in(annotation)
            continue
        if cls is None or part not in cls.model_fields:
            if cls is not None and i == len(loc) - 1:  # an unknown key inside `cls`
                return _join(text, part), None, cls, ()
            return text or "<top>", field, cls, tuple(loc[i:])
        owner, field = cls, cls.model_fields[part]
        text = _join(text, part)
        annotation = field.annotation
        cls = _model_in(annotation)
    return text or "<top>", field, owner if field is not None else cls, ()


def _join(text: str, key: object) -> str:
    """Append a mapping key: `a.b` for names, `a["odd key"]` for anything else."""
    if isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{text}.{key}" if text else key
    return f"{text}[{json.dumps(str(key))}]"


def _item_type(annotation: object) -> object:
    for arg in typing.get_args(annotation) or ():
        if typing.get_origin(arg) in (list, tuple) or arg is list:
            return _item_type(arg)
    args = typing.get_args(annotation)
    return args[0] if typing.get_origin(annotation) in (list, tuple) and args else annotation


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
