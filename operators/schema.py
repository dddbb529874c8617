"""Pydantic JSON schema -> Kubernetes structural OpenAPI v3 schema, and back to JSON Schema.

Kubernetes accepts only *structural* schemas in a CRD: every node has a `type` (or is marked
int-or-string / preserve-unknown-fields), `$ref`/`$defs` are not allowed, `anyOf` may not carry
types (except the int-or-string pattern) and `exclusiveMinimum` is a boolean (OpenAPI 3.0).
Pydantic emits JSON Schema 2020-12, so this module rewrites one into the other. The reverse
direction (`build_validation_schema`) lets tests validate objects with `jsonschema` the way the API
server would: unknown fields are rejected (strict field validation), `nullable` admits null.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

# Keywords that carry meaning for the API server; pydantic's `title` is documentation noise.
_KEEP = ("description", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
         "maxItems", "enum", "format", "default")


class SchemaConversionError(ValueError):
    """A pydantic schema construct that has no structural OpenAPI equivalent."""


def build_structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `model` (inline, no `$ref`, Kubernetes flavoured)."""
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, path=model.__name__)


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline a `$ref`, keeping the referencing node's own keywords (description, default)."""
    if "$ref" not in node:
        return node
    name = node["$ref"].rsplit("/", 1)[-1]
    if name not in defs:
        raise SchemaConversionError(f"{path}: $ref {node['$ref']!r} not found in $defs")
    merged = copy.deepcopy(defs[name])
    merged.update({k: v for k, v in node.items() if k != "$ref"})
    return merged


def _convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    node = _resolve(node, defs, path)
    if "anyOf" in node:
        return _convert_union(node, defs, path)
    out: dict[str, Any] = {}
    if "const" in node:
        out["enum"] = [node["const"]]
    kind = node.get("type")
    if kind is None and not node.get("enum") and "const" not in node:
        # An untyped node (e.g. dict[str, Any] values): accept anything, keep it verbatim.
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind is not None:
        out["type"] = kind
    elif "const" in node or node.get("enum"):
        out["type"] = _enum_type(node.get("enum") or [node["const"]], path)
    for key in _KEEP:
        if key in node and key not in out:
            out[key] = node[key]
    _numeric_bounds(node, out)
    if out.get("default", 0) is None:
        del out["default"]  # null defaults are the absence of the field
    if kind == "object":
        _convert_object(node, defs, path, out)
    elif kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, f"{path}[]")
    return out


def _convert_object(node: dict, defs: dict, path: str, out: dict) -> None:
    props = node.get("properties")
    extra = node.get("additionalProperties")
    if props:
        out["properties"] = {k: _convert(v, defs, f"{path}.{k}") for k, v in props.items()}
        required = node.get("required")
        if required:
            out["required"] = list(required)
        # additionalProperties: false is implied: the API server prunes (or, with strict field
        # validation, rejects) unknown fields of a structural schema; it may not be written.
    elif isinstance(extra, dict) and extra:
        out["additionalProperties"] = _convert(extra, defs, f"{path}.*")
        if out["additionalProperties"].get("x-kubernetes-preserve-unknown-fields"):
            del out["additionalProperties"]
            out["x-kubernetes-preserve-unknown-fields"] = True
    else:
        out["x-kubernetes-preserve-unknown-fields"] = True


def _numeric_bounds(node: dict, out: dict) -> None:
    # JSON Schema 2020-12 has numeric exclusive bounds; OpenAPI 3.0 has boolean flags.
    if "exclusiveMinimum" in node:
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True


def _enum_type(values: list, path: str) -> str:
    kinds = {type(v) for v in values}
    if kinds <= {str}:
        return "string"
    if kinds <= {int}:
        return "integer"
    raise SchemaConversionError(f"{path}: enum mixes types {sorted(k.__name__ for k in kinds)}")


def _convert_union(node: dict, defs: dict, path: str) -> dict[str, Any]:
    options = [_resolve(o, defs, path) for o in node["anyOf"]]
    non_null = [o for o in options if o.get("type") != "null"]
    shared = {k: node[k] for k in ("description", "default") if k in node}
    if len(non_null) == 1:  # X | None
        out = _convert({**non_null[0], **shared}, defs, path)
        out["nullable"] = True
        return out
    kinds = sorted(o.get("type", "?") for o in non_null)
    values = [o.get("enum") or ([o["const"]] if "const" in o else None) for o in non_null]
    if set(kinds) == {"string"} and all(values):
        # Literal[...] | 'auto': one string enum of all their values
        return {"type": "string", "enum": [v for vs in values for v in vs], **shared}
    if kinds == ["integer", "string"]:
        # int | 'auto': the int-or-string pattern. Value checks stay outside anyOf: `minimum`
        # applies to numbers only and `pattern` to strings only, so they do not interfere.
        integer = next(o for o in non_null if o["type"] == "integer")
        text = next(o for o in non_null if o["type"] == "string")
        out: dict[str, Any] = {"x-kubernetes-int-or-string": True,
                               "anyOf": [{"type": "integer"}, {"type": "string"}]}
        _numeric_bounds(integer, out)
        for key in ("minimum", "maximum"):
            if key in integer:
                out[key] = integer[key]
        allowed = text.get("enum") or ([text["const"]] if "const" in text else None)
        if allowed:
            out["pattern"] = "^(" + "|".join(allowed) + ")$"
        out.update(shared)
        return out
    if kinds == ["number", "string"]:
        # float | 'auto' has no structural form (int-or-string rejects 2.5e8). Accept the value
        # as given; the operator validates it with the pydantic model and reports the field.
        out = {"x-kubernetes-preserve-unknown-fields": True}
        out.update(shared)
        out["description"] = (shared.get("description", "") + " (number or 'auto'; checked by "
                              "the operator)").strip()
        return out
    raise SchemaConversionError(f"{path}: union of {kinds} has no structural OpenAPI form")


def build_validation_schema(openapi: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """A JSON Schema (draft 4 semantics) equivalent to a Kubernetes OpenAPI v3 schema.

    `nullable: true` admits null; with `strict`, objects with `properties` reject other keys,
    like `kubectl apply --validate=strict` does.
    """
    node = {k: v for k, v in openapi.items() if not k.startswith("x-kubernetes-")}
    if openapi.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
    if "properties" in node:
        node["properties"] = {k: build_validation_schema(v, strict=strict)
                              for k, v in node["properties"].items()}
        if strict and not openapi.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = build_validation_schema(node["additionalProperties"],
                                                               strict=strict)
    if "items" in node:
        node["items"] = build_validation_schema(node["items"], strict=strict)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [build_validation_schema(o, strict=strict) for o in node[key]]
    if node.pop("nullable", False):
        if "type" in node:
            node["type"] = [node["type"], "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    if "x-kubernetes-embedded-resource" in openapi and "properties" not in node:
        node.setdefault("type", "object")
    node.pop("default", None)
    return node
