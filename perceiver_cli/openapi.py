"""The OpenAPI 3.1 document of `perceiver serve` (`GET /openapi.json`; `GET /docs` renders it).

The request options come from the option classes themselves (`FillOptions`' fields, types,
defaults and allowed values), so a new option appears here without an edit; the answers'
shapes mirror results.py and fillmask's schema, and tests/test_observe.py validates the
document (openapi-spec-validator) and real answers of a running server against it.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, fields

from . import __version__
from .observe import TIMING_HEADERS
from .options import CHOICE_SCORES, MAX_CHOICES, MAX_TOP_K, STRATEGIES, Budget, FillOptions

REF = "#/components/schemas/"
ENUMS = {"strategy": list(STRATEGIES), "choice_score": list(CHOICE_SCORES)}
BOUNDS = {"top_k": (1, MAX_TOP_K), "beam_width": (1, MAX_TOP_K), "max_span": (1, None), "iterative_passes": (1, None),
          "length_candidates": (0, None), "length_alpha": (0, 10), "length_prior": (0, 10)}


def _type_schema(annotation) -> dict:
    """A JSON Schema for a field's type annotation (str, int, float, bool, X | None, tuple[str, ...])."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        schema = _type_schema(parts[0])
        schema["type"] = [schema["type"], "null"]
        return schema
    if typing.get_origin(annotation) is tuple:  # choices: a list of words (one word may be given as a string)
        return {"type": "array", "items": {"type": "string"}}
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[annotation]}


def options_schema(cls=FillOptions) -> dict:
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in fields(cls):
        schema = _type_schema(hints[f.name])
        if f.default is not MISSING:
            schema["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        if f.name in ENUMS:
            schema["enum"] = ENUMS[f.name]
        if f.name in BOUNDS:
            lo, hi = BOUNDS[f.name]
            schema["minimum"] = lo
            if hi is not None:
                schema["maximum"] = hi
        if f.name == "choices":
            schema["maxItems"] = MAX_CHOICES
            schema = {"oneOf": [schema, {"type": "string"}], "default": schema.pop("default")}
        properties[f.name] = schema
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "description": f"{cls.__name__}: how to fill (README, Filling text); unknown names are a 400"}


def _object(properties: dict, required: list | None = None, extra: bool = False, **more) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": extra, **more}
    if required:
        schema["required"] = required
    return schema


