"""A Model Context Protocol server over a store (stdio), built on the `mcp` SDK: agents get
`search` and `ask` tools, and every document as a resource (`memstore://documents/{id}`).

    memstore mcp --store kb          # what an MCP client (an agent, an editor) launches
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp_types import Resource

from memstore.answer_stream import USER_ERRORS
from memstore.api import Memory
from memstore.settings import ANSWER_TOKENS, TOP_K

DOCUMENT_URI = "memstore://documents/{document_id}"
INSTRUCTIONS = ("A knowledge base of documents. Use `search` to find passages (each with its document, char "
                "span and score) and `ask` to have the store's language model answer from them; read a whole "
                "document as the resource memstore://documents/{id}.")


class MemstoreMCP(MCPServer):
    """MCPServer whose resource list is the store's documents, read afresh on every listing."""

    def __init__(self, memory: Memory, lock: threading.Lock, **kwargs):
        super().__init__(**kwargs)
        self.memory, self.lock = memory, lock

    async def list_resources(self) -> list[Resource]:
        with self.lock:
            docs = self.memory.store.documents()
        return [Resource(uri=DOCUMENT_URI.format(document_id=d["id"]), name=d["source"], title=d["title"],
                         description=f"{d['char_count']} characters", mime_type="text/plain") for d in docs]


@contextmanager
def reported(error: type[Exception], lock: threading.Lock) -> Iterator[None]:
    """Hold the lock; a user's mistake (an empty query, an unknown document) reaches the client as
    its message, where the SDK would only say that the tool failed."""
    with lock:
        try:
            yield
        except USER_ERRORS as e:
            raise error(str(e)) from e


def build_server(memory: Memory, model: str | None = None) -> MCPServer:
    lock = threading.Lock()  # one store handle and one model, whatever the client sends at once
    server = MemstoreMCP(memory, lock, name="memstore", instructions=INSTRUCTIONS)

    @server.tool()
    def search(query: str, k: int = 5, mode: Literal["hybrid", "dense", "lexical"] = "hybrid") -> dict:
        """Passages of the store that best match `query`, best first, with their document, char span and score."""
        with reported(ToolError, lock):
            hits = memory.search(query, k=max(1, min(k, 50)), mode=mode)
        return {"hits": [{"text": h.text, "source": h.source, "title": h.title, "document_id": h.document_id,
                          "char_start": h.char_start, "char_end": h.char_end, "score": h.score,
                          "uri": DOCUMENT_URI.format(document_id=h.document_id)} for h in hits]}

    @server.tool()
    def ask(question: str, mode: Literal["memory", "rag"] = "memory", k: int = TOP_K,
            max_new_tokens: int = ANSWER_TOKENS) -> dict:
        """Answer `question` from the store with its language model; the answer comes with its sources."""
        with reported(ToolError, lock):
            answer = memory.ask(question, model=model, mode=mode, k=max(1, min(k, 16)),
                                max_new_tokens=max(1, min(max_new_tokens, 256)))
        return {"answer": answer.text, "mode": answer.mode, "model": answer.model,
                "sources": [{"text": s.text, "source": s.source, "document_id": s.document_id,
                             "char_start": s.char_start, "char_end": s.char_end, "attention": s.attention,
                             "retrieval_score": s.retrieval_score} for s in answer.sources]}

    @server.resource(DOCUMENT_URI, mime_type="text/plain")
    def document(document_id: int) -> str:
        """A document's whole text, as it was ingested."""
        with reported(ResourceError, lock):
            memory.store.document_info(document_id)  # a clear error when there is no such document
            return memory.store.document_text(document_id)

    return server
