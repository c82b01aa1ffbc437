"""Parts of the HTTP API's OpenAPI document that several routes share: the search filters, and what
errors look like (every error is JSON with a message: `{"error": "..."}`; under /v1/ OpenAI's
`{"error": {"message", "type", "code"}}`)."""
from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, StringConstraints, WithJsonSchema

from memstore.store.search import MAX_ID


def json_integer(value):
    """What JSON calls an integer (129 or 129.0), and nothing else: not true, not "129"."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("must be an integer")
    return value


# an integer field of a request body, read as its JSON Schema says (pydantic alone would take true and "5")
JsonInt = Annotated[int, BeforeValidator(json_integer)]

FILTER_KEY = r"^(path|document_id|meta\..+)$"
# a document id in a path: a larger number is a 422, not an overflow in the database
DocumentId = Annotated[int, Path(ge=0, le=MAX_ID)]


def _typed_filters(filters: dict) -> dict:
    for key, value in filters.items():
        if key == "path" and not isinstance(value, str):
            raise ValueError("the filter 'path' takes a glob (a string)")
        if key == "document_id":
            try:
                value = filters[key] = json_integer(value)
            except ValueError:
                value = None
            if value is None or not 0 <= value <= MAX_ID:
                raise ValueError("the filter 'document_id' takes a document id (an integer)")
    return filters


# {"path": glob, "document_id": id, "meta.KEY": value}; any other key or type is refused (422), as the schema says
Filters = Annotated[
    dict[Annotated[str, StringConstraints(pattern=FILTER_KEY)], str | bool | int | float],
    AfterValidator(_typed_filters),
    WithJsonSchema({"type": "object", "additionalProperties": False,
                    "patternProperties": {"^path$": {"type": "string"}, "^document_id$": {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                                          r"^meta\..+$": {"type": ["string", "boolean", "number"]}},
                    "description": "path (a glob), document_id, or meta.KEY (a metadata value)"}),
]

MEANINGS = {
    400: "Bad input: the message says what to change.",
    401: "No API key, or not one of the server's (servers started with keys).",
    403: "A read key asked to change the store.",
    404: "No such document, or no such model.",
    413: "The request body, a file or a question is too large.",
    422: "The request does not match its schema.",
    503: "The answer queue is full (Retry-After), or the model is loading or not installed.",
    504: "The answer took longer than the server's time limit and was stopped.",
    507: "The KV memory the answer needs is over the store's budget.",
}
# what any request may get: a bad key, a body over the limit, a request off its schema, a store
# another process holds locked
EVERY_REQUEST = (401, 403, 413, 422, 503)
ANSWERS = (400, 404, 504, 507)


class Error(BaseModel):
    error: str = Field(description="What went wrong and what to do.")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


def responses(*codes: int, openai: bool = False, streamed: str | None = None, html: bool = False) -> dict:
    """The OpenAPI `responses` entries of these error codes (and, where a 200 may be `streamed`, of that
    media type besides JSON). html: the route answers HTML, but its errors are JSON all the same."""
    if html:
        return {code: {"description": MEANINGS[code], "content": {"application/json": {"schema": Error.model_json_schema()}}}
                for code in codes}
    found = {code: {"model": OpenAIError if openai else Error, "description": MEANINGS[code]} for code in codes}
    if streamed:
        found[200] = {"description": f"JSON, or {streamed} where a stream was asked for",
                      "content": {streamed: {"schema": {"type": "string"}}}}
    return found
