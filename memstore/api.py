"""The Python face of memstore: `memstore.open(...)` returns a Memory."""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from sqlalchemy.exc import DBAPIError

from memstore.errors import EmbedderMismatchError, InvalidInputError, MemstoreError
from memstore.ingest.chunking import Chunker, ChunkerConfig
from memstore.ingest.embed import (
    DEFAULT_EMBEDDER,
    RERANKER,
    Embedder,
    load_embedder,
    resolve_embedder_path,
)
from memstore.ingest.loaders import load, markdown_blocks, storable
from memstore.ingest.pipeline import Ingestor, file_hash
from memstore.model.generate import FOLLOW_SLOTS, SEVERAL_SLOTS
from memstore.settings import (
    ANSWER_TOKENS,
    CHUNK_OVERLAP,
    CHUNK_TOKENS,
    KV_BUDGET_GIB,
    LOADED_MODELS,
    TOP_K,
    default_model,
)
from memstore.store import Candidates, ChunkRecord, DocumentIn, Hit, MemoryStore, lexical
from memstore.store.index import IndexConfig

log = logging.getLogger(__name__)

# rerank=True re-scores the top RERANK_CANDIDATES fused candidates: RERANK_WEIGHT * the
# re-ranker's cosine (min-max) + the rest * lexical score / its maximum (lexical.rerank_fusion).
# Chosen on 1,000 newwiki questions apart from the benchmark's (bench/retrieval.py
# --question-offset 2000) and on the needles, trading a little needle rank for MRR; a higher weight
# loses more needles, the cosine alone is far worse than hybrid (bench/results/retrieval.json).
RERANK_CANDIDATES = 30
RERANK_WEIGHT = 0.3


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


