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


# A spec's YAML is a few levels deep and repeats itself with a handful of aliases at most. The
# limits refuse alias bombs ("billion laughs": each alias doubles what the next expands to) and
# nesting deep enough to exhaust recursion, while the document is still a tree of YAML nodes.
MAX_YAML_DEPTH = 64
MAX_YAML_ALIASES = 100
# Values in the text, and once aliases are expanded: a 10 KB spec has ~1,000, a 1,000-node
# cluster written out ~10,000 (bigger clusters come from presets or node labels); composing
# 2**15 takes a few tenths of a second, 2**18 already two on a busy machine.
MAX_YAML_NODES = 1 << 15

# libyaml's parser (when PyYAML was built with it) makes the events 20x faster than PyYAML's
# Python scanner, which takes minutes over 4 MiB of `[1,1,1,...`; composing stays in Python,
# where the limits below are counted.
_EventParser = getattr(yaml, "cyaml", None) and yaml.cyaml.CParser

_FLOW_RUN = re.compile(r"(?:[\[{][ \t\r\n]*){%d}" % (MAX_YAML_DEPTH + 1))


class _YamlLimit(Exception):
    """A limit of `_BoundedLoader` exceeded; `mark` is where."""

    def __init__(self, problem: str, mark: object):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _PythonEvents(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's own event source, where libyaml is missing."""

    def __init__(self, stream: str):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


class _BoundedLoader(yaml.composer.Composer, _EventParser or _PythonEvents,
                     yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """A safe loader that counts values, aliases and nesting depth while composing, before any
    Python object is built. Composer comes first so that its Python composing (where the
    counts are kept) is used over libyaml's."""

    def __init__(self, stream: str):
        (_EventParser or _PythonEvents).__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._aliases = 0
        self._nodes = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise _YamlLimit(f"more than {MAX_YAML_ALIASES} aliases (*name) (remove the "
                                 "anchors and aliases; write the values out)",
                                 self.peek_event().start_mark)
            return super().compose_node(parent, index)
        event = self.peek_event()
        if getattr(event, "tag", None) not in (None, "!"):
            # A spec needs no tags, and PyYAML's constructors fail on tagged values in ways of
            # their own (`!!int ''` is an IndexError): refused, with the place.
            raise _YamlLimit(f"explicit tag {event.tag!r} (a spec needs none: remove it, and "
                             "quote a value to keep it as text)", event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _YamlLimit(f"more than {MAX_YAML_NODES} values (a spec has a few thousand; "
                             "is this the right file?)", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nested more than {MAX_YAML_DEPTH} levels deep (a spec is a "
                                 "few levels deep; flatten the document)",
                                 self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_NODES values, or make it refer to
    itself: each distinct node is weighed once, so the check is linear in the text."""
    weight: dict[int, int] = {}
    open_nodes: set[int] = set()

    def weigh(node: yaml.Node) -> int:  # recursion bounded by MAX_YAML_DEPTH
        key = id(node)
        if key in weight:
            return weight[key]
        if key in open_nodes:
            raise _YamlLimit("an alias refers to a value that contains it (remove the "
                             "recursive alias)", node.start_mark)
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(weigh(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(weigh(k) + weigh(v) for k, v in node.value)
        if total > MAX_YAML_NODES:
            raise _YamlLimit(f"aliases expand the document past {MAX_YAML_NODES} values (an "
                             "alias bomb?); write the values out instead", node.start_mark)
        open_nodes.discard(key)
        weight[key] = total
        return total

    weigh(root)


def parse_yaml(text: str, source: str) -> object:
    """The document in `text`, within the limits above (values, aliases, their expansion,
    nesting) and without tags; bad syntax and exceeded limits become one SpecError line naming
    the place."""
    # A run of flow openers ("[[[[..."): refused before parsing; PyYAML's Python scanner would
    # first look ahead up to 1,024 characters of them, each a pending simple key (~0.3 s).
    run = _FLOW_RUN.search(text) if text.count("[") + text.count("{") > MAX_YAML_DEPTH else None
    if run is not None:
        line = text.count("\n", 0, run.start()) + 1
        column = run.start() - (text.rfind("\n", 0, run.start()) + 1) + 1
        raise SpecError(source, [f"<yaml>: line {line}, column {column}: nested more than "
                                 f"{MAX_YAML_DEPTH} levels deep (a spec is a few levels deep; "
                                 "flatten the document)"])
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except _YamlLimit as e:
        where = f"line {e.mark.line + 1}, column {e.mark.column + 1}: " if e.mark else ""
        raise SpecError(source, [f"<yaml>: {where}{e.problem}"]) from None
    except RecursionError:  # a limit above should make this unreachable; never a traceback
        raise SpecError(source, [f"<yaml>: nested too deeply (at most {MAX_YAML_DEPTH} "
                                 "levels)"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(source, [f"<yaml>: {where}{problem} (fix the YAML syntax there)"]) from None
    except UnicodeError as e:  # text from an API (a ConfigMap) may hold a lone surrogate
        raise SpecError(source, [f"<yaml>: not valid Unicode text ({e.reason} at character "
                                 f"{e.start}; save it as UTF-8)"]) from None
    except (ValueError, OverflowError) as e:  # a scalar PyYAML resolves but cannot convert
        raise SpecError(source, [f"<yaml>: a value cannot be read ({_short(str(e), 120)}; "
                                 "quote it to keep it as text)"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml(path: str | Path) -> dict:
    """The mapping at the top of a YAML file; missing files, bad syntax, alias bombs and deep
    nesting become SpecError."""
    source = str(path)
    text = read_bounded(path, "spec")
    data = parse_yaml(text, source)
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
        if part == "[key]":  # pydantic's marker for a problem with the dict key itself
            return text or "<top>", None, None, ()
        values = _value_type(annotation) if cls is None else None
        if values is not None and isinstance(part, str):  # a key of a dict field
            text = _join(text, part)
            annotation, cls = values, _model_in(values)
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


def _value_type(annotation: object) -> object | None:
    """The value type of a `dict[K, V]` annotation (or of `dict[K, V] | None`), else None."""
    if typing.get_origin(annotation) is dict:
        args = typing.get_args(annotation)
        return args[1] if len(args) == 2 else typing.Any
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _value_type(arg)
            if found is not None:
                return found
    return None


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
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4,300-digit limit for str()
        text = f"<a number of {value.bit_length()} bits>" if isinstance(value, int) else "<?>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
