"""Conventions every API model follows, and cross-field rules written once for two checkers.

A `Rule` is a CEL expression (enforced by the API server through the CRD's
`x-kubernetes-validations`) paired with the same check in Python (enforced by pydantic when
the operator or a test loads a manifest). The invalid-run table in the tests runs against
both, so the two cannot drift apart silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

# A field's JSON-schema marker: the CRD gives this optional section no default (an omitted
# section stays omitted, where its presence means something: `Stage.critic`).
NO_DEFAULT = "x-lmmr1-no-default"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: `cel` for the API server, `check` for pydantic (True = valid).

    `field` (camelCase, relative to the model) is where the API server reports a failure.
    `transition` rules compare with the stored object (`oldSelf`): the API server checks
    them on update; pydantic cannot, as it sees one object at a time.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field: str | None = None
    transition: bool = False

    def as_validation(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field:
            out["fieldPath"] = f".{self.field}"
        return out


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if rule.check is not None and not rule.check(self):
                where = f"{rule.field}: " if rule.field else ""
                raise ValueError(f"{where}{rule.message}")
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        """Attach the model's rules to its JSON schema as `x-kubernetes-validations`."""
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        validations = [rule.as_validation() for rule in cls.rules]
        if validations:
            target["x-kubernetes-validations"] = validations
        return schema

    def wire(self) -> dict[str, Any]:
        """The object as it goes to the API server (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
