"""Alembic migrations: applied on open, reported by `db current`, newer schemas refused."""
import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from memstore.cli import main
from memstore.errors import SchemaTooNewError
from memstore.store import MemoryStore, db


def test_upgrade_creates_schema_on_empty_sqlite(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    assert db.current_revision(engine) is None
    head = db.upgrade(engine)
    assert db.current_revision(engine) == head == db.head_revision(engine)
    assert {"documents", "chunks", "ingest_runs", "settings"} <= set(inspect(engine).get_table_names())


def test_upgrade_creates_schema_on_empty_postgres(pg_url):
    engine = db.make_engine(pg_url)
    db.upgrade(engine)
    assert db.current_revision(engine) == db.head_revision(engine)
    fks = inspect(engine).get_foreign_keys("chunks")
    assert fks[0]["referred_table"] == "documents" and fks[0]["options"]["ondelete"] == "CASCADE"
    engine.dispose()


def test_db_current_and_upgrade_commands(tmp_path):
    store = tmp_path / "s"
    MemoryStore(store).close()
    runner = CliRunner()
    result = runner.invoke(main, ["db", "current", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert '"up_to_date": true' in result.output
    result = runner.invoke(main, ["db", "upgrade", "--store", str(store)])
    assert result.exit_code == 0 and "->" in result.output


def test_store_from_a_newer_memstore_is_refused(tmp_path):
    store = tmp_path / "s"
    MemoryStore(store).close()
    engine = db.make_engine(f"sqlite:///{store / 'memstore.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(SchemaTooNewError, match="upgrade memstore"):
        MemoryStore(store, create=False)
    result = CliRunner().invoke(main, ["stats", "--store", str(store)])
    assert result.exit_code == 2 and "9999_future" in result.output
    assert db.current_revision(engine) == "9999_future"  # left as it was


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_0003_store_gains_document_encodings(tmp_path, request, backend):
    """Documents from before 0004 keep a NULL encoding; new ones record theirs."""
    from alembic import command

    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.make_engine(url)
    cfg = db.alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO documents(source, content_hash, size, mtime, char_count, meta, created_at, "
                          "updated_at) VALUES ('old.txt', 'h', 1, 1, 100, '{}', '2026-01-01', '2026-01-01')"))
    db.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT source, encoding FROM documents")).all() == [("old.txt", None)]
    assert db.current_revision(engine) == db.head_revision(engine)
    engine.dispose()
