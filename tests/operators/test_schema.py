"""The pydantic -> structural OpenAPI conversion, on small models with each construct."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from operators.schema import SchemaConversionError, build_structural_schema, build_validation_schema


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: int = Field(gt=0, description="x")


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Field(description="nested, by reference")
    maybe: Inner | None = Field(None, description="nullable reference")
    degree: Annotated[int, Field(gt=0)] | Literal["auto"] = Field("auto", description="int|auto")
    theta: Annotated[float, Field(gt=0)] | Literal["auto"] = Field("auto", description="f|auto")
    kind: Literal["a", "b"] = Field("a", description="enum")
    labels: dict[str, str] = Field(default_factory=dict, description="map")
    free: dict[str, Any] | None = Field(None, description="anything")
    items: list[Inner] = Field(default_factory=list, description="list of models")


def test_refs_are_inlined_and_descriptions_kept():
    s = build_structural_schema(Outer)
    assert "$defs" not in s and "'$ref'" not in str(s)
    assert s["properties"]["inner"]["properties"]["x"] == {
        "type": "integer", "description": "x", "minimum": 0, "exclusiveMinimum": True}
    assert s["properties"]["inner"]["description"] == "nested, by reference"
    assert s["properties"]["maybe"]["nullable"] is True
    assert s["properties"]["items"]["items"]["properties"]["x"]["type"] == "integer"


def test_unions_maps_and_free_objects():
    p = build_structural_schema(Outer)["properties"]
    assert p["degree"]["x-kubernetes-int-or-string"] is True and "type" not in p["degree"]
    assert p["theta"]["x-kubernetes-preserve-unknown-fields"] is True
    assert p["kind"] == {"type": "string", "description": "enum", "enum": ["a", "b"],
                         "default": "a"}
    assert p["labels"]["additionalProperties"] == {"type": "string"}
    assert p["free"]["x-kubernetes-preserve-unknown-fields"] is True


@pytest.mark.parametrize("value, ok", [({"inner": {"x": 1}, "degree": 4}, True),
                                       ({"inner": {"x": 1}, "degree": "auto"}, True),
                                       ({"inner": {"x": 1}, "degree": "many"}, False),
                                       ({"inner": {"x": 0}}, False),
                                       ({"inner": {"x": 1}, "maybe": None}, True),
                                       ({"inner": {"x": 1, "y": 2}}, False)])
def test_validation_schema_agrees_with_pydantic(value, ok):
    schema = build_validation_schema(build_structural_schema(Outer))
    valid = jsonschema.Draft4Validator(schema).is_valid(value)
    assert valid is ok
    try:
        Outer.model_validate(value)
        assert ok
    except ValueError:
        assert not ok


def test_a_union_without_structural_form_is_refused():
    class Bad(BaseModel):
        v: int | list[int] = Field(description="no structural form")

    with pytest.raises(SchemaConversionError, match=r"Bad\.v: union of \['array', 'integer'\]"):
        build_structural_schema(Bad)
