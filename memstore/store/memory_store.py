"""MemoryStore: one commit boundary over the SQL database and the FAISS index.

SQL is the source of truth. Every write runs in one SQL transaction that also bumps a
store generation; the FAISS index is updated in memory after the commit and saved
(atomically, stamped with the generation) at checkpoints. On open, and before every
search or write, an index whose generation differs from SQL's is reconciled from SQL:
missing vectors are added back from the copies kept in SQL, stale ones removed.
"""
from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Connection, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL

from memstore.errors import (
    EmbedderMismatchError,
    IndexCorruptError,
    InvalidInputError,
    MemstoreError,
    NotAStoreError,
    NotFoundError,
    StoreLockedError,
    UnknownFilterError,
)
from memstore.settings import SEARCH_MODES
from memstore.store import db, kv, lexical
from memstore.store.index import EXACT, IndexConfig, VectorIndex
from memstore.store.schema import Chunk, Document, IngestRun, RerankVector, Setting, utcnow

DB_FILE = "memstore.db"
INDEX_FILE = "vectors.faiss"
EXACT_FILTER_LIMIT = 20_000  # filtered searches over at most this many chunks are scored exactly
COMPACT_FRACTION = 0.25  # rebuild an HNSW index when this share of it is tombstones
BATCH = 10_000
HYBRID_CANDIDATES = 50  # from each side, before fusion
PENDING_LIMIT = 50_000  # vectors held for FAISS until commit; beyond this, re-read them from SQL
WRITE_LOCK_WAIT_S = 300.0  # how long a write waits for another process's (one file's transaction) to end


@dataclass
class ChunkIn:
    """A chunk to add: its place in the document text and its text."""

    ordinal: int
    char_start: int
    char_end: int
    text: str
    token_count: int
    heading_path: str = ""


@dataclass
class DocumentIn:
    source: str
    content_hash: str
    size: int
    mtime: float
    char_count: int
    title: str | None = None
    meta: dict = field(default_factory=dict)
    encoding: str | None = None


@dataclass
class Hit:
    chunk_id: int
    document_id: int
    source: str
    title: str | None
    ordinal: int
    char_start: int
    char_end: int
    heading_path: str
    text: str
    score: float
    meta: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Candidates:
    """A search's ranking before it is cut to k, and the lexical side's own scores."""

    ranked: list[tuple[int, float]]  # (chunk id, score), best first: fused in hybrid mode
    lexical: list[tuple[int, float]]  # empty in dense mode


@dataclass
class HybridScores:
    """Every candidate of either side of a hybrid search, scored by both sides."""

    dense_top: list[tuple[int, float]]  # each side's own ranking
    lexical_top: list[tuple[int, float]]
    dense: dict[int, float]  # chunk id -> score, for every candidate
    lexical: dict[int, float]
    rare: list[str]  # the query's rare words (lexical.rare_words)
    holders: set[int]  # the lexical candidates that hold every rare word

    def fused(self, fusion: str = "full") -> list[tuple[int, float]]:
        if fusion == "weighted":  # each side's scores over its own candidates only
            return lexical.weighted_fusion(self.dense_top, self.lexical_top)
        if fusion == "rrf":
            return lexical.reciprocal_rank_fusion(self.dense_top, self.lexical_top)
        return lexical.exact_match_first(lexical.full_score_fusion(self.dense, self.lexical), self.holders)


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


def resolve_target(target: str | Path, data_dir: str | Path | None) -> tuple[str, Path]:
    """Map a store path or database URL to (SQLAlchemy URL, directory for FAISS/KV files)."""
    target = str(target)
    if db.is_url(target):
        if data_dir is None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", re.sub(r"//[^@/]*@", "//", target)).strip("_")
            digest = hashlib.sha1(target.encode()).hexdigest()[:8]
            data_dir = Path.home() / ".local" / "share" / "memstore" / f"{slug[-60:]}-{digest}"
        return target, Path(data_dir)
    path = Path(target).expanduser()
    # URL.create quotes what a URL would misread in a path ('%', '?', '#', '@', ':')
    return URL.create("sqlite", database=str(path.resolve() / DB_FILE)).render_as_string(), path


