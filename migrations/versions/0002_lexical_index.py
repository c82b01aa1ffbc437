"""lexical index: SQLite FTS5 / PostgreSQL tsvector over chunk text, back-filled

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SQLITE_UP = [
    # external-content FTS5 table: the text lives once, in chunks; triggers keep it in step
    # inside the same transaction as the chunk rows
    """CREATE VIRTUAL TABLE chunks_fts USING fts5(
           text, content='chunks', content_rowid='id',
           tokenize='porter unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
           INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
       END""",
    """CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
           INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
       END""",
    """CREATE TRIGGER chunks_fts_update AFTER UPDATE OF text ON chunks BEGIN
           INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
           INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
       END""",
    "INSERT INTO chunks_fts(chunks_fts) VALUES ('rebuild')",  # back-fill existing chunks
]
SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS chunks_fts_update",
    "DROP TRIGGER IF EXISTS chunks_fts_delete",
    "DROP TRIGGER IF EXISTS chunks_fts_insert",
    "DROP TABLE IF EXISTS chunks_fts",
]
POSTGRES_UP = [
    # a generated column is computed in the same statement that writes the row, and the
    # ALTER back-fills every existing chunk
    """ALTER TABLE chunks ADD COLUMN tsv tsvector
           GENERATED ALWAYS AS (to_tsvector('english', text)) STORED""",
    "CREATE INDEX ix_chunks_tsv ON chunks USING GIN (tsv)",
]
POSTGRES_DOWN = ["DROP INDEX IF EXISTS ix_chunks_tsv", "ALTER TABLE chunks DROP COLUMN IF EXISTS tsv"]


def _run(statements):
    for sql in statements:
        op.execute(sql)


def upgrade() -> None:
    _run(SQLITE_UP if op.get_bind().dialect.name == "sqlite" else POSTGRES_UP)


def downgrade() -> None:
    _run(SQLITE_DOWN if op.get_bind().dialect.name == "sqlite" else POSTGRES_DOWN)
