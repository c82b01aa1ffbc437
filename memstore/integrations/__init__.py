"""memstore's store behind the retriever interfaces other frameworks already use.

    from memstore.integrations.langchain import MemstoreRetriever      # pip install 'memstore[langchain]'
    from memstore.integrations.llama_index import MemstoreRetriever    # pip install 'memstore[llama-index]'

Both run memstore's own search (hybrid by default, filters, optional re-ranking) and carry the
chunk's place as metadata: source, title, document and chunk ids, char span, heading path, score.
"""
from __future__ import annotations

from memstore.store import Hit


def hit_metadata(hit: Hit) -> dict:
    """What a retrieved chunk carries besides its text: where it is, and how well it matched."""
    return {"source": hit.source, "title": hit.title, "document_id": hit.document_id, "chunk_id": hit.chunk_id,
            "ordinal": hit.ordinal, "char_start": hit.char_start, "char_end": hit.char_end,
            "heading_path": hit.heading_path, "score": hit.score, "meta": hit.meta}


def missing(package: str, extra: str) -> ImportError:
    return ImportError(f"this integration needs {package}: pip install 'memstore[{extra}]'")