class Memory:
    """A store plus the embedder it was built with: ingest files or text, then search."""

    def __init__(self, target: str | Path = ":memory:", *, data_dir: str | Path | None = None,
                 create: bool = True, embedder: str | None = None, index: IndexConfig | None = None,
                 on_corrupt_index: str = "raise", reranker: str = RERANKER):
        if embedder:
            resolve_embedder_path(embedder)  # a missing model fails before anything is written
        self.store = MemoryStore(target, data_dir=data_dir, create=create, index_config=index,
                                 on_corrupt_index=on_corrupt_index)
        stored = self.store.embedder
        if stored and embedder and stored["name"] != embedder:
            self.store.close()
            raise EmbedderMismatchError(
                f"store was built with embedder {stored['name']}, not {embedder}; "
                f"leave --embedder out or use a new store"
            )
        self.embedder_name = (stored or {}).get("name") or embedder or DEFAULT_EMBEDDER
        self._embedder: Embedder | None = None
        self.reranker_name = reranker
        self._reranker: Embedder | None = None
        # the store's reads and writes take turns (a server's requests, a generation's retrievals);
        # held for a search or a write, never for a whole answer
        self.lock = threading.RLock()
        self._answerers: OrderedDict = OrderedDict()  # model name -> Answerer, least recently used first
        self._models_lock = threading.Lock()  # answers in several threads: a model is loaded once
        self.kept_model: str | None = None  # never evicted: the model load_model loaded

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self.embedder_name)
        return self._embedder

    @property
    def reranker(self) -> Embedder:
        """The second, stronger bi-encoder of `search(rerank=True)` (all-mpnet-base-v2 unless chosen)."""
        if self._reranker is None:
            # exact: int8 vectors were measured for the default embedder only (bench/results/embed_formats.json)
            self._reranker = load_embedder(self.reranker_name, exact=True)
        return self._reranker

    @_locked
    def ingest(self, paths: str | Path | Iterable[str | Path], *, glob: str | None = None,
               chunk_size: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP, prune: bool = False,
               meta: dict | None = None, progress: bool | None = False, encoding: str | None = None,
               on_commit: Callable[[int, int], None] | None = None, ray: str | bool | None = None) -> dict:
        """Ingest files and directories; returns the run summary (files, chunks, seconds, failures).

        A file that cannot be read is listed under "failed" (or "skipped" when it is not a kind
        memstore reads) and the run goes on. `encoding` names the encoding of every text file;
        by default each one's is read from its byte-order mark, else UTF-8, else guessed.
        `on_commit(files done, files in all)` is called whenever every file so far is searchable.
        `ray`: read, chunk and embed on a Ray cluster (True: a Ray started here or $RAY_ADDRESS; or an
        address); this process still commits file by file, so the store is the same as without Ray."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        options = dict(meta=meta, progress=progress, encoding=encoding, on_commit=on_commit)
        if ray:
            from memstore.ingest.ray_runner import RayIngestor

            ingestor = RayIngestor(self.store, self.embedder, ChunkerConfig(chunk_size, overlap), address=ray, **options)
        else:
            ingestor = Ingestor(self.store, self.embedder, ChunkerConfig(chunk_size, overlap), **options)
        return ingestor.run(paths, glob=glob, prune=prune).to_dict()

    @_locked
    def add_text(self, text: str, *, source: str | None = None, title: str | None = None,
                 meta: dict | None = None, chunk_size: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP) -> int:
        """Add a string as a document (markdown headings are kept); returns its document id.
        NUL and lone surrogates, which no store can hold, become U+FFFD."""
        text = storable(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        doc = DocumentIn(source=source or f"text:{digest[:16]}", content_hash=digest, size=len(text.encode()),
                         mtime=0.0, char_count=0, title=title, meta=meta or {})
        return self._add(doc, markdown_blocks(text), chunk_size, overlap)

    @_locked
    def add_file(self, path: str | Path, *, source: str, title: str | None = None, meta: dict | None = None,
                 chunk_size: int = CHUNK_TOKENS, overlap: int = CHUNK_OVERLAP) -> int:
        """Add one file under the name `source`, read by the loader `ingest` uses for its kind (txt, md,
        rst, html, pdf); returns its document id. LoadError (Unsupported for other kinds) when it
        cannot be read; a document of the same source is replaced."""
        path = Path(path)
        loaded = load(path)
        doc = DocumentIn(source=source, content_hash=file_hash(path), size=path.stat().st_size, mtime=0.0,
                         char_count=0, title=title or loaded.title, meta=meta or {}, encoding=loaded.encoding)
        return self._add(doc, loaded.blocks, chunk_size, overlap, require_text=True)

    def _add(self, doc: DocumentIn, blocks, chunk_size: int, overlap: int, require_text: bool = False) -> int:
        """Chunk and embed `blocks` and store them as `doc`, in one transaction."""
        emb = self.embedder
        self.store.require_embedder(emb.name, emb.dim)
        chunker = Chunker(emb.tokenizer, ChunkerConfig(chunk_size, overlap).validate(emb.max_tokens))
        chunks = list(chunker.chunks(blocks))
        if require_text and not chunks:
            raise InvalidInputError(f"{doc.source} holds no text")
        doc.char_count = chunker.char_count
        return self.store.add_document(doc, chunks, emb.encode([c.text for c in chunks]))

    @_locked
    def search(self, query: str, k: int = 5, filters: dict | None = None, mode: str = "hybrid",
               rerank: bool = False) -> list[Hit]:
        """The k chunks that best match `query`, with document, char span, score and text.

        mode: "hybrid" (lexical + dense, fused; the default), "dense" or "lexical".
        rerank: re-score the top RERANK_CANDIDATES of `mode` with the re-ranker (cosine to the
        query, fused with the lexical score). A chunk's re-ranker vector is computed the first
        time it is a candidate and kept in the store (`build_rerank` computes them all at once).
        """
        if not query or not query.strip():
            raise InvalidInputError("the query is empty")
        if self.store.embedder is None:
            return []
        # a function, not the vector: the store runs the lexical query while the query is embedded
        vector = None if mode == "lexical" else lambda: self.embedder.encode([query])[0]
        if not rerank:
            return self.store.search(vector, k=k, filters=filters, query=query, mode=mode)
        found = self.store.candidates(vector, max(k, RERANK_CANDIDATES), filters, query=query, mode=mode)
        return self.store.hits(self._rerank(query, found, max(k, RERANK_CANDIDATES))[:k])

    def _rerank(self, query: str, found: Candidates, n: int) -> list[tuple[int, float]]:
        ids = [i for i, _ in found.ranked[:n]]
        if not ids:
            return []
        kept = self.rerank_vectors(ids)
        ids = [i for i in ids if i in kept]  # a chunk deleted meanwhile drops out
        cosine = np.vstack([kept[i] for i in ids]) @ self.reranker.encode([query])[0]
        return lexical.rerank_fusion(list(zip(ids, cosine.tolist())), found.lexical, RERANK_WEIGHT)

    @_locked
    def rerank_vectors(self, chunk_ids: list[int]) -> dict[int, np.ndarray]:
        """The re-ranker's vectors of these chunks: kept ones from the store, the others encoded and kept."""
        name = self.reranker_name
        kept = self.store.rerank_vectors(name, chunk_ids)
        missing = self.store.get_chunks(i for i in chunk_ids if i not in kept)
        if missing:
            ids = [c.chunk_id for c in missing]
            vectors = self.reranker.encode([c.text for c in missing])
            try:
                self.store.put_rerank_vectors(name, ids, vectors)
            except DBAPIError as e:  # e.g. a writer holds SQLite's lock: it is a cache, encode again next time
                log.warning("re-ranker vectors not kept (%s)", e.__class__.__name__)
            kept.update(zip(ids, vectors))
        return kept

    @_locked
    def build_rerank(self, *, batch: int = 256, progress: bool | None = False) -> dict:
        """Compute and keep the re-ranker vector of every chunk that lacks one (each batch commits)."""
        from tqdm import tqdm

        started = time.perf_counter()
        todo = self.store.chunks_without_rerank_vector(self.reranker_name)
        with tqdm(total=len(todo), unit="chunk", desc="rerank", disable=not progress) as bar:
            for s in range(0, len(todo), batch):
                chunks = self.store.get_chunks(todo[s:s + batch])
                vectors = self.reranker.encode([c.text for c in chunks])
                self.store.put_rerank_vectors(self.reranker_name, [c.chunk_id for c in chunks], vectors)
                bar.update(len(chunks))
        return {"model": self.reranker_name, "encoded": len(todo), "seconds": round(time.perf_counter() - started, 2)}

    def ask(self, question: str, *, model: str | None = None, mode: str = "memory", k: int = TOP_K,
            max_new_tokens: int = ANSWER_TOKENS, retrieve_every: int = 1, filters: dict | None = None,
            on_token: Callable[[str], None] | None = None):
        """Answer `question` from the store with a language model; returns an Answer with sources.

        mode: "memory" (retrieved chunks' keys/values in memory slots of the KV cache; where the
        question asks for several things, the slots of the chunks that match it about as well as
        the best are recomputed together so they read each other; as the answer names things the
        question does not, the chunks holding them come into follow slots), "rag" (chunks pasted as text), "truncate" (the
        documents cut to the model's window) or "full" (the whole text, where it fits).
        `on_token` receives the answer text piece by piece as it is generated.
        """
        self.require_chunks()
        answerer = self._answerer(model or default_model())

        def retrieve(text: str, search_mode: str = "hybrid", n: int = k + SEVERAL_SLOTS) -> list[Hit]:
            return self.search(text, k=n, filters=filters, mode=search_mode)

        return answerer.ask(question, retrieve, mode=mode, k=k, max_new_tokens=max_new_tokens,
                            retrieve_every=retrieve_every, document_text=lambda: self.whole_text(filters),
                            on_token=on_token, follow=lambda terms: retrieve(terms, "lexical", k + FOLLOW_SLOTS))

    @_locked
    def whole_text(self, filters: dict | None = None) -> str:
        """The documents' texts (those matching `filters`) in order of source, as modes truncate and full read them.

        Ordered by source, not id: a re-ingested document gets a new id but keeps its place.
        """
        docs = self.store.documents()
        if filters:
            allowed = set(self.store.document_ids_matching(filters))
            docs = [d for d in docs if d["id"] in allowed]
        return "\n\n".join(self.store.document_text(d["id"]) for d in sorted(docs, key=lambda d: d["source"]))

    def load_model(self, model: str | None = None) -> str:
        """Load (and on first use fetch and convert) a model now; returns its name. It stays loaded:
        other models a caller names are loaded too, at most LOADED_MODELS in all (least recently used evicted)."""
        self.kept_model = model or default_model()
        return self._answerer(self.kept_model).backbone.name

    @_locked
    def require_chunks(self) -> None:
        """MemstoreError when the store holds nothing to answer from."""
        if self.store.stats()["chunks"] == 0:
            raise MemstoreError("the store is empty; ingest documents first (`memstore ingest PATH`)")

    def build_kv(self, model: str | None = None, *, budget_gib: float | None = None,
                 progress: bool | None = False, ray: str | bool | None = None) -> dict:
        """Compute the KV memory of every chunk for `model` now, instead of on first retrieval.

        budget_gib: the largest KV memory on disk, kept in the store for every later ask
        (default: the store's, 4 GiB until one is set). ray: encode on a Ray cluster (True: a Ray
        started here or $RAY_ADDRESS; or an address) whose nodes all see the store's KV directory.
        """
        from tqdm import tqdm

        model = model or default_model()
        answerer = self._answerer(model, budget_gib)
        chunks = self.store.all_chunks()
        kv = answerer.stored_memory()
        todo_tokens = sum(answerer.kv_tokens(c) for c in answerer.without_memory(chunks))
        started = time.perf_counter()
        with tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=f"kv {answerer.backbone.weights}",
                  disable=not progress) as bar:  # only what is left: a resumed run counts its own work
            if ray:
                from memstore.model.ray_kv import encode_on_ray

                encoded = encode_on_ray(answerer, model, chunks, ray, progress=bar.update)
            else:
                encoded = answerer.precompute(chunks, progress=bar.update)  # refuses a budget too small
        seconds = time.perf_counter() - started
        if budget_gib is not None:
            self.store.set_setting("kv_budget_gib", float(budget_gib))
        return {"model": answerer.backbone.name, "weights": answerer.backbone.weights, "chunks": len(chunks),
                "encoded": encoded, "tokens": todo_tokens, "tokens_per_s": round(todo_tokens / seconds, 1) if encoded else None,
                "kv_bytes": kv.nbytes(), "seconds": round(seconds, 2)}

    @_locked
    def kv_warmup_order(self, model: str | None = None, questions: list[str] = (), k: int = TOP_K) -> list[ChunkRecord]:
        """Chunks whose KV memory `model` has not encoded yet, those most likely to be read first at the front.

        First the chunks that `questions` (the demo's examples) retrieve, then each document's
        opening chunks (where its title and overview are), then the rest in document order."""
        todo = self._answerer(model or default_model()).without_memory(self.store.all_chunks())
        first = [h.chunk_id for q in questions for h in self.search(q, k=k)]
        rank = {cid: i for i, cid in enumerate(dict.fromkeys(first))}
        return sorted(todo, key=lambda c: (rank.get(c.chunk_id, len(rank)), c.ordinal, c.chunk_id))

    @_locked
    def kv_status(self, model: str | None = None) -> dict:
        """How many of the store's chunks have KV memory for `model` (encoded, on disk)."""
        answerer = self._answerer(model or default_model())
        kv = answerer.stored_memory()
        ids = self.store.chunk_ids()
        return {"model": answerer.backbone.name, "chunks": len(ids),
                "warm": sum(kv.path(i).exists() for i in ids)}

    def encode_kv(self, chunks: list[ChunkRecord], model: str | None = None) -> int:
        """Encode these chunks' KV memory now (those without one); returns how many were encoded."""
        return self._answerer(model or default_model()).precompute(chunks, batch=len(chunks) or 1)

    def _answerer(self, model: str, budget_gib: float | None = None):
        """The model's Answerer, loaded once, with the KV budget given or else the store's."""
        from memstore.model.answer import Answerer
        from memstore.model.backbone import load_backbone

        with self.lock:
            budget = budget_gib if budget_gib is not None else self.store.get_setting("kv_budget_gib", KV_BUDGET_GIB)
        with self._models_lock:
            if model in self._answerers:
                self._answerers.move_to_end(model)
            else:
                evictable = [name for name in self._answerers if name != self.kept_model]
                while evictable and len(self._answerers) >= LOADED_MODELS:  # the least recently used goes
                    del self._answerers[evictable.pop(0)]
                self._answerers[model] = Answerer(load_backbone(model), self.store.kv_dir)
            answerer = self._answerers[model]
        answerer.kv_budget_bytes = int(budget * 2**30)
        return answerer

    @_locked
    def delete(self, source_or_id: str | int) -> bool:
        return self.store.delete_document(source_or_id)

    @_locked
    def stats(self) -> dict:
        return self.store.stats()

    @_locked
    def check(self) -> dict:
        return self.store.check()

    @_locked
    def repair(self) -> dict:
        return self.store.repair()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
