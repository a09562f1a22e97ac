"""The OpenAPI document of the HTTP API, with the request bodies of the POST endpoints.

The completion handlers read their body themselves (so that every bad body is an OpenAI-shaped 400, never
FastAPI's 422), which leaves FastAPI nothing to describe. This module adds the request models' JSON schemas
(their nested models as components, so every `$ref` resolves) and the error responses, so that clients and
API fuzzers can build requests from `/openapi.json`.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest

# The POST endpoints whose handlers parse these bodies with `openai_protocol.parse_request`.
BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
REF = "#/components/schemas/{model}"

ERROR_SCHEMA = {
    "title": "ErrorResponse",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

ERRORS = {
    "400": "invalid request (the message names the field)",
    "404": "the model is not served here",
    "413": "the request body is too large",
    "429": "too many requests; retry after `Retry-After` seconds",
    "500": "internal error (one line and a request id)",
    "503": "overloaded or unavailable; retry after `Retry-After` seconds",
}


def _error_responses() -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    return {status: {"description": text, "content": content} for status, text in ERRORS.items()}


def openapi_document(
    app: FastAPI, bodies: dict[str, type[BaseModel]], served_models: list[str] | None = None
) -> dict[str, Any]:
    """FastAPI's document for `app` plus, for each POST path in `bodies`, its JSON request body from the
    pydantic model. With `served_models`, each body's `model` field lists the models this server answers."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema([(m, "validation") for m in bodies.values()], ref_template=REF)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(copy.deepcopy(defs.get("$defs", {})))
    schemas["ErrorResponse"] = ERROR_SCHEMA
    for path, model in bodies.items():
        if served_models:
            schemas[model.__name__]["properties"]["model"]["enum"] = list(served_models)
        operation = doc["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
        }
        operation["responses"] = {
            "200": {
                "description": "the completion (JSON), or with `stream: true` a text/event-stream of chunks",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}},
            },
            **_error_responses(),
        }
    return doc


def install_openapi(
    app: FastAPI, served_models: list[str] | None = None, bodies: dict[str, type[BaseModel]] = BODIES
) -> None:
    """Serve `openapi_document` at the app's /openapi.json (built once, on first request)."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(openapi_document(app, bodies, served_models))
        return cached

    app.openapi = openapi
