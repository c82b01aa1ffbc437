"""Keeping FAISS in step with SQL (the generation check, reconcile, rebuild, checkpoints) and
`memstore check` / `--repair`."""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from sqlalchemy import func, select, update

from memstore.errors import (
    IndexCorruptError,
)
from memstore.store import kv, lexical
from memstore.store.index import VectorIndex
from memstore.store.records import BATCH
from memstore.store.schema import Chunk, Document


class Consistency:
    """MemoryStore's index upkeep and checks (a mixin)."""

    def _sync(self) -> None:
        """Catch up with writes committed by other processes (or lost by a crash)."""
        if self.index is None:
            if self.embedder_dim is None:
                return
            self.index = VectorIndex(self.embedder_dim, config=self.index_config)
        with self.engine.connect() as conn:
            sql_generation = self._generation(conn)
        if sql_generation != self.generation:
            self._reconcile()

    def _reconcile(self) -> dict:
        """Make the in-memory index hold exactly SQL's chunk ids; returns what it changed."""
        with self.engine.connect() as conn:
            generation = self._generation(conn)
            sql_ids = np.fromiter(conn.execute(select(Chunk.id)).scalars(), np.int64)
            index_ids = self.index.ids()
            missing = np.setdiff1d(sql_ids, index_ids)
            extra = np.setdiff1d(index_ids, sql_ids)
            self.index.remove(extra)
            for ids, vectors in self._vectors_for(conn, missing):
                self.index.add(ids, vectors)
        self.generation = generation
        self._dirty = True
        return {"added": int(len(missing)), "removed": int(len(extra))}

    def _vectors_for(self, conn, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(ids), BATCH):
            batch = ids[start:start + BATCH].tolist()
            rows = conn.execute(select(Chunk.id, Chunk.vector).where(Chunk.id.in_(batch))).all()
            yield self._unpack(rows)

    def _unpack(self, rows) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return ids, vectors

    def rebuild_index(self) -> int:
        """Build a fresh index from the vectors kept in SQL; the kind is chosen by size."""
        dim = self.embedder_dim
        if dim is None:
            return 0
        with self.engine.connect() as conn:
            n = conn.execute(select(func.count(Chunk.id))).scalar_one()
            index = VectorIndex(dim, kind=self.index_config.kind_for(n), config=self.index_config)
            result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(
                select(Chunk.id, Chunk.vector).order_by(Chunk.id))
            for rows in result.partitions(BATCH):
                index.add(*self._unpack(rows))
            self.generation = self._generation(conn)
        self.index, self.index_error = index, None
        return n

    def save_index(self) -> None:
        if self.index is not None:
            self.index.save(self.index_path, self.generation)
            self._last_save = time.monotonic()
            self._dirty = False

    def check(self) -> dict:
        """Verify SQL and FAISS agree and every chunk's span lies inside its document."""
        with self.engine.connect() as conn:
            sql_ids = np.fromiter(conn.execute(select(Chunk.id)).scalars(), np.int64)
            bad_spans = conn.execute(select(Chunk.id).join(Document).where(_BAD_SPAN)).scalars().all()
            sql_generation = self._generation(conn)
            lexical_error = lexical.integrity_error(conn)
        orphan_kv = sorted(kv.stored_chunk_ids(self.kv_dir) - set(sql_ids.tolist()))
        report = {"sql_chunks": int(len(sql_ids)), "bad_spans": [int(i) for i in bad_spans],
                  "sql_generation": sql_generation, "lexical_error": lexical_error,
                  "orphan_kv_entries": len(orphan_kv)}
        if self.index_error is not None:
            report.update(index_error=str(self.index_error), index_vectors=None, missing_in_index=None,
                          extra_in_index=None, consistent=False)
            return report
        disk_generation = None
        if self.index_path.exists():
            try:
                disk_index, disk_generation = VectorIndex.load(self.index_path)
            except IndexCorruptError as e:
                report.update(index_error=str(e), consistent=False)
                return report
        else:
            disk_index = self.index
        index_ids = disk_index.ids() if disk_index is not None else np.zeros(0, np.int64)
        missing, extra = np.setdiff1d(sql_ids, index_ids), np.setdiff1d(index_ids, sql_ids)
        report.update(
            index_vectors=int(len(index_ids)), index_generation=disk_generation,
            missing_in_index=[int(i) for i in missing[:100]], extra_in_index=[int(i) for i in extra[:100]],
            consistent=not (len(missing) or len(extra) or bad_spans or lexical_error),
        )
        return report

    def repair(self) -> dict:
        """Rebuild the FAISS and lexical indexes from SQL; mark documents with bad chunk spans for re-ingest."""
        n = self.rebuild_index()
        with self.engine.begin() as conn:
            lexical.rebuild(conn)
            sql_ids = set(conn.execute(select(Chunk.id)).scalars())
            doc_ids = set(conn.execute(select(Chunk.document_id).join(Document).where(_BAD_SPAN)).scalars())
            if doc_ids:
                conn.execute(update(Document).where(Document.id.in_(doc_ids)).values(content_hash="", mtime=-1.0))
        kv.drop_chunks(self.kv_dir, kv.stored_chunk_ids(self.kv_dir) - sql_ids)
        self.save_index()
        return {"rebuilt_vectors": n, "documents_marked_for_reingest": len(doc_ids)}


# a chunk whose char span does not lie inside its document's text
_BAD_SPAN = (Chunk.char_start < 0) | (Chunk.char_end > Document.char_count) | (Chunk.char_start >= Chunk.char_end)
