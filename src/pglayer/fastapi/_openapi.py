"""The OpenAPI document, completed with what pglayer answers on every route.

FastAPI declares what a route's own code returns. pglayer adds what its layers answer on
any route: 400, 408, 431, 501 and 505 (`pglayer serve`'s HTTP server), 405 (another
method), 413 (body bound), 500, 503 `overloaded` (shedding, outside
`shed_exempt`), and 415/422 for a JSON body and 422 for parameters; every problem response
as `application/problem+json` with `ProblemDetails`, in place of FastAPI's own 422 schema;
and the headers it sets: `X-Request-ID` on every response, `Retry-After` on 503, `Allow` on
405, `WWW-Authenticate` on 401.

FastAPI also passes the schemas through its own models, which write every bound as a float:
an int64 maximum becomes `9.223372036854776e+18`, which is 2^63. The bounds are put back as
the exact integers pydantic wrote.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi._compat import get_definitions, get_flat_models_from_fields, get_model_name_map
from fastapi.openapi.utils import get_fields_from_routes

from pglayer.fastapi._problems import _DESCRIPTIONS, PROBLEM_JSON, ProblemDetails

__all__ = ["complete_openapi"]

_REF = "#/components/schemas/"
_PROBLEM_REF = f"{_REF}ProblemDetails"
_FASTAPI_422 = f"{_REF}HTTPValidationError"


def complete_openapi(app: FastAPI, *, shed_exempt: tuple[str, ...] = ()) -> None:
    """Make `app.openapi()` return FastAPI's document completed as the module says."""
    generate = app.openapi
    completed: list[dict[str, Any]] = []

    def openapi() -> dict[str, Any]:
        spec = generate()  # cached by FastAPI until the routes change
        if not completed or completed[0] is not spec:
            _complete(app, spec, shed_exempt)
            completed[:] = [spec]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(app: FastAPI, spec: dict[str, Any], shed_exempt: tuple[str, ...]) -> None:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    _restore_integers(schemas, _exact_schemas(app))
    problem = ProblemDetails.model_json_schema(ref_template=_REF + "{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["ProblemDetails"] = problem
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            statuses = [*_SERVER_STATUSES, 405, 413, 500]
            if not (shed_exempt and path.startswith(shed_exempt)):
                statuses += [503, 504]  # 504: a query or the request past its deadline
            if "application/json" in operation.get("requestBody", {}).get("content", {}):
                statuses += [415, 422]
            if operation.get("parameters"):
                statuses.append(422)
            _declare(operation.setdefault("responses", {}), statuses)
    if _FASTAPI_422 not in str(spec.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)


def _declare(responses: dict[str, Any], statuses: list[int]) -> None:
    for response in responses.values():
        content = response.get("content", {})
        problems = [
            name
            for name, media in content.items()
            if media.get("schema", {}).get("$ref") in (_PROBLEM_REF, _FASTAPI_422)
        ]
        if problems:
            if any(content[name]["schema"]["$ref"] == _FASTAPI_422 for name in problems):
                response["description"] = _DESCRIPTIONS[422]
            for name in problems:  # FastAPI's `application/json`: it is a problem document
                del content[name]
            content[PROBLEM_JSON] = {"schema": {"$ref": _PROBLEM_REF}}
    for status in statuses:
        responses.setdefault(
            str(status),
            {
                "description": _DESCRIPTIONS[status],
                "content": {PROBLEM_JSON: {"schema": {"$ref": _PROBLEM_REF}}},
            },
        )
    for code, response in responses.items():
        headers = response.setdefault("headers", {})
        for name, header in (("X-Request-ID", _REQUEST_ID), *_HEADERS.get(code, ())):
            headers.setdefault(name, header)
    ordered = sorted(responses.items())
    responses.clear()
    responses.update(ordered)


# What `pglayer serve`'s HTTP server answers for any route, before the app sees the request.
_SERVER_STATUSES = (400, 408, 431, 501, 505)


def _header(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "schema": schema}


_REQUEST_ID = _header(
    "The request's id: the client's `X-Request-ID` when valid, else one made by the server",
    {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
)
# What pglayer's layers add to a status on every route.
_HEADERS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "401": (("WWW-Authenticate", _header("`Bearer`", {"type": "string"})),),
    "405": (("Allow", _header("Every method the path supports", {"type": "string"})),),
    "503": (("Retry-After", _header("Seconds to wait before retrying", {"type": "integer"})),),
}


def _exact_schemas(app: FastAPI) -> dict[str, Any]:
    # The same schemas FastAPI builds (names included), before its models touch them.
    fields = get_fields_from_routes([*app.routes, *app.webhooks.routes])
    models = get_flat_models_from_fields(fields, known_models=set())
    _, definitions = get_definitions(
        fields=fields,
        model_name_map=get_model_name_map(models),
        separate_input_output_schemas=app.separate_input_output_schemas,
    )
    return definitions


def _restore_integers(node: Any, exact: Any) -> None:
    if isinstance(node, dict) and isinstance(exact, dict):
        for key, value in node.items():
            original = exact.get(key)
            if type(value) is float and type(original) is int and value == float(original):
                node[key] = original
            else:
                _restore_integers(value, original)
    elif isinstance(node, list) and isinstance(exact, list):
        for value, original in zip(node, exact, strict=False):
            _restore_integers(value, original)
