"""The HTTP API (FastAPI) and the demo page, over one Memory.

Reads (search, stats, documents) never wait for an answer: the store's own lock (Memory.lock) is
held for a search or a write, not for a generation. Answers take turns at the model through a
bounded queue (answer_stream.AnswerQueue): a full queue is a 503 with Retry-After, a stream says
how many answers are ahead, a client that goes away frees the model at the next token, and every
answer has a time limit.
"""
from __future__ import annotations

import contextlib
import functools
import html
import json
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from memstore import settings
from memstore.answer_stream import AnswerJob, AnswerQueue
from memstore.api import Memory
from memstore.errors import MemstoreError
from memstore.http_schema import ANSWERS, EVERY_REQUEST, DocumentId, Filters, JsonInt, responses
from memstore.keys import ApiKeys, ViewLinks
from memstore.openai_api import add_openai_routes
from memstore.settings import ANSWER_MODES, ANSWER_TOKENS, SEARCH_MODES, TOP_K

log = logging.getLogger("memstore.server")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 64 * 1024
UPLOAD_MAX_BYTES = 16 << 20  # a file added over HTTP (POST /documents/file)
MAX_QUESTION_CHARS = 2000

PUBLIC_PATHS = {"/", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}  # open even with API keys


class DocumentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, pattern=r"\S", description="The document's text (markdown headings are kept).")
    source: str = Field(min_length=1, max_length=500, description="Its name; a document of that name is replaced.")
    title: str | None = Field(None, max_length=500)
    meta: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Metadata to filter on.")


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS, pattern=r"\S", description="The question to answer.")
    mode: Literal[ANSWER_MODES] = Field(
        "memory", description="memory: retrieved chunks in KV memory slots; rag: pasted as text; "
                              "truncate/full: the documents themselves in the prompt.")
    k: JsonInt = Field(TOP_K, ge=1, le=16, description="Chunks retrieved (memory slots or pasted chunks).")
    model: str | None = Field(None, max_length=100, description="A model preset; default: the server's model.")
    max_new_tokens: JsonInt = Field(ANSWER_TOKENS, ge=1, le=256)
    filters: Filters | None = None


class Readiness:
    """A server started before its store is built and its model loaded (`memstore demo`): what is
    ready so far, for GET /stats and the page, and a wait for the model before answering."""

    MODEL_WAIT_S = 180  # an answer waits this long for the model, then gets a 503 with Retry-After

    def __init__(self, model: str):
        self.model = model
        self.model_state = "loading"
        self.files_done, self.files_total = 0, None
        self.ingest_state = "starting"
        self.model_ready, self.all_ready = threading.Event(), threading.Event()

    def ingest_progress(self, done: int, total: int) -> None:
        self.files_done, self.files_total, self.ingest_state = done, total, "ingesting"

    def ingest_finished(self, state: str = "done") -> None:
        self.ingest_state = state
        if self.model_ready.is_set():
            self.all_ready.set()

    def model_loaded(self, state: str = "ready") -> None:
        self.model_state = state
        self.model_ready.set()
        if self.ingest_state != "ingesting" and self.ingest_state != "starting":
            self.all_ready.set()

    def status(self) -> dict:
        return {"model": self.model, "model_state": self.model_state, "ingest_state": self.ingest_state,
                "files_done": self.files_done, "files_total": self.files_total}

    def wait_for_model(self) -> None:
        if not self.model_ready.wait(self.MODEL_WAIT_S):
            raise HTTPException(503, f"the model {self.model} is still loading; try again shortly",
                                headers={"Retry-After": "30"})
        if self.model_state != "ready":
            raise HTTPException(503, f"the model {self.model} could not be loaded ({self.model_state})")


class KVWarmer:
    """Encodes the store's KV memory for one model in the background, a small batch at a time,
    only while no answer waits or runs: the first memory-mode answer about a chunk then finds
    its memory ready instead of encoding it (bench/results/speed.json: cold against warm)."""

    def __init__(self, memory: Memory, model: str, answers: AnswerQueue, questions: list[str], batch: int = 2,
                 after: threading.Event | None = None):
        self.memory, self.model, self.answers, self.questions, self.batch = memory, model, answers, questions, batch
        self.after = after  # start once this is set (the store built and the model loaded)
        self.warm = self.chunks = 0
        self.state = "starting"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-warmer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def status(self) -> dict:
        return {"model": self.model, "warm": self.warm, "chunks": self.chunks, "state": self.state}

    def _run(self) -> None:
        while self.after is not None and not self.after.wait(0.5):
            if self._stop.is_set():
                return
        try:
            todo = self.memory.kv_warmup_order(self.model, self.questions)
            self.chunks = self.memory.stats()["chunks"]
            self.warm = self.chunks - len(todo)
            self.state = "warming"
            for start in range(0, len(todo), self.batch):
                while self.answers.busy():  # answers first
                    if self._stop.wait(0.2):
                        return
                if self._stop.is_set():
                    return
                batch = todo[start:start + self.batch]
                # the model runs one pass at a time: an answer that comes now waits for this batch only
                self.memory.encode_kv(batch, self.model)  # an answer may have encoded some meanwhile
                self.warm += len(batch)
            self.state = "done"
        except MemstoreError as e:  # the KV budget is full, or a chunk went away meanwhile
            self.state = f"stopped: {e}"
        except Exception as e:  # noqa: BLE001 - warming is an optimisation: log it, keep serving
            log.exception("warming the KV memory failed")
            self.state = f"stopped: {type(e).__name__}"


