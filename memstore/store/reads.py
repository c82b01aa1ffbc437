"""Reading chunks and documents, the re-ranker's vector cache, stats."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from memstore.errors import (
    NotFoundError,
)
from memstore.store.records import BATCH, ChunkRecord, Hit
from memstore.store.schema import Chunk, Document, RerankVector

CHUNK_COLUMNS = (Chunk.id.label("chunk_id"), Chunk.document_id, Document.source, Document.title, Chunk.ordinal,
                 Chunk.char_start, Chunk.char_end, Chunk.heading_path, Chunk.text, Chunk.token_count, Document.meta)


class Reads:
    """MemoryStore's reads (a mixin)."""

    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits (chunk records with their document) for (chunk id, score) pairs, in that order."""
        if not scored:
            return []
        records = {c.chunk_id: c for c in self.get_chunks([i for i, _ in scored])}
        return [Hit(**records[i].record(), score=s) for i, s in scored if i in records]

    def get_chunks(self, ids: Iterable[int]) -> list[ChunkRecord]:
        """Chunk records (with their document's source, title and metadata) in the order asked."""
        ids = [int(i) for i in ids]
        with self.engine.connect() as conn:
            rows = conn.execute(select(*CHUNK_COLUMNS).join(Document).where(Chunk.id.in_(ids))).mappings().all()
        by_id = {r["chunk_id"]: ChunkRecord(**r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    # ---- re-ranker vectors (a cache in SQL, deleted with their chunks) ---------------------

    def rerank_vectors(self, model: str, chunk_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """The kept vectors of `model` for those of `chunk_ids` that have one."""
        ids = [int(i) for i in chunk_ids]
        out = {}
        with self.engine.connect() as conn:
            for s in range(0, len(ids), BATCH):
                rows = conn.execute(select(RerankVector.chunk_id, RerankVector.vector).where(
                    RerankVector.model == model, RerankVector.chunk_id.in_(ids[s:s + BATCH])))
                out.update((int(i), np.frombuffer(v, dtype=np.float32)) for i, v in rows)
        return out

    def put_rerank_vectors(self, model: str, chunk_ids: Iterable[int], vectors: np.ndarray) -> int:
        """Keep `model`'s vectors of chunks, in one transaction; returns how many of them are kept now.

        Chunks deleted meanwhile are skipped, and so are vectors kept already (by a concurrent search).
        """
        ids = [int(i) for i in chunk_ids]
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} chunk ids but {len(vectors)} vectors")
        written = 0
        with self.engine.begin() as conn:
            dialect = sqlite_dialect if conn.dialect.name == "sqlite" else postgresql_dialect
            for s in range(0, len(ids), BATCH):
                batch = ids[s:s + BATCH]
                alive = set(conn.execute(select(Chunk.id).where(Chunk.id.in_(batch))).scalars())
                rows = [dict(chunk_id=i, model=model, vector=v.tobytes())
                        for i, v in zip(batch, vectors[s:s + BATCH]) if i in alive]
                if rows:
                    conn.execute(dialect.insert(RerankVector).on_conflict_do_nothing(), rows)
                    written += len(rows)
        return written

    def chunks_without_rerank_vector(self, model: str) -> list[int]:
        """Ids of chunks that have no vector of `model` yet, in id order."""
        kept = select(RerankVector.chunk_id).where(RerankVector.model == model, RerankVector.chunk_id == Chunk.id)
        with self.engine.connect() as conn:
            return list(conn.execute(select(Chunk.id).where(~kept.exists()).order_by(Chunk.id)).scalars())

    def all_chunks(self) -> list[ChunkRecord]:
        """Every chunk's record, in id order."""
        with self.engine.connect() as conn:
            return [ChunkRecord(**r) for r in conn.execute(select(*CHUNK_COLUMNS).join(Document).order_by(Chunk.id)).mappings()]

    def chunk_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Chunk.id).order_by(Chunk.id)).scalars())

    def documents(self) -> list[dict]:
        cols = (Document.id, Document.source, Document.content_hash, Document.size, Document.mtime,
                Document.title, Document.char_count, Document.encoding, Document.meta)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(*cols).order_by(Document.id)).mappings()]

    def document(self, source: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(Document.id, Document.size, Document.mtime, Document.content_hash)
                               .where(Document.source == source)).mappings().first()
        return dict(row) if row else None

    def document_info(self, document_id: int) -> dict:
        """One document's row and chunk count; MemstoreError when there is no such document."""
        cols = (Document.id, Document.source, Document.title, Document.char_count, Document.size, Document.encoding,
                Document.meta)
        with self.engine.connect() as conn:
            row = conn.execute(select(*cols).where(Document.id == document_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no document with id {document_id}")
        return {**row, "chunks": self.chunk_count(document_id)}

    def document_text(self, document_id: int) -> str:
        """The document's text rebuilt from its chunks (whitespace between chunks becomes spaces)."""
        with self.engine.connect() as conn:
            n = conn.execute(select(Document.char_count).where(Document.id == document_id)).scalar_one_or_none()
            if n is None:
                raise NotFoundError(f"no document with id {document_id}")
            rows = conn.execute(select(Chunk.char_start, Chunk.text).where(Chunk.document_id == document_id)
                                .order_by(Chunk.ordinal)).all()
        out, end = [], 0
        for start, text in rows:
            if start > end:
                out.append(" " * (start - end))
            out.append(text[max(0, end - start):])
            end = max(end, start + len(text))
        return "".join(out)

    def chunk_count(self, document_id: int) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count(Chunk.id)).where(Chunk.document_id == document_id)).scalar_one()

    def stats(self) -> dict:
        with self.engine.connect() as conn:
            n_docs = conn.execute(select(func.count(Document.id))).scalar_one()
            n_chunks = conn.execute(select(func.count(Chunk.id))).scalar_one()
            n_tokens = conn.execute(select(func.coalesce(func.sum(Chunk.token_count), 0))).scalar_one()
        return {
            "store": str(self.dir) if self.url.startswith("sqlite") else self.engine.url.render_as_string(),
            "documents": n_docs, "chunks": n_chunks, "tokens": int(n_tokens),
            "embedder": self.embedder, "index_kind": self.index.kind if self.index else None,
            "index_vectors": self.index.size if self.index else 0,
            "schema_revision": self.revision, "generation": self.generation,
        }
