"""memstore behind the interfaces of other frameworks, each driven by the real library against a
real store: LangChain's and LlamaIndex's retrievers."""
import pytest

import memstore

NOTES = {
    "garden.md": "# Garden\n\nThe greenhouse thermostat is set to 21 degrees. Tomatoes go in the east bed.\n\n"
                 "## Tools\n\nThe hedge trimmer is kept in the blue shed behind the compost heap.\n",
    "kitchen.md": "# Kitchen\n\nThe sourdough starter is fed every morning with rye flour.\n",
}


@pytest.fixture
def memory(tmp_path, embedder):
    mem = memstore.open(tmp_path / "store")
    mem._embedder = embedder
    for source, text in NOTES.items():
        mem.add_text(text, source=source)
    yield mem
    mem.close()


def quotes_its_document(memory, document_id: int, start: int, end: int, text: str) -> bool:
    return memory.store.document_text(document_id)[start:end] == text


def test_langchain_retriever_returns_memstore_chunks(memory):
    from langchain_core.documents import Document
    from langchain_core.runnables import RunnableLambda

    from memstore.integrations.langchain import MemstoreRetriever

    retriever = MemstoreRetriever(memory=memory, k=2)
    docs = retriever.invoke("Where is the hedge trimmer kept?")
    assert all(isinstance(d, Document) for d in docs) and len(docs) == 2
    top = docs[0]
    assert "blue shed" in top.page_content and top.metadata["source"] == "garden.md"
    assert top.metadata["heading_path"].startswith("Garden") and top.metadata["score"] >= docs[1].metadata["score"]
    assert quotes_its_document(memory, top.metadata["document_id"], top.metadata["char_start"],
                               top.metadata["char_end"], top.page_content)
    # in a chain, as people compose it
    chain = retriever | RunnableLambda(lambda ds: "\n".join(d.metadata["source"] for d in ds))
    assert chain.invoke("sourdough starter").splitlines()[0] == "kitchen.md"
    filtered = MemstoreRetriever(memory=memory, k=3, filters={"path": "kitchen*"}).invoke("hedge trimmer")
    assert {d.metadata["source"] for d in filtered} == {"kitchen.md"}


def test_llama_index_retriever_returns_memstore_chunks(memory):
    from llama_index.core.schema import NodeWithScore

    from memstore.integrations.llama_index import MemstoreRetriever

    nodes = MemstoreRetriever(memory, k=2, mode="lexical").retrieve("greenhouse thermostat")
    assert all(isinstance(n, NodeWithScore) for n in nodes)
    top = nodes[0]
    assert "21 degrees" in top.node.get_content() and top.node.metadata["source"] == "garden.md"
    assert top.score == top.node.metadata["score"] and top.score > 0
    assert quotes_its_document(memory, top.node.metadata["document_id"], top.node.start_char_idx,
                               top.node.end_char_idx, top.node.text)
    filtered = MemstoreRetriever(memory, k=3, filters={"path": "kitchen*"}).retrieve("greenhouse")
    assert {n.node.metadata["source"] for n in filtered} == {"kitchen.md"}
