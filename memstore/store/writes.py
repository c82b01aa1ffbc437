"""Writing: one SQL transaction per write under the store's write lock, the vectors' changes
applied to FAISS after commit, ingest runs."""
from __future__ import annotations

import fcntl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Connection, delete, insert, select, update

from memstore.errors import (
    EmbedderMismatchError,
    MemstoreError,
    StoreLockedError,
)
from memstore.store import kv
from memstore.store.records import ChunkIn, DocumentIn
from memstore.store.schema import Chunk, Document, IngestRun, utcnow

PENDING_LIMIT = 50_000  # vectors held for FAISS until commit; beyond this, re-read them from SQL
WRITE_LOCK_WAIT_S = 300.0  # how long a write waits for another process's (one file's transaction) to end
COMPACT_FRACTION = 0.25  # rebuild an HNSW index when this share of it is tombstones


@dataclass
class _Changes:
    """What one write transaction did to the vectors, applied to FAISS after commit."""

    added_ids: list[np.ndarray] = field(default_factory=list)
    added_vectors: list[np.ndarray] = field(default_factory=list)
    removed_ids: list[np.ndarray] = field(default_factory=list)
    reconcile: bool = False  # too many vectors to hold: sync FAISS from SQL after commit
    pending: int = 0

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.pending += len(ids)
        if self.pending > PENDING_LIMIT:
            self.reconcile = True
            self.added_ids.clear()
            self.added_vectors.clear()
        if not self.reconcile:
            self.added_ids.append(ids)
            self.added_vectors.append(vectors)


class DocumentWriter:
    """Adds one document's chunks batch by batch inside a single transaction."""

    def __init__(self, conn: Connection, changes: _Changes, document_id: int, dim: int):
        self.conn, self.changes, self.document_id, self.dim = conn, changes, document_id, dim
        self.chunks = 0

    def add(self, chunks: list[ChunkIn], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        if not chunks:
            return
        if vectors.shape[1] != self.dim:
            raise EmbedderMismatchError(f"vectors are {vectors.shape[1]}-d but the store holds {self.dim}-d vectors")
        rows = [
            dict(document_id=self.document_id, ordinal=c.ordinal, char_start=c.char_start, char_end=c.char_end,
                 token_count=c.token_count, text=c.text, heading_path=c.heading_path, vector=v.tobytes())
            for c, v in zip(chunks, vectors)
        ]
        ids = self.conn.execute(insert(Chunk).returning(Chunk.id, sort_by_parameter_order=True), rows).scalars().all()
        self.changes.add(np.asarray(ids, dtype=np.int64), vectors)
        self.chunks += len(chunks)

    def set_char_count(self, n: int) -> None:
        self.conn.execute(update(Document).where(Document.id == self.document_id).values(char_count=n))


class Writes:
    """MemoryStore's writes (a mixin: the store's state lives in MemoryStore)."""

    @contextmanager
    def _write(self) -> Iterator[_Changes]:
        """One SQL transaction under the store's write lock; FAISS follows after commit."""
        if self.index_error is not None:
            raise self.index_error
        self._take_write_lock()
        try:
            self._sync()
            changes = _Changes()
            with self.engine.begin() as conn:
                self._conn = conn
                try:
                    yield changes
                finally:
                    self._conn = None
                generation = self._generation(conn) + 1
                self._set_setting(conn, "generation", generation)
            self._apply(changes)
            self.generation = generation
            self._dirty = True
            if time.monotonic() - self._last_save >= self.checkpoint_seconds:
                self.save_index()
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _take_write_lock(self) -> None:
        """Wait for another process's write (one file's transaction) to end, at most WRITE_LOCK_WAIT_S."""
        deadline = time.monotonic() + WRITE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockedError(
                        f"another process has held the write lock of {self.dir} for over {WRITE_LOCK_WAIT_S:g} s; "
                        "wait for its ingest to finish, or stop it") from None
                time.sleep(0.05)

    def _apply(self, changes: _Changes) -> None:
        if changes.removed_ids:
            kv.drop_chunks(self.kv_dir, np.concatenate(changes.removed_ids).tolist())
        if self.index is None:
            return
        if changes.reconcile:
            self._reconcile()
            return
        if changes.removed_ids:
            self.index.remove(np.concatenate(changes.removed_ids))
        if changes.added_ids:
            self.index.add(np.concatenate(changes.added_ids), np.vstack(changes.added_vectors))
        wanted = self.index_config.kind_for(self.index.size)
        many_tombstones = len(self.index.tombstones) > COMPACT_FRACTION * max(1, self.index.faiss.ntotal)
        if wanted != self.index.kind or many_tombstones:
            self.rebuild_index()

    def add_document(self, doc: DocumentIn, chunks: list[ChunkIn], vectors: np.ndarray) -> int:
        """Insert a document with its chunks and vectors, replacing any document with the same source."""
        with self.document_writer(doc) as writer:
            writer.add(chunks, vectors)
        return writer.document_id

    @contextmanager
    def document_writer(self, doc: DocumentIn) -> Iterator[DocumentWriter]:
        """Replace the document with `doc.source` by `doc`, adding chunks in batches; all in one transaction."""
        if self.embedder_dim is None:
            raise MemstoreError("the store has no embedder yet; call require_embedder(name, dim) first")
        with self._write() as changes:
            conn = self._conn
            self._delete_where(conn, changes, Document.source == doc.source)
            doc_id = conn.execute(insert(Document).values(
                source=doc.source, content_hash=doc.content_hash, size=doc.size, mtime=doc.mtime,
                title=doc.title, char_count=doc.char_count, meta=doc.meta or {}, encoding=doc.encoding,
                created_at=utcnow(), updated_at=utcnow(),
            ).returning(Document.id)).scalar_one()
            yield DocumentWriter(conn, changes, doc_id, self.embedder_dim)

    def delete_document(self, source_or_id: str | int) -> bool:
        """Delete a document, its chunks and their vectors. Returns whether it existed."""
        cond = Document.id == source_or_id if isinstance(source_or_id, int) else Document.source == str(source_or_id)
        with self._write() as changes:
            return self._delete_where(self._conn, changes, cond) > 0

    def _delete_where(self, conn, changes: _Changes, cond) -> int:
        doc_ids = conn.execute(select(Document.id).where(cond)).scalars().all()
        if not doc_ids:
            return 0
        chunk_ids = conn.execute(select(Chunk.id).where(Chunk.document_id.in_(doc_ids))).scalars().all()
        changes.removed_ids.append(np.asarray(chunk_ids, dtype=np.int64))
        conn.execute(delete(Chunk).where(Chunk.document_id.in_(doc_ids)))
        conn.execute(delete(Document).where(Document.id.in_(doc_ids)))
        return len(doc_ids)

    def touch_document(self, source: str, size: int, mtime: float) -> None:
        """Record a new size/mtime for a document whose content did not change."""
        with self.engine.begin() as conn:
            conn.execute(update(Document).where(Document.source == source).values(size=size, mtime=mtime))

    def start_run(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(insert(IngestRun).values(status="running", stats={}, started_at=utcnow())
                                .returning(IngestRun.id)).scalar_one()

    def finish_run(self, run_id: int, status: str, stats: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(IngestRun).where(IngestRun.id == run_id)
                         .values(status=status, stats=stats, finished_at=utcnow()))