@dataclass
class Service:
    """What the routes share: the store, the answer queue, and the models clients may name."""

    memory: Memory
    answers: AnswerQueue
    default_model: str
    allowed: list[str]
    title: str
    examples: list[str]
    readiness: Readiness | None = None
    warmer: KVWarmer | None = None
    links: ViewLinks | None = None  # signs /view links where the server has keys

    def model_ready(self, name: str | None = None) -> None:
        """Wait for the server's model while it loads; a 503 for another model not on this machine."""
        if name:
            self.check_local(name)
        if self.readiness:
            self.readiness.wait_for_model()

    def check_model(self, name: str | None) -> str:
        name = name or self.default_model
        if name not in self.allowed:
            raise HTTPException(404, f"unknown model {name!r}; this server offers {', '.join(self.allowed)}")
        self.check_local(name)
        return name

    def check_local(self, name: str) -> None:
        """503 for a model this machine does not have yet: a request never starts a download."""
        from memstore.model.backbone import PRESETS, needs_download

        if name != self.default_model and needs_download(name):
            raise HTTPException(503, f"model {name} is not on this server yet and requests never download one; "
                                     f"the operator can fetch it with `{PRESETS[name].pip_install()}` or by "
                                     f"starting a server with --model {name} once")

    def ask_kwargs(self, req: AskRequest) -> dict:
        self.model_ready()
        return dict(model=self.check_model(req.model), mode=req.mode, k=req.k, max_new_tokens=req.max_new_tokens,
                    filters=req.filters)


def create_app(memory: Memory, *, default_model: str | None = None, models: list[str] | None = None,
               title: str = "memstore", examples: list[str] | None = None, warm_kv: bool = False,
               readiness: Readiness | None = None, api_keys: ApiKeys | None = None,
               answers: AnswerQueue | None = None) -> FastAPI:
    """The app over `memory`. `models` lists what clients may ask for (presets by default).

    warm_kv: encode the default model's KV memory of every chunk in the background while idle
    (the examples' chunks first); /stats then reports how much of it is warm.
    readiness: the store is still being built and the model loaded (see Readiness); /stats says
    how far, and answers wait for the model.
    api_keys: every request but the page and the API docs needs a key (Authorization: Bearer KEY);
    adding or deleting documents needs a write key.
    answers: the queue answers take turns in (default: AnswerQueue(), its default size and time limit)."""
    from memstore.model.backbone import PRESETS

    default_model = default_model or settings.default_model()
    service = Service(memory, answers or AnswerQueue(), default_model, list(dict.fromkeys([default_model, *(models or PRESETS)])),
                      title, examples or [], readiness)
    if warm_kv:
        service.warmer = KVWarmer(memory, default_model, service.answers, service.examples,
                                  after=readiness.all_ready if readiness else None)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service.warmer:
            service.warmer.start()
        yield
        if service.warmer:
            service.warmer.stop()

    app = FastAPI(title=f"{title} API", description="Search and question answering over a memstore store.",
                  responses=responses(*EVERY_REQUEST),
                  lifespan=lifespan)
    install_error_handlers(app)
    if api_keys:
        service.links = ViewLinks(api_keys)
        require_keys(app, api_keys, service.links)
    add_answer_routes(app, service)
    add_write_routes(app, service)
    add_read_routes(app, service)
    add_openai_routes(app, memory, service.answers, service.allowed, default_model,
                      functools.partial(answer_json, links=service.links), ANSWER_TOKENS,
                      service.model_ready)
    return app


