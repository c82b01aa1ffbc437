"""The storage core on real SQLite and PostgreSQL databases with a real FAISS index."""
import pytest
from conftest import unit_vectors

from memstore.errors import (
    EmbedderMismatchError,
    IndexCorruptError,
    InvalidInputError,
    NotAStoreError,
    UnknownFilterError,
)
from memstore.store import ChunkIn, DocumentIn, MemoryStore
from memstore.store.index import IndexConfig, VectorIndex

DIM = 16


def make_doc(source: str, n_chunks: int, meta: dict | None = None, seed: int = 0):
    doc = DocumentIn(source=source, content_hash=f"h-{source}", size=100, mtime=1.0,
                     char_count=10 * n_chunks, title=source, meta=meta or {})
    chunks = [ChunkIn(ordinal=i, char_start=10 * i, char_end=10 * i + 10, text=f"{source} chunk {i}",
                      token_count=3) for i in range(n_chunks)]
    return doc, chunks, unit_vectors(n_chunks, DIM, seed)


def open_store(target, data_dir=None, **kw) -> MemoryStore:
    store = MemoryStore(target, data_dir=data_dir, **kw)
    store.require_embedder("test-embedder", DIM)
    return store


def test_round_trip(store_target):
    target, data_dir = store_target
    with open_store(target, data_dir) as store:
        doc, chunks, vecs = make_doc("docs/a.md", 5, {"lang": "en"})
        store.add_document(doc, chunks, vecs)
        store.add_document(*make_doc("docs/b.md", 3, seed=1))
    with MemoryStore(target, data_dir=data_dir, create=False) as store:
        hits = store.search(vecs[2], k=3)
        assert hits[0].source == "docs/a.md" and hits[0].ordinal == 2
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[0].text == "docs/a.md chunk 2" and hits[0].meta == {"lang": "en"}
        assert (hits[0].char_start, hits[0].char_end) == (20, 30)
        assert store.stats()["chunks"] == 8 and store.stats()["documents"] == 2
        assert store.check()["consistent"]
        got = store.get_chunks([hits[1].chunk_id, hits[0].chunk_id])
        assert [c.chunk_id for c in got] == [hits[1].chunk_id, hits[0].chunk_id]


def test_replacing_a_document_replaces_its_chunks(store_target):
    target, data_dir = store_target
    with open_store(target, data_dir) as store:
        store.add_document(*make_doc("a.md", 5))
        doc, chunks, vecs = make_doc("a.md", 2, seed=7)
        store.add_document(doc, chunks, vecs)
        assert store.stats()["chunks"] == 2 and store.index.size == 2
        assert store.search(vecs[1], k=1)[0].score == pytest.approx(1.0, abs=1e-5)


def test_delete_removes_rows_and_vectors(store_target):
    target, data_dir = store_target
    with open_store(target, data_dir) as store:
        _, _, vecs = make_doc("a.md", 4)
        store.add_document(*make_doc("a.md", 4))
        store.add_document(*make_doc("b.md", 4, seed=1))
        assert store.delete_document("a.md")
        assert not store.delete_document("a.md")
        assert store.stats()["chunks"] == 4
        assert all(h.source == "b.md" for h in store.search(vecs[0], k=10))
    with MemoryStore(target, data_dir=data_dir, create=False) as store:
        assert store.index.size == 4
        assert store.check()["consistent"]


def test_filters_return_only_matching_chunks(store_target):
    target, data_dir = store_target
    with open_store(target, data_dir) as store:
        store.add_document(*make_doc("/kb/guide/a.md", 6, {"lang": "en"}))
        store.add_document(*make_doc("/kb/guide/b.html", 6, {"lang": "fr"}, seed=1))
        store.add_document(*make_doc("/kb/other/c.md", 6, {"lang": "en"}, seed=2))
        q = unit_vectors(1, DIM, 99)[0]
        md = store.search(q, k=20, filters={"path": "*.md"})
        assert len(md) == 12 and {h.source for h in md} == {"/kb/guide/a.md", "/kb/other/c.md"}
        fr = store.search(q, k=20, filters={"meta.lang": "fr"})
        assert {h.source for h in fr} == {"/kb/guide/b.html"} and len(fr) == 6
        both = store.search(q, k=20, filters={"path": "/kb/guide/*", "meta.lang": "en"})
        assert {h.source for h in both} == {"/kb/guide/a.md"}
        assert store.search(q, k=5, filters={"meta.lang": "de"}) == []
        with pytest.raises(UnknownFilterError, match="unknown filter field 'colour'"):
            store.search(q, k=5, filters={"colour": "red"})
        for wrong in ({"path": 5}, {"document_id": "seven"}, {"document_id": 2**70}, {"path": ["*.md", None]}):
            with pytest.raises(InvalidInputError, match="takes a"):
                store.search(q, k=5, filters=wrong)


def test_crash_between_sql_commit_and_index_save_is_repaired_on_open(tmp_path, monkeypatch):
    target = tmp_path / "store"
    with open_store(target) as store:
        store.add_document(*make_doc("a.md", 3))
    saved = (target / "vectors.faiss").read_bytes()

    store = open_store(target)
    store.checkpoint_seconds = 0  # save right after each commit: the crash hits in between

    def crash(*args, **kwargs):
        raise SystemExit("killed after the SQL commit, before the index was saved")

    monkeypatch.setattr(VectorIndex, "save", crash)
    doc, chunks, vecs = make_doc("b.md", 4, seed=5)
    with pytest.raises(SystemExit):
        store.add_document(doc, chunks, vecs)
    monkeypatch.undo()  # the process is gone: no close(), the index file on disk is the old one
    assert (target / "vectors.faiss").read_bytes() == saved

    with MemoryStore(target, create=False) as reopened:  # detects the stale index and repairs it
        assert reopened.index.size == 7
        assert reopened.search(vecs[3], k=1)[0].source == "b.md"
        report = reopened.check()
        assert report["consistent"] and report["index_generation"] == report["sql_generation"]


