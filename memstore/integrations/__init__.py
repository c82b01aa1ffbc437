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
    return {name: value for name, value in hit.to_dict().items() if name != "text"}


def missing(package: str, extra: str) -> ImportError:
    return ImportError(f"this integration needs {package}: pip install 'memstore[{extra}]'")
