"""Validate objects against the real CRDs' schemas vendored in tests/fixtures/kube_crds (the
JobSet and Kueue Workload CRDs; tests/fixtures/kube_crds/refresh.py refreshes them).

Strict, as the API server is with `fieldValidation=Strict` (kubectl's default): a structural
schema lists every field, and one it does not know is an error, not silently pruned. So
every object schema with `properties` is closed here (`additionalProperties: false`).
Still not checked: the `x-kubernetes-*` extensions (CEL rules, list-map keys), formats, and
what the controllers' webhooks validate (e.g. JobSet's name lengths)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).parent / "fixtures" / "kube_crds"
JOBSET = "jobset.x-k8s.io_jobsets.schema.yaml"
WORKLOAD = "kueue.x-k8s.io_workloads.schema.yaml"


def _closed(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        # `properties` maps field names to schemas: its keys are never keywords.
        key: ({k: _closed(v) for k, v in value.items()} if key == "properties" else _closed(value))
        for key, value in schema.items()
    }
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(fixture: str, version: str) -> jsonschema.Draft7Validator:
    vendored = yaml.load((CRDS / fixture).read_text(), Loader=yaml.CSafeLoader)
    schema = _closed(vendored["schemas"][version])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(obj: dict[str, Any], fixture: str, version: str) -> list[str]:
    """Each way `obj` breaks the schema, as `path: message` (none when it is valid)."""
    found = _validator(fixture, version).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)
