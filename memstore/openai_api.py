"""An OpenAI-compatible face on the HTTP API: POST /v1/chat/completions (plain and streamed)
and GET /v1/models, so the official `openai` client and chat front ends that speak its
protocol can ask the store.

A model id is a preset, optionally with a mode: `qwen2.5-0.5b` answers in memory mode,
`qwen2.5-0.5b:rag` pastes the chunks instead. The question is the last user message (earlier
turns and system messages are not read: each answer is retrieved afresh). Decoding is greedy,
so `temperature` and `top_p` change nothing. The answer's sources ride along in an extra
`sources` field (and, streamed, in the last chunk), timings and token counts in `memstore`
(no `usage`: the prompt's size in memory mode is slots, not text); memstore's own options `k`
and `filters` may be sent as extra body fields.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from memstore.answer_stream import AnswerJob, AnswerQueue
from memstore.http_schema import ANSWERS, EVERY_REQUEST, Filters, JsonInt, json_integer, responses
from memstore.settings import ANSWER_MODES, TOP_K

MAX_MESSAGE_CHARS = 2000


# constraints before the validator: the other way round, pydantic writes them into the schema as ge/le
TokenLimit = Annotated[int, Field(ge=1, le=256), BeforeValidator(json_integer)]

class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send many fields this server has no use for

    model: str = Field(max_length=120)
    messages: list[Message] = Field(min_length=1, max_length=200)
    stream: bool = False
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    n: JsonInt = Field(1, ge=1, le=1, description="one answer per request")
    k: JsonInt = Field(TOP_K, ge=1, le=16, description="memstore: chunks retrieved")
    filters: Filters | None = None  # memstore's


def question_of(messages: list[Message]) -> str:
    """The text of the last user message."""
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            text = content if isinstance(content, str) else " ".join(
                part.get("text", "") for part in content or [] if part.get("type") == "text")
            text = text.strip()
            if not text:
                raise HTTPException(400, "the last user message has no text")
            if len(text) > MAX_MESSAGE_CHARS:
                raise HTTPException(400, f"the last user message is over {MAX_MESSAGE_CHARS} characters")
            return text
    raise HTTPException(400, "no user message to answer")


def add_openai_routes(app: FastAPI, memory, answers: AnswerQueue, models: list[str], default_model: str,
                      answer_json: Callable, default_max_new_tokens: int, model_ready: Callable[[str], None]) -> None:
    """Mount /v1/models and /v1/chat/completions on `app`; answers go through the server's `answers` queue;
    model_ready(name) waits until that model can answer, or raises the HTTP error that says why not."""

    def model_and_mode(model_id: str) -> tuple[str, str]:
        name, _, mode = model_id.partition(":")
        mode = mode or "memory"
        if name not in models or mode not in ANSWER_MODES:
            raise HTTPException(404, f"unknown model {model_id!r}; GET /v1/models lists them")
        return name, mode

    @app.get("/v1/models", summary="Models, OpenAI style: each preset in memory mode, and ':rag'",
             responses=responses(*EVERY_REQUEST, openai=True))
    def list_models() -> dict:
        ids = [m for name in models for m in (name, f"{name}:rag")]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "memstore"}
                                           for i in ids]}

    @app.post("/v1/chat/completions", summary="Answer the last user message from the store, OpenAI style",
              responses=responses(*EVERY_REQUEST, *ANSWERS, openai=True, streamed="text/event-stream"))
    def chat(req: ChatRequest):
        name, mode = model_and_mode(req.model)
        question = question_of(req.messages)
        model_ready(name)
        kwargs = dict(model=name, mode=mode, k=req.k, filters=req.filters,
                      max_new_tokens=req.max_completion_tokens or req.max_tokens or default_max_new_tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            answer = AnswerJob(memory, answers, question, **kwargs).result()
            out = answer_json(answer)
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                 "finish_reason": finish_reason(answer, kwargs["max_new_tokens"])}],
                    "sources": out["sources"], "memstore": memstore_part(out)}
        memory.require_chunks()  # refused with an error status before the stream starts
        job = AnswerJob(memory, answers, question, **kwargs)  # a full queue: 503 before the stream starts
        return StreamingResponse(stream(job, kwargs, completion_id, created, req.model, answer_json),
                                 media_type="text/event-stream")


async def stream(job: AnswerJob, kwargs: dict, completion_id: str, created: int, model_id: str,
                 answer_json: Callable):
    """Server-sent events: a role chunk, one chunk per piece of text, a last chunk with the finish
    reason and the sources, then [DONE]; a failure mid-answer ends with an error event."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(jsonable_encoder(body))}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for kind, value in job.stream():
        if kind == "token":
            yield chunk({"content": value})
        elif kind == "answer":
            out = answer_json(value)
            yield chunk({}, finish_reason(value, kwargs["max_new_tokens"]), sources=out["sources"],
                        memstore=memstore_part(out))
        elif kind == "error":
            yield f"data: {json.dumps({'error': {'message': str(value), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"


def finish_reason(answer, max_new_tokens: int) -> Literal["stop", "length"]:
    return "length" if answer.timings.get("tokens", 0) >= max_new_tokens else "stop"


def memstore_part(out: dict) -> dict:
    return {"mode": out["mode"], "model": out["model"], "timings": out["timings"], "refills": out["refills"]}