def add_answer_routes(app: FastAPI, service: Service) -> None:
    """POST /ask and /ask/stream: answers with their sources, through the answer queue."""
    memory = service.memory

    @app.post("/ask", summary="Answer a question, with sources ranked by attention", responses=responses(*ANSWERS))
    def ask(req: AskRequest) -> dict:
        kwargs = service.ask_kwargs(req)
        return answer_json(AnswerJob(memory, service.answers, req.question, **kwargs).result(), service.links)

    @app.post("/ask/stream", summary="Answer a question, streamed as NDJSON events",
              responses=responses(*ANSWERS, streamed="application/x-ndjson"),
              description='One JSON object per line: {"type": "queued", "ahead": n} while other answers are '
                          'ahead, {"type": "token", "text": ...} as the answer is generated, then '
                          '{"type": "answer", ...} (as POST /ask returns) or {"type": "error", "error": ...}. '
                          "Closing the connection stops the answer.")
    def ask_stream(req: AskRequest) -> StreamingResponse:
        kwargs = service.ask_kwargs(req)
        memory.require_chunks()  # refused with a 400 before the stream starts
        job = AnswerJob(memory, service.answers, req.question, **kwargs)  # a full queue: 503 here

        async def lines():
            async for kind, value in job.stream():
                if kind == "answer":
                    event = {"type": "answer", **answer_json(value, service.links)}
                elif kind == "queued":
                    event = {"type": "queued", "ahead": value}
                else:
                    event = {"type": kind, "error" if kind == "error" else "text": str(value)}
                yield json.dumps(jsonable_encoder(event)) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def add_write_routes(app: FastAPI, service: Service) -> None:
    """POST /documents and DELETE /documents/{id}: each one transaction with the index, as the CLI's."""
    memory, lock = service.memory, service.memory.lock

    @app.post("/documents", status_code=201, summary="Add a document (or replace the one of that source)",
              responses=responses(400))
    def add_document(req: DocumentRequest) -> dict:
        with lock:
            document_id = memory.add_text(req.text, source=req.source, title=req.title, meta=req.meta)
            return memory.store.document_info(document_id)

    @app.post("/documents/file", status_code=201, summary="Add a file (txt, md, rst, html, pdf) as a document",
              responses=responses(400),
              description=f"multipart/form-data: `file`, and optionally `source` (default: the file's name), "
                          f"`title`, `meta` (a JSON object). Read by the loader `memstore ingest` uses for "
                          f"its kind; at most {UPLOAD_MAX_BYTES >> 20} MiB.")
    def add_file(file: Annotated[UploadFile, File()], source: Annotated[str | None, Form(max_length=500)] = None,
                 title: Annotated[str | None, Form(max_length=500)] = None,
                 meta: Annotated[str | None, Form()] = None) -> dict:
        name = Path(file.filename or "").name
        if not name:
            raise HTTPException(422, "the upload has no file name (its suffix says how to read it)")
        try:
            fields = json.loads(meta) if meta else {}
        except json.JSONDecodeError:
            raise HTTPException(422, "meta must be a JSON object") from None
        if not isinstance(fields, dict):
            raise HTTPException(422, "meta must be a JSON object")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            with open(path, "wb") as out:
                shutil.copyfileobj(file.file, out)
            with lock:
                document_id = memory.add_file(path, source=source or name, title=title, meta=fields)
                return memory.store.document_info(document_id)

    @app.delete("/documents/{document_id:int}", summary="Delete a document, its chunks and their KV memory",
                responses=responses(404))
    def delete_document(document_id: DocumentId) -> dict:
        with lock:
            if not memory.delete(document_id):
                raise HTTPException(404, f"no document {document_id}")
        return {"deleted": document_id}


def require_keys(app: FastAPI, keys: ApiKeys, links: ViewLinks) -> None:
    """401 without a valid key, 403 for a read key that asks to write; the page and docs stay open,
    and so does a /view link the server signed (`ViewLinks`) until it expires."""

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if request.url.path in PUBLIC_PATHS:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        role = keys.role_of(header[7:].strip() if header[:7].lower() == "bearer " else None)
        if role is None and signed_view(request, links):
            return await call_next(request)
        if role is None:
            return error_response(request, "a valid API key is needed: Authorization: Bearer KEY", 401)
        writes = request.method in ("POST", "DELETE") and request.url.path.startswith("/documents")
        if writes and role != "write":
            return error_response(request, "this key may read, not write", 403)
        return await call_next(request)


def signed_view(request: Request, links: ViewLinks) -> bool:
    """A GET of /view/{id} whose span and expiry carry the server's signature."""
    parts, query = request.url.path.split("/"), request.query_params
    if request.method != "GET" or len(parts) != 3 or parts[1] != "view":
        return False
    try:
        return links.valid(int(parts[2]), int(query.get("start", 0)), int(query.get("end", 0)),
                           int(query.get("exp", "")), query.get("sig", ""))
    except ValueError:
        return False