def test_index_from_before_a_delete_is_repaired_on_open(tmp_path):
    target = tmp_path / "store"
    with open_store(target) as store:
        store.add_document(*make_doc("a.md", 3))
        store.add_document(*make_doc("b.md", 3, seed=1))
    stale = (target / "vectors.faiss").read_bytes()
    with open_store(target) as store:
        store.delete_document("a.md")
    (target / "vectors.faiss").write_bytes(stale)  # as if the save after the delete never happened
    with MemoryStore(target, create=False) as store:
        assert store.index.size == 3
        assert store.check()["consistent"]


def test_corrupt_index_is_refused_then_repaired(tmp_path):
    target = tmp_path / "store"
    with open_store(target) as store:
        store.add_document(*make_doc("a.md", 3))
    (target / "vectors.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexCorruptError, match="memstore check --repair"):
        MemoryStore(target, create=False)
    assert (target / "vectors.faiss").read_bytes() == b"garbage"  # nothing changed on disk
    with MemoryStore(target, create=False, on_corrupt_index="defer") as store:
        assert not store.check()["consistent"]
        store.repair()
        assert store.check()["consistent"] and store.index.size == 3


def test_other_embedder_is_refused(tmp_path):
    with open_store(tmp_path / "s") as store:
        with pytest.raises(EmbedderMismatchError, match="test-embedder"):
            store.require_embedder("another-model", DIM)
        with pytest.raises(EmbedderMismatchError):
            store.add_document(*make_doc("a.md", 2)[:2], unit_vectors(2, DIM + 1))


def test_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="not a memstore store"):
        MemoryStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(NotAStoreError, match="is a file"):
        MemoryStore(tmp_path / "file.txt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(NotAStoreError, match="non-empty directory"):
        MemoryStore(tmp_path / "busy")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_hnsw_index_is_chosen_by_size_and_handles_deletes(tmp_path):
    config = IndexConfig(hnsw_threshold=40)
    with open_store(tmp_path / "s", index_config=config) as store:
        for i in range(6):
            store.add_document(*make_doc(f"d{i}.md", 5, seed=i))
        assert store.index.kind == "flat"  # 30 vectors
        for i in range(6, 10):
            store.add_document(*make_doc(f"d{i}.md", 5, seed=i))
        assert store.index.kind == "hnsw"  # 50 vectors
        store.delete_document("d3.md")
        _, _, vecs = make_doc("d3.md", 5, seed=3)
        assert all(h.source != "d3.md" for h in store.search(vecs[0], k=10))
        _, _, vecs7 = make_doc("d7.md", 5, seed=7)
        assert store.search(vecs7[4], k=1)[0].source == "d7.md"
        assert store.search(vecs7[4], k=3, filters={"path": "d7.md"})[0].ordinal == 4
    with MemoryStore(tmp_path / "s", create=False, index_config=config) as store:
        assert store.index.kind == "hnsw" and store.index.size == 45
        assert store.check()["consistent"]


def test_memory_target_is_temporary():
    store = open_store(":memory:")
    directory = store.dir
    store.add_document(*make_doc("a.md", 2))
    assert directory.exists()
    store.close()
    assert not directory.exists()


def test_second_process_writes_are_seen(tmp_path):
    """Two handles on one store (as two processes would have) see each other's commits."""
    with open_store(tmp_path / "s") as first, open_store(tmp_path / "s") as second:
        first.add_document(*make_doc("a.md", 3))
        doc, chunks, vecs = make_doc("b.md", 3, seed=1)
        second.add_document(doc, chunks, vecs)
        assert first.search(vecs[0], k=1)[0].source == "b.md"
        assert second.index.size == 6 and first.index.size == 6


def test_filters_match_exactly_what_fnmatch_and_equality_do(store_target):
    """SQL narrows the documents (LIKE, JSON) and the exact test decides: globs with LIKE's own
    wildcards, classes and case, and metadata of other types than strings, as before."""
    import fnmatch

    target, data_dir = store_target
    sources = {"a_b.md": {"n": 1}, "axb.md": {"n": "1"}, "100%.txt": {"lang": "en"}, "Guide.MD": {"lang": "EN"},
               "[draft].md": {"lang": "en"}, "d.md": {"flag": True}}
    with open_store(target, data_dir) as store:
        ids = {s: store.add_document(*make_doc(s, 2, meta, seed=i)) for i, (s, meta) in enumerate(sources.items())}
        for pattern in ("a_b.md", "*.md", "*%*", "100%.*", "*.MD", "[[]draft].md", "[!a]*", "?_b.md"):
            want = {ids[s] for s in sources if fnmatch.fnmatchcase(s, pattern)}
            assert set(store.document_ids_matching({"path": pattern})) == want, pattern
        for key, value in (("meta.n", 1), ("meta.n", "1"), ("meta.lang", "en"), ("meta.flag", True)):
            want = {ids[s] for s, meta in sources.items() if meta.get(key[5:]) == value}
            assert set(store.document_ids_matching({key: value})) == want, (key, value)
        before = store.document_ids_matching({"meta.lang": "en"})
        new = store.add_document(*make_doc("new.md", 1, {"lang": "en"}, seed=9))  # a write: filters are asked again
        assert set(store.document_ids_matching({"meta.lang": "en"})) == set(before) | {new}
