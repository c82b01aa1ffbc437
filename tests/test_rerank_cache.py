"""The re-ranker's vector cache (table rerank_vectors, migration 0003) on SQLite and PostgreSQL."""
import numpy as np
import pytest
from alembic import command
from conftest import unit_vectors
from sqlalchemy import inspect, text

from memstore.store import ChunkIn, DocumentIn, MemoryStore, db

DIM = 16
MODEL = "test-reranker"


def add(store, source, n, seed=0):
    chunks = [ChunkIn(i, 10 * i, 10 * i + 10, f"{source} chunk {i}", 3) for i in range(n)]
    doc = DocumentIn(source, f"h-{source}-{seed}", 1, 1.0, 10 * n)
    return store.add_document(doc, chunks, unit_vectors(n, DIM, seed))


def chunk_ids(store, source):
    return [c.chunk_id for c in store.all_chunks() if c.document_id == store.document(source)["id"]]


@pytest.fixture
def store(store_target):
    target, data_dir = store_target
    s = MemoryStore(target, data_dir=data_dir)
    s.require_embedder("test", DIM)
    add(s, "a.txt", 3)
    add(s, "b.txt", 2, seed=1)
    yield s
    s.close()


def test_vectors_are_kept_per_model(store):
    ids = chunk_ids(store, "a.txt")
    vectors = unit_vectors(3, 8, seed=5)
    assert store.put_rerank_vectors(MODEL, ids, vectors) == 3
    kept = store.rerank_vectors(MODEL, ids + chunk_ids(store, "b.txt"))
    assert sorted(kept) == ids
    assert np.array_equal(kept[ids[1]], vectors[1]) and kept[ids[1]].dtype == np.float32
    assert store.rerank_vectors("another-model", ids) == {}
    assert store.chunks_without_rerank_vector(MODEL) == chunk_ids(store, "b.txt")


def test_keeping_twice_and_deleted_chunks_are_skipped(store):
    ids = chunk_ids(store, "a.txt")
    store.put_rerank_vectors(MODEL, ids[:1], unit_vectors(1, 8))
    # a concurrent search kept ids[0] already; 999999 was deleted after it was a candidate
    assert store.put_rerank_vectors(MODEL, [ids[0], ids[1], 999999], unit_vectors(3, 8, 1)) == 2
    assert np.array_equal(store.rerank_vectors(MODEL, ids[:1])[ids[0]], unit_vectors(1, 8)[0])
    with pytest.raises(ValueError, match="2 chunk ids but 1 vectors"):
        store.put_rerank_vectors(MODEL, ids[:2], unit_vectors(1, 8))


def test_deleting_or_replacing_a_document_drops_its_vectors(store):
    a, b = chunk_ids(store, "a.txt"), chunk_ids(store, "b.txt")
    store.put_rerank_vectors(MODEL, a + b, unit_vectors(5, 8))
    assert store.delete_document("a.txt")
    assert sorted(store.rerank_vectors(MODEL, a + b)) == b
    add(store, "b.txt", 2, seed=9)  # a changed file replaces its chunks (new ids)
    assert store.rerank_vectors(MODEL, a + b) == {}
    assert store.chunks_without_rerank_vector(MODEL) == chunk_ids(store, "b.txt")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM rerank_vectors")).scalar_one() == 0
    assert store.check()["consistent"]


def _store_at_0002(engine):
    """A store written by a memstore from before the re-ranker: schema 0002, one chunk."""
    cfg = db.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO settings(key, value) VALUES ('embedder', '{\"name\": \"test\", \"dim\": 16}')"))
        doc_id = conn.execute(text(
            "INSERT INTO documents(source, content_hash, size, mtime, char_count, meta, created_at, updated_at) "
            "VALUES ('old.txt', 'h', 1, 1, 100, '{}', '2026-01-01', '2026-01-01') RETURNING id")).scalar_one()
        conn.execute(text("INSERT INTO chunks(document_id, ordinal, char_start, char_end, token_count, text, "
                          "heading_path, vector) VALUES (:d, 0, 0, 30, 5, 'Zanzibar spice markets at dawn', '', :v)"),
                     {"d": doc_id, "v": unit_vectors(1, DIM)[0].tobytes()})
    engine.dispose()


def _check_upgraded(store):
    assert store.revision == db.head_revision(store.engine) >= "0003"
    fks = inspect(store.engine).get_foreign_keys("rerank_vectors")
    assert fks[0]["referred_table"] == "chunks" and fks[0]["options"]["ondelete"] == "CASCADE"
    (chunk_id,) = store.chunks_without_rerank_vector(MODEL)
    assert store.put_rerank_vectors(MODEL, [chunk_id], unit_vectors(1, 8)) == 1
    assert store.search(query="zanzibar", k=1, mode="lexical")[0].source == "old.txt"
    store.delete_document("old.txt")
    assert store.rerank_vectors(MODEL, [chunk_id]) == {}


def test_migration_from_0002_on_sqlite(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    _store_at_0002(db.make_engine(f"sqlite:///{path / 'memstore.db'}"))
    with MemoryStore(path, create=False) as store:  # opening upgrades to head
        _check_upgraded(store)


def test_migration_from_0002_on_postgres(pg_url, tmp_path):
    _store_at_0002(db.make_engine(pg_url))
    with MemoryStore(pg_url, data_dir=tmp_path / "pgdata", create=False) as store:
        _check_upgraded(store)


def test_downgrade_to_0002_drops_the_table(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    db.upgrade(engine)
    cfg = db.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")
    assert "rerank_vectors" not in inspect(engine).get_table_names()