NUMBER, INTEGER, STRING, BOOLEAN = {"type": "number"}, {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
BYTES = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
BASE64 = {"type": "string", "contentEncoding": "base64"}


def schemas() -> dict:
    candidate = _object({"fill": STRING, "bytes": BYTES, "logprob": NUMBER,
                         "score": {"type": "number", "description": "a choice's: what ranked it, under score_rule"},
                         "score_rule": {"type": "string", "enum": list(CHOICE_SCORES)}}, ["fill", "bytes", "logprob"])
    alternative = _object({"byte": {"type": "integer", "minimum": 0, "maximum": 255}, "logprob": NUMBER},
                          ["byte", "logprob"])
    span = _object({"start": INTEGER, "length": INTEGER, "fill": STRING, "bytes": BYTES, "logprob": NUMBER,
                    "candidates": {"type": "array", "items": {"$ref": REF + "Candidate"},
                                   "description": "with top_k > 1 (the best top_k), or with choices (all of them)"},
                    "alternatives": {"type": "array", "items": {"type": "array", "items": {"$ref": REF + "Alternative"}},
                                     "description": "with explain: per masked byte, its top bytes"}},
                   ["start", "length", "fill", "bytes", "logprob"])
    result = _object({"text": STRING, "spans": {"type": "array", "items": {"$ref": REF + "Span"}}}, ["text", "spans"],
                     description="The object of `perceiver fill --json`")
    wire_span = _object({"start": INTEGER, "length": INTEGER, "data": BASE64, "logprob": NUMBER,
                         "byte_logprobs": {"type": "array", "items": NUMBER},
                         "alternatives": {"type": "array", "items": {"type": "array", "items": {
                             "type": "array", "prefixItems": [INTEGER, NUMBER], "minItems": 2, "maxItems": 2}}},
                         "candidates": {"type": "array", "items": {  # [data, logprob], a choice's + [score, rule]
                             "type": "array", "prefixItems": [BASE64, NUMBER, NUMBER, STRING], "minItems": 2,
                             "maxItems": 4}},
                         "from_choices": BOOLEAN},
                        ["start", "length", "data", "logprob", "byte_logprobs", "alternatives", "candidates"])
    wire = _object({"data": BASE64, "pieces": {"type": "array", "items": BASE64},
                    "spans": {"type": "array", "items": {"$ref": REF + "WireSpan"}}}, ["data", "pieces", "spans"],
                   description='With "detail": true: the result with every byte (base64) and float exact')
    text_error = _object({"error": STRING}, ["error"], description="In the place of a text that cannot be filled")
    fill_request = {
        "type": "object", "additionalProperties": False,
        "properties": {"text": STRING, "texts": {"type": "array", "items": STRING},
                       "options": {"oneOf": [{"$ref": REF + "FillOptions"}, {"type": "null"}]},
                       "detail": {"type": "boolean", "default": False,
                                  "description": "answer the exact wire format (WireResult) instead"}},
        "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
        "example": {"text": "This is an incomplete sentence where some words are [MASK:9].", "options": {"top_k": 3}},
    }
    one = {"anyOf": [{"$ref": REF + "FillResult"}, {"$ref": REF + "WireResult"}]}
    fill_answer = {"anyOf": [one, {"type": "array", "items": {"anyOf": [one, {"$ref": REF + "TextError"}]}}],
                   "description": 'for "text" one result, for "texts" a list in their order'}
    fill_mask_request = _object(
        {"inputs": STRING,
         "parameters": {"oneOf": [_object({"top_k": {"type": "integer", "minimum": 1, "default": 5},
                                           "targets": {"oneOf": [STRING, {"type": "array", "items": STRING}]}}),
                                  {"type": "null"}]}},
        ["inputs"], example={"inputs": "The capital of France is[MASK]aris.", "parameters": {"top_k": 3}},
        description="The Hugging Face fill-mask task: [MASK] is the model's own one-byte mask token")
    fill_mask_candidate = _object({"score": NUMBER, "token": INTEGER, "token_str": STRING, "sequence": STRING},
                                  ["score", "token", "token_str", "sequence"])
    candidates = {"type": "array", "items": {"$ref": REF + "FillMaskCandidate"}}
    fill_mask_answer = {"anyOf": [candidates, {"type": "array", "items": candidates}],
                        "description": "best first; one list per [MASK] when the text holds several"}
    error = _object({"error": STRING, "option": STRING, "rule": STRING, "request_id": STRING}, ["error"],
                    description="Every error: one line; `option` and `rule` name a bad option; `request_id` "
                                "is the answer's X-Request-ID")
    info = _object({
        "model": {"type": ["string", "null"]}, "revision": {"type": ["string", "null"]},
        "commit": {"type": ["string", "null"]}, "device": STRING, "dtype": STRING, "mixed": {"type": "boolean"}, "quantize": STRING,
        "parameters": INTEGER, "version": STRING, "max_position_embeddings": INTEGER, "vocab_size": INTEGER,
        "mask_token": STRING, "batch_size": INTEGER, "max_batch": INTEGER, "batch_wait_ms": NUMBER,
        "queue_size": INTEGER, "max_inputs": INTEGER, "body_timeout_s": NUMBER, "max_body": INTEGER,
        "auth": BOOLEAN,
        "budget": _object({f.name: INTEGER for f in fields(Budget)}, [f.name for f in fields(Budget)],
                          description="what one text may cost (README: Limits); max_answer_mb also bounds a /v1/fill answer"),
        "queue": _object({"waiting": INTEGER, "running": INTEGER, "batches": INTEGER}, ["waiting", "running", "batches"]),
    }, ["model", "device", "dtype", "parameters", "version", "queue"], extra=True)
    return {"FillOptions": options_schema(), "FillRequest": fill_request, "FillResult": result, "Span": span,
            "Candidate": candidate, "Alternative": alternative, "WireResult": wire, "WireSpan": wire_span,
            "TextError": text_error, "FillAnswer": fill_answer, "FillMaskRequest": fill_mask_request,
            "FillMaskCandidate": fill_mask_candidate, "FillMaskAnswer": fill_mask_answer, "Error": error,
            "Info": info}


ERRORS = {
    "400": "Bad input: not JSON, a wrong type, a missing or unknown field, no marker, a bad option",
    "401": "A missing or wrong API key (the server was started with one)",
    "408": "The request body did not all arrive within --body-timeout-s",
    "413": "A request body over --max-body-mb",
    "500": "The model failed",
    "503": "The queue is full (Retry-After: 1), or the server is stopping",
}


def _answer(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    answer: dict = {"description": description,
                    "headers": {name: {"$ref": "#/components/headers/" + name} for name in TIMING_HEADERS}}
    if schema is not None:
        answer["content"] = {media: {"schema": schema}}
    return answer


def _errors(*statuses: str) -> dict:
    return {s: _answer(ERRORS[s], {"$ref": REF + "Error"}) for s in statuses}


def document() -> dict:
    """The OpenAPI document."""
    model_route = ("400", "401", "408", "413", "500", "503")
    open_route = "Open: needs no API key"
    text = {"type": "string"}
    paths = {
        "/": {
            "get": {"summary": "The page to try the model in a browser (for Accept: text/html; "
                               "any other client gets 405, as before the page)", "security": [],
                    "responses": {"200": _answer("The page", text, "text/html"),
                                  "405": _answer("Not a browser: GET is not allowed on /", {"$ref": REF + "Error"})}},
            "post": {"summary": "The Hugging Face fill-mask task, as transformers' pipeline('fill-mask') answers",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": REF + "FillMaskRequest"}}}},
                     "responses": {"200": _answer("The candidates", {"$ref": REF + "FillMaskAnswer"}),
                                   **_errors(*model_route)}},
        },
        "/v1/fill": {
            "post": {"summary": "Fill a text's [MASK] markers as `perceiver fill --json` does",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": REF + "FillRequest"}}}},
                     "responses": {"200": _answer("The fills", {"$ref": REF + "FillAnswer"}),
                                   **_errors(*model_route)}},
        },
        "/health": {"get": {"summary": "Whether the server is up (" + open_route + ")", "security": [],
                            "responses": {"200": _answer("Up", _object({"status": {"const": "ok"}}, ["status"]))}}},
        "/info": {"get": {"summary": "The model, how it runs, the server's limits and its queue",
                          "responses": {"200": _answer("About the server", {"$ref": REF + "Info"}),
                                        **_errors("401")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics, all named perceiver_* (" + open_route + ")",
                             "security": [],
                             "responses": {"200": _answer("The text exposition format", text, "text/plain")}}},
        "/openapi.json": {"get": {"summary": "This document (" + open_route + ")", "security": [],
                                  "responses": {"200": _answer("OpenAPI 3.1", {"type": "object"})}}},
        "/docs": {"get": {"summary": "This document as a page (" + open_route + ")", "security": [],
                          "responses": {"200": _answer("The page", text, "text/html")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "perceiver serve", "version": __version__,
                 "description": "Fill masked text with DeepMind's byte-level Perceiver IO language model. Every "
                                "answer carries X-Request-ID and the timing headers. With an API key on the "
                                "server every route but the open ones needs Authorization: Bearer <key>."},
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "headers": {name: {"description": why, "schema": {"type": "string"}} for name, why in TIMING_HEADERS.items()},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "PERCEIVER_API_KEY or --api-key-file on the server"}},
        },
        "security": [{"apiKey": []}],
    }
