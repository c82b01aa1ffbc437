"""A LangChain retriever over a memstore store: `MemstoreRetriever(memory=memstore.open("kb")).invoke("...")`."""
from __future__ import annotations

from typing import Any, Literal

from memstore.integrations import hit_metadata, missing

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as e:  # pragma: no cover - the message is the point
    raise missing("langchain-core", "langchain") from e


class MemstoreRetriever(BaseRetriever):
    """Chunks of a memstore store as LangChain Documents, best first; metadata holds the char span
    (`char_start`, `char_end` into the document's text), ids, heading path and `score`."""

    memory: Any  # memstore.api.Memory
    k: int = 4
    mode: Literal["hybrid", "dense", "lexical"] = "hybrid"
    filters: dict | None = None
    rerank: bool = False

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.memory.search(query, k=self.k, filters=self.filters, mode=self.mode, rerank=self.rerank)
        return [Document(page_content=h.text, metadata=hit_metadata(h), id=str(h.chunk_id)) for h in hits]