def add_read_routes(app: FastAPI, service: Service) -> None:
    """The page, search, stats, models, documents and examples: they wait for the store, never for an answer."""
    memory, lock = service.memory, service.memory.lock

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/search", summary="Retrieve chunks (hybrid, dense or lexical)", responses=responses(400))
    def search(q: str = Query(min_length=1, max_length=MAX_QUESTION_CHARS), k: int = Query(5, ge=1, le=50),
               mode: Literal[SEARCH_MODES] = "hybrid",
               rerank: bool = Query(False, description="re-score the candidates with the second model")) -> dict:
        with lock:
            hits = memory.search(q, k=k, mode=mode, rerank=rerank)
        return {"query": q, "mode": mode, "rerank": rerank,
                "hits": [{**h.to_dict(), "url": view_url(h.document_id, h.char_start, h.char_end, service.links)}
                         for h in hits]}

    @app.get("/stats", summary="Documents, chunks and tokens in the store")
    def stats() -> dict:
        with lock:
            stats = memory.stats()
        if service.readiness:
            stats["ready"] = service.readiness.status()
        return {**stats, "kv_memory": service.warmer.status()} if service.warmer else stats

    @app.get("/models", summary="Models this server can answer with")
    def list_models() -> dict:
        from memstore.model.backbone import preset_status

        presets = {p["name"]: p for p in preset_status()}
        default = service.default_model
        return {"default": default,
                "models": [{**presets.get(name, {"name": name, "available": True}), "default": name == default}
                           for name in service.allowed]}

    @app.get("/documents/{document_id:int}", summary="A document: its metadata and text", responses=responses(404))
    def document(document_id: DocumentId) -> dict:
        with lock:
            info = memory.store.document_info(document_id)
            return {**info, "text": memory.store.document_text(document_id)}

    @app.get("/view/{document_id:int}", response_class=HTMLResponse, summary="A document as a page, a span highlighted",
             responses=responses(*EVERY_REQUEST, 400, 404, html=True))
    def view(document_id: DocumentId, start: int = Query(0, ge=0), end: int = Query(0, ge=0)) -> str:
        with lock:
            info = memory.store.document_info(document_id)
            text = memory.store.document_text(document_id)
        return document_page(info, text, start, end)

    @app.get("/examples", include_in_schema=False)
    def example_questions() -> dict:
        return {"title": service.title, "examples": service.examples}


def error_response(request: Request, message: str, status: int) -> JSONResponse:
    """{"error": message}; under /v1/ the OpenAI shape, {"error": {"message": ..., "type": ...}},
    which OpenAI clients read their error message from."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)
    return JSONResponse({"error": message}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON with an `error` message; never a traceback."""

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        limit = UPLOAD_MAX_BYTES if request.url.path == "/documents/file" else MAX_BODY_BYTES
        if size and size.isdigit() and int(size) > limit:
            return error_response(request, f"request body over {limit} bytes", 413)
        if size is None and request.method in ("POST", "PUT", "PATCH"):  # chunked: count it as it comes
            body = b""
            async for piece in request.stream():
                body += piece
                if len(body) > limit:
                    return error_response(request, f"request body over {limit} bytes", 413)
            request._body = body  # what the route reads (Starlette replays a body read here)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()]
        return error_response(request, "invalid request: " + "; ".join(problems), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        response = error_response(request, str(exc.detail), exc.status_code)
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Starlette lists the methods of one route of the path; say them all
            response.headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return response

    @app.exception_handler(MemstoreError)
    async def user_error(request: Request, exc: MemstoreError):
        response = error_response(request, str(exc), exc.http_status)
        if getattr(exc, "retry_after", None):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(request, f"internal error ({type(exc).__name__}); see the server log", 500)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of the app takes at this path."""
    return sorted({m for route in app.routes if getattr(route, "methods", None) and route.path_regex.match(path)
                   for m in route.methods})


def view_url(document_id: int, start: int, end: int, links: ViewLinks | None = None) -> str:
    """The link to a span; signed where the server has keys (a browser tab sends no key)."""
    signed = f"&{links.sign(document_id, start, end)}" if links else ""
    return f"/view/{document_id}?start={start}&end={end}{signed}#hit"


def answer_json(answer, links: ViewLinks | None = None) -> dict:
    out = answer.to_dict()
    for source in out["sources"]:
        source["url"] = view_url(source["document_id"], source["char_start"], source["char_end"], links)
    return out


def document_page(info: dict, text: str, start: int, end: int) -> str:
    """The document text, escaped, with [start, end) marked and scrolled to."""
    start, end = min(start, len(text)), min(max(end, start), len(text))
    title = html.escape(info["title"] or info["source"])
    body = (html.escape(text[:start]) + '<mark id="hit">' + html.escape(text[start:end]) + "</mark>"
            + html.escape(text[end:]))
    return (f"<!doctype html><meta charset='utf-8'><title>{title}</title>"
            "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:50em;margin:2em auto;padding:0 1em}"
            "pre{white-space:pre-wrap;font:inherit}mark{background:#ffe58a}</style>"
            f"<h1>{title}</h1><p><code>{html.escape(info['source'])}</code> · characters {start}–{end}</p>"
            f"<pre>{body}</pre>")
