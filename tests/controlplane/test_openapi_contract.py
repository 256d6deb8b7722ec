"""The OpenAPI document keeps the API's contract (issue 11 §3): every operation lists what it can answer, who may
call it, and the bounds of every value a client sends (controlplane._openapi derives them from the routes).

The live side of the same contract (a served control plane answering generated requests as documented) is
tests/controlplane/test_api_hostile.py::test_the_api_keeps_its_contract_under_generated_input.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from controlplane.app import create_app
from controlplane.auth import Role
from controlplane.auth._guards import Requires
from controlplane.wiring import Fleet
from tests._services import fleet_settings

METHODS = ("get", "put", "post", "patch", "delete")
# Answer without any token: the health check (and the Prometheus scrape, where it is in the document).
PUBLIC = {("get", "/healthz"), ("get", "/metrics")}
# Untyped JSON (a command's arguments) is bounded by the request body's limits (1 MiB, 32 levels), not a schema.
FREE_JSON = {"args"}

Operation = tuple[str, str, dict[str, Any]]


@pytest.fixture(name="app", scope="module")
def fx_app(tmp_path_factory: pytest.TempPathFactory) -> Litestar:
    # A fleet that is never started: the document needs no broker or database.
    fleet = Fleet(fleet_settings("mqtt://127.0.0.1:1883", tmp_path_factory.mktemp("cp")))
    return create_app(fleet=fleet)


@pytest.fixture(name="document", scope="module")
def fx_document(app: Litestar) -> dict[str, Any]:
    response = TestClient(app).get("/schema/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def operations(document: dict[str, Any]) -> Iterator[Operation]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def required_roles(app: Litestar) -> dict[tuple[str, str], Role | None]:
    """(method, path) -> the role its Requires guard needs (None: no such guard)."""
    roles: dict[tuple[str, str], Role | None] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            guards = [g for layer in handler.ownership_layers for g in (layer.guards or []) if isinstance(g, Requires)]
            for method in handler.http_methods:
                roles[(method.lower(), route.path_format)] = guards[0].role if guards else None
    return roles


def test_protected_operations_list_401_and_their_security_scheme(document: dict[str, Any]) -> None:
    schemes = set(document["components"]["securitySchemes"])
    protected = [(m, p, op) for m, p, op in operations(document) if op.get("security")]

    assert len(protected) > 40
    for method, path, op in protected:
        assert "401" in op["responses"], (method, path)
        assert {name for requirement in op["security"] for name in requirement} <= schemes, (method, path)
        assert op["security"][0] in ({"bearer": []}, {"provisioning": []}), (method, path)
    (enroll,) = [op for m, p, op in protected if p == "/api/v1/enroll"]
    assert enroll["security"] == [{"provisioning": []}]


def test_403_is_listed_exactly_where_a_valid_token_can_lack_the_role(app: Litestar, document: dict[str, Any]) -> None:
    roles = required_roles(app)

    for method, path, op in operations(document):
        role = roles[(method, path)]
        # a viewer's token is the least: a viewer-guarded operation cannot refuse a valid token
        assert ("403" in op["responses"]) == (role is not None and role is not Role.VIEWER), (method, path, role)
    assert "403" in document["paths"]["/api/v1/devices"]["post"]["responses"]
    assert "403" not in document["paths"]["/api/v1/devices"]["get"]["responses"]


def test_public_operations_say_they_need_no_credentials(document: dict[str, Any]) -> None:
    public = {(m, p) for m, p, op in operations(document) if op.get("security") == []}

    assert ("get", "/healthz") in public
    assert public <= PUBLIC
    for method, path, op in operations(document):
        assert "security" in op, (method, path)  # explicit everywhere: nothing inherits by accident
        if (method, path) in public:
            assert "401" not in op["responses"] and "403" not in op["responses"]


def test_path_ids_can_be_unknown_and_bodies_can_be_invalid_or_too_large(document: dict[str, Any]) -> None:
    for method, path, op in operations(document):
        responses = op["responses"]
        if any(p["in"] == "path" for p in op.get("parameters", [])):
            assert {"400", "404"} <= set(responses), (method, path)
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
        assert "503" in responses, (method, path)


def test_conflicts_are_listed_where_they_exist(document: dict[str, Any]) -> None:
    paths = document["paths"]

    for path in ("pause", "resume", "cancel", "rollback"):
        assert "409" in paths[f"/api/v1/deployments/{{deployment_id}}/{path}"]["post"]["responses"]
    assert "409" in paths["/api/v1/devices"]["post"]["responses"]
    assert "409" in paths["/api/v1/enroll"]["post"]["responses"]
    assert "409" in paths["/api/v1/keys/rotate"]["post"]["responses"]
    assert "202" in paths["/api/v1/devices/{device_id}/commands"]["post"]["responses"]
    artifact = paths["/api/v1/models/{version}/variants/{variant}/artifact"]["get"]["responses"]
    assert {"200", "206", "416"} <= set(artifact) and "application/octet-stream" in artifact["200"]["content"]


def test_every_error_answer_has_the_error_body(document: dict[str, Any]) -> None:
    error_body = document["components"]["schemas"]["ErrorBody"]

    assert set(error_body["required"]) == {"status_code", "detail"} and "extra" in error_body["properties"]
    for method, path, op in operations(document):
        for code, response in op["responses"].items():
            if int(code) < 400 or code == "416" or path == "/healthz":  # 416 has no body; /healthz its own
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)


def test_options_allows_every_documented_method_of_a_path(app: Litestar, document: dict[str, Any]) -> None:
    # Litestar 2 answered Allow with the methods of the path's first handler only (GET /api/v1/devices missing)
    client = TestClient(app)
    for path, item in document["paths"].items():
        concrete = path.replace("{device_id}", "d").replace("{command_id}", "c").replace("{version}", "v")
        concrete = concrete.replace("{variant}", "fp32").replace("{schedule_id}", "s")
        concrete = concrete.replace("{deployment_id}", "1").replace("{round_id}", "1").replace("{job_id}", "1")
        concrete = concrete.replace("{token_id}", "1")
        response = client.options(concrete)
        documented = {m.upper() for m in METHODS if m in item} | {"OPTIONS"}
        assert response.status_code == 204, (path, response.text)
        assert set(response.headers["allow"].split(", ")) == documented, (path, response.headers["allow"])


def test_every_integer_and_string_parameter_is_bounded(document: dict[str, Any]) -> None:
    checked = 0
    for method, path, op in operations(document):
        for parameter in op.get("parameters", []):
            schema = parameter["schema"]
            types = {alt.get("type") for alt in schema.get("oneOf", [schema])}
            where = (method, path, parameter["name"])
            if "integer" in types:
                assert "minimum" in schema and "maximum" in schema, where
                checked += 1
            if "string" in types:
                assert "maxLength" in schema or "enum" in schema, where
                checked += 1
    assert checked > 30


def test_every_value_in_a_request_body_is_bounded(document: dict[str, Any]) -> None:
    components = document["components"]["schemas"]
    problems: list[str] = []

    def walk(schema: dict[str, Any], where: str, seen: frozenset[str]) -> None:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            if name in seen:
                return
            seen, schema = seen | {name}, components[name]
        for alternative in schema.get("anyOf", []) + schema.get("oneOf", []):
            walk(alternative, where, seen)
        kind = schema.get("type")
        if kind in ("integer", "number") and not (
                {"minimum", "exclusiveMinimum"} & set(schema) and {"maximum", "exclusiveMaximum"} & set(schema)):
            problems.append(f"{where}: {schema}")
        if kind == "string" and not {"maxLength", "enum", "const"} & set(schema):
            problems.append(f"{where}: {schema}")
        if kind == "array" and "maxItems" not in schema:
            problems.append(f"{where}: {schema}")
        if kind == "object" and "properties" in schema and schema.get("additionalProperties") is not False:
            problems.append(f"{where}: unknown fields are refused, so the schema must say so")
        for name, value in schema.get("properties", {}).items():
            if name not in FREE_JSON:
                walk(value, f"{where}.{name}", seen)
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{where}[]", seen)

    bodies = 0
    for method, path, op in operations(document):
        if "requestBody" in op:
            bodies += 1
            walk(op["requestBody"]["content"]["application/json"]["schema"], f"{method} {path}", frozenset())

    assert bodies >= 12
    assert not problems, "\n".join(problems)


def test_out_of_range_ids_and_offsets_are_refused_as_documented(app: Litestar, tmp_path: Path) -> None:
    # Prepare: the bounds the document states for the offset and a deployment id
    document = TestClient(app).get("/schema/openapi.json").json()
    offset = next(p for p in document["paths"]["/api/v1/devices"]["get"]["parameters"] if p["name"] == "offset")
    deployment_id = document["paths"]["/api/v1/deployments/{deployment_id}"]["get"]["parameters"][0]

    # Assert: a 20-digit offset and a 26-digit id are beyond what the document allows (the hostile tests check the
    # served answers are 400s)
    assert offset["schema"]["maximum"] < 10**19 and deployment_id["schema"]["maximum"] < 10**25
    assert offset["schema"]["minimum"] == 0 and deployment_id["schema"]["minimum"] == 1


def test_29_february_is_a_date_in_leap_years_only() -> None:
    # Prepare
    from controlplane._errors import InvalidInput
    from controlplane.devices.controller import INSTANT_PATTERN, _instant

    # Execute / Assert: the documented pattern lets both through; the server tells the common year apart
    assert re.match(INSTANT_PATTERN, "2028-02-29") and re.match(INSTANT_PATTERN, "2026-02-29")
    assert _instant("since", "2028-02-29T00:00:00Z") == 1_835_395_200.0
    with pytest.raises(InvalidInput, match="since='2026-02-29': not a date"):
        _instant("since", "2026-02-29")
    assert not re.match(INSTANT_PATTERN, "2026-04-31")