class MemoryStore:
    """A store: documents and chunks in SQL, their vectors in FAISS (and in SQL as backup)."""

    def __init__(self, target: str | Path, *, data_dir: str | Path | None = None,
                 create: bool = True, index_config: IndexConfig | None = None,
                 on_corrupt_index: str = "raise"):
        self._tmpdir = None
        if str(target) == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="memstore-")
            target = self._tmpdir
        self.url, self.dir = resolve_target(target, data_dir)
        self._check_exists(target, create)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.dir / INDEX_FILE
        self.kv_dir = self.dir / "kv"
        self.engine = db.make_engine(self.url)
        self.revision = db.upgrade(self.engine)
        self.index_config = index_config or IndexConfig()
        self.checkpoint_seconds = 5.0  # the index file is a checkpoint: SQL holds every committed write
        self._last_save = time.monotonic()
        self._dirty = False  # the in-memory index differs from the file
        self._executor: ThreadPoolExecutor | None = None
        self._lock_file = open(self.dir / "write.lock", "a+")
        self.index: VectorIndex | None = None
        self.index_error: IndexCorruptError | None = None
        self.generation = -1
        self._filter_cache: dict[str, tuple[int, list[int]]] = {}  # filters -> (generation, document ids)
        self._chunk_count: tuple[int, int] | None = None  # (generation, chunks)
        try:
            self._open_index()
        except IndexCorruptError as e:
            if on_corrupt_index == "raise":
                self.close()
                raise
            self.index_error = e

    # ---- opening -------------------------------------------------------------------------

    def _check_exists(self, target, create: bool) -> None:
        if db.is_url(self.url) and not self.url.startswith("sqlite"):
            return
        path = Path(str(target)).expanduser()
        if path.exists() and not path.is_dir():
            raise NotAStoreError(f"{path} is a file, not a memstore store (a store is a directory holding {DB_FILE})")
        if not (path / DB_FILE).exists():
            if not create:
                raise NotAStoreError(f"{path} is not a memstore store (no {DB_FILE}); create one with `memstore ingest PATH --store {path}`")
            if path.is_dir() and any(path.iterdir()):
                raise NotAStoreError(f"{path} is a non-empty directory without {DB_FILE}; choose an empty or new directory for the store")

    def _open_index(self) -> None:
        with self.engine.connect() as conn:
            sql_generation = self._generation(conn)
        dim = self.embedder_dim
        if self.index_path.exists():
            self.index, self.generation = VectorIndex.load(self.index_path)
            self.index.config = self.index_config
        elif dim is not None:
            self.index, self.generation = VectorIndex(dim, config=self.index_config), -1
        if self.index is not None and self.generation != sql_generation:
            self._reconcile()
            self.save_index()

    # ---- settings ------------------------------------------------------------------------

    def get_setting(self, key: str, default: Any = None) -> Any:
        with self.engine.connect() as conn:
            return self._get_setting(conn, key, default)

    @staticmethod
    def _get_setting(conn: Connection, key: str, default: Any = None) -> Any:
        value = conn.execute(select(Setting.value).where(Setting.key == key)).scalar_one_or_none()
        return default if value is None else value

    @staticmethod
    def _set_setting(conn: Connection, key: str, value: Any) -> None:
        if conn.execute(select(Setting.key).where(Setting.key == key)).first():
            conn.execute(update(Setting).where(Setting.key == key).values(value=value))
        else:
            conn.execute(insert(Setting).values(key=key, value=value))

    def set_setting(self, key: str, value: Any) -> None:
        with self._write():
            self._set_setting(self._conn, key, value)

    def _generation(self, conn: Connection) -> int:
        return int(self._get_setting(conn, "generation", 0))

    @property
    def embedder(self) -> dict | None:
        return self.get_setting("embedder")

    @property
    def embedder_dim(self) -> int | None:
        emb = self.embedder
        return None if emb is None else int(emb["dim"])

    def require_embedder(self, name: str, dim: int) -> None:
        """Record the embedder on first use; refuse a different one afterwards."""
        current = self.embedder
        if current is None:
            self.set_setting("embedder", {"name": name, "dim": dim})
            self.index = VectorIndex(dim, kind=self.index_config.kind_for(0), config=self.index_config)
            return
        if current["name"] != name or int(current["dim"]) != dim:
            raise EmbedderMismatchError(
                f"store was built with embedder {current['name']} ({current['dim']}-d), not {name} ({dim}-d); "
                f"use --embedder {current['name']} or a new store"
            )

    # ---- writing -------------------------------------------------------------------------

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

    # ---- the index ------------------------------------------------------------------------

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

    # ---- reading -------------------------------------------------------------------------

    def search(self, vector: np.ndarray | None = None, k: int = 10, filters: dict | None = None, *,
               query: str | None = None, mode: str | None = None, fusion: str = "full") -> list[Hit]:
        """Top-k chunks for a query vector (dense), query text (lexical) or both (hybrid, fused).

        `mode` defaults to hybrid when both are given. `filters` restrict both sides before
        fusion, so a filtered search is never cut short.
        """
        return self.hits(self.candidates(vector, k, filters, query=query, mode=mode, fusion=fusion).ranked[:k])

    def candidates(self, vector: np.ndarray | Callable[[], np.ndarray] | None, k: int, filters: dict | None = None,
                   *, query: str | None = None, mode: str | None = None, fusion: str = "full") -> Candidates:
        """The ranking that `search` cuts to its top k (at least k long when the store has k chunks).

        `vector` may be a function that computes it (embeds the query): a hybrid search then runs
        its lexical query in a worker thread meanwhile (both release the GIL), so a query costs
        about the slower of the two instead of their sum.
        """
        mode = mode or ("hybrid" if vector is not None and query else "dense" if vector is not None else "lexical")
        if mode not in SEARCH_MODES:
            raise InvalidInputError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
        if k < 1:
            raise InvalidInputError("k must be at least 1")
        if mode != "lexical" and vector is None:
            raise InvalidInputError(f"{mode} search needs a query vector")
        if mode != "dense" and not (query and query.strip()):
            raise InvalidInputError(f"{mode} search needs query text")
        doc_ids = self.document_ids_matching(filters) if filters else None
        if doc_ids is not None and not doc_ids:
            return Candidates([], [])
        if mode == "hybrid":
            scored = self.hybrid_scores(vector, query, max(HYBRID_CANDIDATES, 2 * k), doc_ids)
            return Candidates(scored.fused(fusion), scored.lexical_top)
        if mode == "lexical":
            found = self._lexical(query, k, doc_ids)[1]
            return Candidates(found, found)
        return Candidates(self._dense(vector() if callable(vector) else vector, k, doc_ids), [])

    def hybrid_scores(self, vector: np.ndarray | Callable[[], np.ndarray], query: str, n: int,
                      doc_ids: list[int] | None = None) -> HybridScores:
        """The top n of each side, then each side's score for the other side's candidates: the
        dense score from the stored vector, the lexical score from the full-text index."""
        pending = self._worker().submit(self._lexical_side, query, n, doc_ids)
        try:
            if callable(vector):
                vector = vector()
            vector = np.asarray(vector, dtype=np.float32).reshape(-1)
            dense_top = self._dense(vector, n, doc_ids)
            early = None
            if self.engine.dialect.name == "sqlite":  # score the dense side lexically while the worker still runs
                with self.engine.connect() as conn:
                    early = lexical.sqlite_scores(conn, lexical.query_terms(query), [i for i, _ in dense_top])
        finally:  # wait for the lexical query even when the dense side failed
            prepared, lexical_top, rare, holders = pending.result()
        dense, lex = dict(dense_top), dict(lexical_top)
        dense.update(self._dense_scores(vector, [i for i in lex if i not in dense]))
        missing = [i for i in dense if i not in lex]
        if early is not None:
            lex.update((i, early.get(i, 0.0)) for i in missing)
        else:
            with self.engine.connect() as conn:
                lex.update(lexical.scores(conn, prepared, missing))
        return HybridScores(dense_top, lexical_top, dense, lex, rare, holders)

    def _dense(self, vector: np.ndarray, k: int, doc_ids: list[int] | None) -> list[tuple[int, float]]:
        if self.index_error is not None:
            raise self.index_error
        self._sync()
        if self.index is None or self.index.size == 0:
            return []
        vector = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        if vector.shape[1] != self.index.dim:
            raise EmbedderMismatchError(f"query vector is {vector.shape[1]}-d but the store holds {self.index.dim}-d vectors")
        allowed = self._chunk_ids_of(doc_ids) if doc_ids is not None else None
        if allowed is not None and self.index.kind != EXACT and len(allowed) <= EXACT_FILTER_LIMIT:
            return self._exact_scores(vector[0], allowed, k)
        scores, ids = self.index.search(vector, k, allowed)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memstore-lexical")
        return self._executor

    def _lexical_side(self, query: str, n: int, doc_ids: list[int] | None):
        """The lexical top n, the query's rare words, and which of the top n hold them all (a chunk
        holding every rare word scores high, so one outside the top n would mean many holders)."""
        with self.engine.connect() as conn:
            prepared = lexical.prepare(conn, query, total_chunks=self.chunk_total)
            top = lexical.search(conn, prepared, n, doc_ids)
            rare = lexical.rare_words(prepared)
            holders = lexical.holding_all(conn, rare, [i for i, _ in top]) if rare else set()
        return prepared, top, rare, holders

    def _dense_scores(self, vector: np.ndarray, ids: list[int]) -> dict[int, float]:
        """Inner products with these chunks' vectors: from the index, else from SQL."""
        if not ids:
            return {}
        kept = self.index.vectors(ids) if self.index is not None else {}
        missing = np.asarray([i for i in ids if i not in kept], dtype=np.int64)
        if len(missing):
            with self.engine.connect() as conn:
                for found, vectors in self._vectors_for(conn, missing):
                    kept.update(zip(found.tolist(), vectors))
        return {i: float(v @ vector) for i, v in kept.items()}

    def _lexical(self, query: str, k: int, doc_ids: list[int] | None) -> tuple[lexical.LexicalQuery, list[tuple[int, float]]]:
        with self.engine.connect() as conn:
            prepared = lexical.prepare(conn, query, total_chunks=self.chunk_total)
            return prepared, lexical.search(conn, prepared, k, doc_ids)

    def _exact_scores(self, vector: np.ndarray, allowed: np.ndarray, k: int) -> list[tuple[int, float]]:
        ids, scores = [], []
        with self.engine.connect() as conn:
            for batch_ids, vectors in self._vectors_for(conn, allowed):
                ids.append(batch_ids)
                scores.append(vectors @ vector)
        ids, scores = np.concatenate(ids), np.concatenate(scores)
        top = np.argsort(-scores)[:k]
        return [(int(ids[i]), float(scores[i])) for i in top]

    def _chunk_ids_of(self, doc_ids: list[int]) -> np.ndarray:
        with self.engine.connect() as conn:
            out = [conn.execute(select(Chunk.id).where(Chunk.document_id.in_(doc_ids[s:s + BATCH]))).scalars().all()
                   for s in range(0, len(doc_ids), BATCH)]
        return np.asarray([i for part in out for i in part], dtype=np.int64)

    def document_ids_matching(self, filters: dict) -> list[int]:
        """Ids of documents that match every filter.

        Fields: `path` (glob on the document source), `document_id` (an id or a list),
        `meta.KEY` (equality on the document's user metadata). SQL narrows the documents down
        (LIKE for globs, JSON for string metadata) and the exact test runs on what it returns;
        the answer is kept until the store's next write, so the decoding steps of one answer
        and repeated searches with the same filters do not ask again.
        """
        key = repr(sorted(filters.items(), key=lambda kv: kv[0]))
        predicates = [_filter_predicate(k, v) for k, v in filters.items()]
        with self.engine.connect() as conn:
            generation = self._generation(conn)
            cached = self._filter_cache.get(key)
            if cached is not None and cached[0] == generation:
                return cached[1]
            query = select(Document.id, Document.source, Document.meta)
            for k, v in filters.items():
                query = query.where(*_filter_clauses(k, v))
            rows = conn.execute(query).all()
        ids = [r.id for r in rows if all(p(r) for p in predicates)]
        if len(self._filter_cache) >= 64:
            self._filter_cache.clear()
        self._filter_cache[key] = (generation, ids)
        return ids

    def chunk_total(self, conn: Connection) -> int:
        """How many chunks the store holds, counted once per write (generation)."""
        generation = self._generation(conn)
        if self._chunk_count is None or self._chunk_count[0] != generation:
            self._chunk_count = (generation, conn.execute(select(func.count(Chunk.id))).scalar_one())
        return self._chunk_count[1]

    def hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits (chunk records with their document) for (chunk id, score) pairs, in that order."""
        if not scored:
            return []
        records = {c["chunk_id"]: c for c in self.get_chunks([i for i, _ in scored])}
        return [Hit(score=s, **records[i]) for i, s in scored if i in records]

    def get_chunks(self, ids: Iterable[int]) -> list[dict]:
        """Chunk records (with their document's source, title and metadata) in the order asked."""
        ids = [int(i) for i in ids]
        cols = (Chunk.id.label("chunk_id"), Chunk.document_id, Document.source, Document.title,
                Chunk.ordinal, Chunk.char_start, Chunk.char_end, Chunk.heading_path, Chunk.text, Document.meta)
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).join(Document).where(Chunk.id.in_(ids))).mappings().all()
        by_id = {r["chunk_id"]: dict(r) for r in rows}
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

    def all_chunks(self) -> list[dict]:
        """Every chunk's id, document id, text and token count, in id order."""
        cols = (Chunk.id.label("chunk_id"), Chunk.document_id, Chunk.text, Chunk.token_count)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(*cols).order_by(Chunk.id)).mappings()]

    def chunk_ids(self) -> list[int]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Chunk.id).order_by(Chunk.id)).scalars())

    def chunk_ordinals(self) -> dict[int, int]:
        """Each chunk's place in its document (0 for the first)."""
        with self.engine.connect() as conn:
            return {cid: ordinal for cid, ordinal in conn.execute(select(Chunk.id, Chunk.ordinal))}

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

    # ---- check and repair -----------------------------------------------------------------

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

    # ---- ingest runs ----------------------------------------------------------------------

    def start_run(self) -> int:
        with self.engine.begin() as conn:
            return conn.execute(insert(IngestRun).values(status="running", stats={}, started_at=utcnow())
                                .returning(IngestRun.id)).scalar_one()

    def finish_run(self, run_id: int, status: str, stats: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(IngestRun).where(IngestRun.id == run_id)
                         .values(status=status, stats=stats, finished_at=utcnow()))

    # ---- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "engine", None) is None:
            return
        if self._dirty and self.index_error is None:
            self.save_index()
        if self._executor is not None:
            self._executor.shutdown()
        self.engine.dispose()
        self.engine = None
        self._lock_file.close()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# a chunk whose char span does not lie inside its document's text
