"""The OpenAPI 3 document of ``/api/v1``, made from the methods' own declarations.

Each method's verbs, roles and parameters (``apibase.Param``) are what ``handlers.ApiHandler``
checks before the method runs; the document is generated from the same registry at start, so
it cannot drift from what the server accepts. Served at ``/api/v1/openapi.json``; the test
suite runs schemathesis against it (``tests/server/test_openapi.py``).
"""
from __future__ import annotations

from typing import Any

from .apibase import KINDS, MAX_IDS, MAX_TEXT, Method, Param

TITLE = "panda-wms client API"
MAX_QUERY_IDS = 1000

_ENVELOPE = {
    "type": "object",
    "required": ["success", "message", "data"],
    "properties": {"success": {"type": "boolean"}, "message": {"type": "string"},
                   "data": {"description": "the method's result (null on a refusal)"}},
}


def _schema(p: Param, in_query: bool) -> dict[str, Any]:
    """JSON Schema of one parameter; in a query string every value is text on the wire, the
    schema says what the text must read as."""
    kind = p.kind
    if kind == "ids":
        item = {"type": "integer", "format": "int64", "minimum": -(2**63) + 1,
                "maximum": 2**63 - 1}
        # in a query string at most MAX_QUERY_IDS: Tornado closes a request whose head is
        # over 64 kB without a reply (POST the ids for more)
        schema: dict[str, Any] = {"type": "array", "items": item, "maxItems": min(
            p.max_length or MAX_IDS, MAX_QUERY_IDS) if in_query else p.max_length or MAX_IDS}
        if not in_query:
            schema = {"oneOf": [item, schema]}
        return schema
    if kind == "any":
        return {}
    schema = {"type": KINDS[kind]}
    if kind == "string":
        schema["maxLength"] = p.max_length or MAX_TEXT
        if p.enum:
            schema["enum"] = list(p.enum)
    elif kind in ("integer", "number"):
        if kind == "integer":
            schema["format"] = "int64"
        lo, hi = p.minimum, p.maximum
        schema["minimum"] = lo if lo is not None else -(2**63) + 1
        schema["maximum"] = hi if hi is not None else 2**63 - 1
    elif kind == "array" and p.max_length:
        schema["maxItems"] = p.max_length
    return schema


def _operation(module: str, name: str, method: Method, verb: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": f"{module}_{name}_{verb.lower()}",
        "tags": [module],
        "summary": method.summary or f"{module}/{name}",
        "responses": {
            "200": {"description": "done, or refused for a logical reason (success false, "
                    "as PanDA replies)",
                    "content": {"application/json": {"schema": _ENVELOPE}}},
            "400": {"description": "a parameter does not match its declaration (the message "
                    "names it), or the body is not a JSON object",
                    "content": {"application/json": {"schema": _ENVELOPE}}},
            "403": {"description": "a bad credential, or a role that may not call this"},
            "405": {"description": "another HTTP verb is needed"},
            "429": {"description": "this client is over its request rate limit: try again "
                    "after Retry-After seconds (docs/server.md, 'Rate limits per client')",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    "content": {"application/json": {"schema": _ENVELOPE}}},
            "503": {"description": "the database is temporarily unavailable: try again after "
                    "Retry-After seconds", "headers": {"Retry-After": {
                        "schema": {"type": "integer"}}}},
        },
    }
    if method.roles is not None:
        op["security"] = [{"bearer": []}]
        op["description"] = f"Roles: {', '.join(method.roles)}."
    if not method.params:
        return op
    if verb == "GET":
        op["parameters"] = [
            {"name": p.name, "in": "query", "required": p.required,
             "description": p.description, "schema": _schema(p, True),
             **({"style": "form", "explode": True} if p.kind in ("ids", "array") else {})}
            for p in method.params]
    else:
        op["requestBody"] = {"required": any(p.required for p in method.params), "content": {
            "application/json": {"schema": {
                "type": "object",
                "properties": {p.name: {**_schema(p, False), "description": p.description}
                               for p in method.params},
                "required": [p.name for p in method.params if p.required] or None,
            }}}}
        body = op["requestBody"]["content"]["application/json"]["schema"]
        if body["required"] is None:
            del body["required"]
    return op


def openapi_document(methods: dict[tuple[str, str], Method], version: str = "1") -> dict:
    """The OpenAPI 3.0 document of every registered method (``apibase.registry``)."""
    paths: dict[str, dict] = {}
    for (module, name), method in sorted(methods.items()):
        paths[f"/api/v1/{module}/{name}"] = {
            verb.lower(): _operation(module, name, method, verb) for verb in method.http}
    return {
        "openapi": "3.0.3",
        "info": {"title": TITLE, "version": version,
                 "description": "PanDA's /api/v1 shape (docs/protocol.md). Every reply is "
                 "{success, message, data}. Reads are open; writes need a bearer token."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
