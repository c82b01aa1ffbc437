"""A LlamaIndex retriever over a memstore store: `MemstoreRetriever(memstore.open("kb")).retrieve("...")`."""
from __future__ import annotations

from typing import Literal

from memstore.integrations import hit_metadata, missing

try:
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
except ImportError as e:  # pragma: no cover - the message is the point
    raise missing("llama-index-core", "llama-index") from e


class MemstoreRetriever(BaseRetriever):
    """Chunks of a memstore store as scored TextNodes, best first; a node's start/end_char_idx is
    its span in the document's text, and its metadata holds source, ids and heading path."""

    def __init__(self, memory, *, k: int = 4, mode: Literal["hybrid", "dense", "lexical"] = "hybrid",
                 filters: dict | None = None, rerank: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.memory, self.k, self.mode, self.filters, self.rerank = memory, k, mode, filters, rerank

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        hits = self.memory.search(query_bundle.query_str, k=self.k, filters=self.filters, mode=self.mode,
                                  rerank=self.rerank)
        return [NodeWithScore(node=TextNode(id_=f"memstore-chunk-{h.chunk_id}", text=h.text, metadata=hit_metadata(h),
                                            start_char_idx=h.char_start, end_char_idx=h.char_end), score=h.score)
                for h in hits]
