"""Strict validation of the exported documents against pinned upstream schemas (the
export tests' check; mvm itself does not need it or ``jsonschema``).

The published schemas (KubeVirt's swagger, Kubernetes' OpenAPI) do not forbid unknown
fields, and the API server drops or rejects them depending on its settings, so a typo such
as ``kernelArg`` would pass a plain schema check and silently do nothing in a cluster.
Validation here therefore closes every object schema that lists ``properties``
(``additionalProperties: false``), on a copy: the vendored files stay verbatim (see
``tests/fixtures/kubevirt-schemas/README.md`` for where they come from).

One more change on the copy: Kubernetes marks int-or-string fields (a probe's ``port``,
a Service's ``targetPort``) as ``type: string, format: int-or-string`` in swagger 2.0, and
its own tools accept integers there; so does this validator.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).parents[1] / "fixtures" / "kubevirt-schemas"
KUBEVIRT_SCHEMA = SCHEMAS / "kubevirt-v1.9.0-virtualmachine.json"
SERVICE_SCHEMA = SCHEMAS / "kubernetes-v1.34.0-service.json"


def strict(node: Any) -> Any:
    """A deep copy of a schema with ``additionalProperties: false`` on every object schema
    that has ``properties`` and says nothing about additional ones."""
    node = copy.deepcopy(node)

    def walk(item: Any, *, is_properties_map: bool = False) -> None:
        if isinstance(item, list):
            for sub in item:
                walk(sub)
            return
        if not isinstance(item, dict):
            return
        if is_properties_map:  # keys are field names, values are schemas
            for sub in item.values():
                walk(sub)
            return
        if isinstance(item.get("properties"), dict) and "additionalProperties" not in item:
            item["additionalProperties"] = False
        if item.get("format") == "int-or-string" and item.get("type") == "string":
            item["type"] = ["string", "integer"]
        for key, sub in item.items():
            walk(sub, is_properties_map=key in ("properties", "definitions", "$defs", "patternProperties"))

    walk(node)
    return node


@functools.cache
def _kubevirt_validator() -> Any:
    vendored = json.loads(KUBEVIRT_SCHEMA.read_text())
    # swagger 2.0 definitions are JSON Schema draft 4
    schema = {"allOf": [{"$ref": "#/definitions/v1.VirtualMachine"}],
              "definitions": strict(vendored["definitions"])}
    return jsonschema.Draft4Validator(schema)


@functools.cache
def _service_validator() -> Any:
    vendored = json.loads(SERVICE_SCHEMA.read_text())
    definitions = {"$schema": vendored["$schema"], "$id": vendored["$id"], "$defs": strict(vendored["$defs"])}
    registry = Registry().with_resource(vendored["$id"], Resource.from_contents(definitions))
    return jsonschema.Draft202012Validator(strict(vendored["service"]), registry=registry)


def _errors(validator: Any, doc: dict[str, Any]) -> Iterator[str]:
    for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        yield f"{where}: {err.message}"


def virtual_machine_errors(doc: dict[str, Any]) -> list[str]:
    """Every violation of the pinned KubeVirt ``VirtualMachine`` schema, strictly."""
    return list(_errors(_kubevirt_validator(), doc))


def service_errors(doc: dict[str, Any]) -> list[str]:
    """Every violation of the pinned Kubernetes core/v1 ``Service`` schema, strictly."""
    return list(_errors(_service_validator(), doc))


def sources() -> dict[str, dict[str, Any]]:
    """Where each vendored schema came from (release, commit, path)."""
    return {path.name: json.loads(path.read_text())["x-mvm-source"] for path in (KUBEVIRT_SCHEMA, SERVICE_SCHEMA)}