_BAD_SPAN = (Chunk.char_start < 0) | (Chunk.char_end > Document.char_count) | (Chunk.char_start >= Chunk.char_end)


def _filter_clauses(key: str, value) -> list:
    """SQL conditions that every document matching the filter meets (a superset: `_filter_predicate` decides)."""
    if key in ("path", "source"):
        patterns = [value] if isinstance(value, str) else list(value)
        return [or_(*[Document.source.like(_glob_like(p), escape="\\") for p in patterns])]
    if key == "document_id":
        return [Document.id.in_([int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])])]
    if key.startswith("meta.") and len(key) > 5 and isinstance(value, str):
        return [Document.meta[key[5:]].as_string() == value]
    return []


def _glob_like(pattern: str) -> str:
    """A LIKE pattern that every string the glob matches also matches: * -> %, ? and [...] -> _."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[" and (end := pattern.find("]", i + 2)) != -1:  # a class, as fnmatch reads it ("[]]" included)
            out.append("_")
            i = end + 1
            continue
        out.append("%" if c == "*" else "_" if c == "?" else "\\" + c if c in "%_\\" else c)
        i += 1
    return "".join(out)


def _filter_predicate(key: str, value):
    if key in ("path", "source"):
        patterns = [value] if isinstance(value, str) else list(value)
        return lambda r: any(fnmatch.fnmatchcase(r.source, p) for p in patterns)
    if key == "document_id":
        wanted = {int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])}
        return lambda r: r.id in wanted
    if key.startswith("meta.") and len(key) > 5:
        name = key[5:]
        return lambda r: (r.meta or {}).get(name) == value
    raise UnknownFilterError(
        f"unknown filter field {key!r}; use 'path' (a glob), 'document_id' or 'meta.<key>'"
    )
