"""What every custom resource model shares: camelCase names, CEL rules, "unset" semantics.

A model here is the single source of truth for one part of a CRD schema: its fields,
their descriptions and bounds, and its CEL rules (`Rule`), which the API server
enforces and which the model also checks in Python where a check can be written
without the old object. `somabrain_operator.crds` turns the models into the manifests.

Unset is `None`: an optional field left out of a manifest is `None` in Python and
absent from the schema's defaults, so the API server never adds a value the user did
not write (case K-16). Defaults resolve in code (`somabrain_operator.resources.resolve`)
and show in status.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

VALIDATIONS = "x-kubernetes-validations"

Reason = Literal[
    "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"
]


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """A CEL validation rule of the schema node it annotates, and its Python twin.

    Used as `Annotated[...]` metadata on a field type, or listed in a model's
    `validations`. `check` receives the same value as CEL's `self` (the field's
    value, or the model); rules that need `oldSelf` have no check, only the API
    server can enforce them. The message names the field and the fix.
    """

    rule: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None
    reason: Reason | None = None

    def manifest(self) -> dict[str, str]:
        """The rule as an entry of `x-kubernetes-validations`."""
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            entry["fieldPath"] = self.field_path
        if self.reason is not None:
            entry["reason"] = self.reason
        return entry

    def validate(self, value: Any) -> Any:
        if self.check is not None and not self.check(value):
            raise ValueError(self.message)
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        schema = handler(source)
        if self.check is None:
            return schema
        return core_schema.no_info_after_validator_function(self.validate, schema)

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault(VALIDATIONS, []).append(self.manifest())
        return json_schema


class ResourceModel(BaseModel):
    """Base of every spec and status model: camelCase in manifests, snake_case in Python,
    unknown fields refused, rules of `validations` checked after the fields."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    validations: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).validations:
            rule.validate(self)
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        if cls.validations:
            target = handler.resolve_ref_schema(json_schema)
            target[VALIDATIONS] = [rule.manifest() for rule in cls.validations]
        return json_schema

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        """The model of a manifest's section (`spec` or `status`) as the API server holds it."""
        return cls.model_validate(dict(body))

    def to_body(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset fields left out (never written as null)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclasses.dataclass(frozen=True, slots=True)
class PrinterColumn:
    """A column of `kubectl get`."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str
    priority: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """A custom resource kind: its names, its spec and status models, how `kubectl get`
    shows it. One CRD is generated from each."""

    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: type[ResourceModel]
    status: type[ResourceModel]
    printer_columns: tuple[PrinterColumn, ...]
    categories: tuple[str, ...] = ("somabrain",)

    @property
    def singular(self) -> str:
        return self.kind.lower()
