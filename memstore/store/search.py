"""Searching: dense (FAISS), lexical (full-text index) and hybrid, with filters narrowed in SQL."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sqlalchemy import Connection, func, or_, select

from memstore.errors import (
    EmbedderMismatchError,
    InvalidInputError,
    UnknownFilterError,
)
from memstore.settings import SEARCH_MODES
from memstore.store import lexical
from memstore.store.index import EXACT
from memstore.store.records import BATCH, Candidates, Hit, HybridScores
from memstore.store.schema import Chunk, Document

EXACT_FILTER_LIMIT = 20_000  # filtered searches over at most this many chunks are scored exactly
HYBRID_CANDIDATES = 50  # from each side, before fusion


class Search:
    """MemoryStore's searches (a mixin)."""

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
        """The lexical top n, the query's rare words, and the exact matches to put first: the one
        candidate that holds every rare word, else the chunks holding a word that at most
        lexical.SOLE_HOLDERS chunks hold. A long question's many common words can outscore its
        one rare word (a value asked for), so those chunks join the candidates wherever bm25 ranks them."""
        with self.engine.connect() as conn:
            prepared = lexical.prepare(conn, query, total_chunks=self.chunk_total)
            top = lexical.search(conn, prepared, n, doc_ids)
            rare = lexical.rare_words(prepared)
            holders = lexical.holding_all(conn, rare, [i for i, _ in top]) if rare else set()
            if len(holders) != 1:
                holders = lexical.sole_holders(conn, prepared, lexical.named_words(query), doc_ids)
                ranked = {i for i, _ in top}
                missing = lexical.scores(conn, prepared, [i for i in holders if i not in ranked])
                top += sorted(missing.items(), key=lambda kv: -kv[1])
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
        predicates = [_filter_predicate(k, _typed(k, v)) for k, v in filters.items()]
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


MAX_ID = 2**63 - 1  # a database id is a signed 64-bit integer


def _typed(key: str, value):
    """The filter's value, or InvalidInputError where it has the wrong type for its field."""
    values = list(value) if isinstance(value, (list, tuple, set)) else [value]
    if key in ("path", "source") and not all(isinstance(v, str) for v in values):
        raise InvalidInputError(f"the filter {key!r} takes a glob or a list of globs, not {value!r}")
    if key == "document_id":
        try:
            if not all(0 <= int(v) <= MAX_ID for v in values):
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidInputError(f"the filter 'document_id' takes a document id or a list of them, not {value!r}") from None
    return value


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
