"""Ingestion spread over a Ray cluster: files are read and chunked by tasks, chunks embedded by a
pool of actors (one per node's worth of CPUs), and every file committed by the driver as soon as all of its chunks
are back, in one transaction as without Ray. So skip-unchanged, per-file replace, --prune and
resume after a kill behave exactly as in one process; a killed worker's task is retried by Ray.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from memstore.cluster import connect, node_share
from memstore.ingest.chunking import ChunkerConfig
from memstore.ingest.embed import Embedder, load_tokenizer, torch_threads
from memstore.ingest.loaders import Unsupported
from memstore.ingest.pipeline import (
    STORE_ERRORS,
    FileWork,
    Ingestor,
    _Pending,
    failure_reason,
    read_document,
    source_name,
)
from memstore.store import ChunkIn, DocumentIn

EMBED_BATCH = 64  # chunks per actor call: with the int8 embedder 256 held the first commit back twice as long, at the same chunks/s (scale.json and its previous run)
ACTOR_CPUS = 0.8  # per CPU an embedding actor holds: it runs an embedding thread there; the rest goes to reading
READ_CPUS = 0.2
MAX_BLOCKS = 2000
CHUNK_FIELDS = ("ordinal", "char_start", "char_end", "text", "token_count", "heading_path")


class RayIngestor(Ingestor):
    """An Ingestor whose reading, chunking and embedding run on a Ray cluster."""

    def __init__(self, *args, address: str | bool | None = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.address = address

    def _ingest_all(self, files: list[Path], rechunk: bool, bar, started: float) -> None:
        work = []
        for path in files:
            self.summary.files_seen += 1
            try:
                planned = self._plan(path, rechunk)
            except Exception as e:
                if isinstance(e, STORE_ERRORS):
                    raise
                self._fail(source_name(path), failure_reason(e), e)
                planned = None
            if planned is None:
                self._show(bar, started)
            else:
                work.append(planned)
        if work:
            self._run_on_ray(work, bar, started, done=len(files) - len(work), total=len(files))

    def _run_on_ray(self, work: list[FileWork], bar, started: float, done: int, total: int) -> None:
        ray = connect(self.address)
        actors, threads = node_share()
        # a block per file: the first file's chunks reach the embedders as soon as it is read
        rows = ray.data.from_items([asdict(w) for w in work], override_num_blocks=min(len(work), MAX_BLOCKS))
        # a reader per embedding actor: each reader process pays for its imports and tokenizer once
        chunked = rows.flat_map(read_and_chunk, num_cpus=READ_CPUS, compute=ray.data.TaskPoolStrategy(size=actors), fn_kwargs={
            "embedder": self.embedder.name, "config": asdict(self.config), "encoding": self.encoding, "meta": self.meta})
        embedded = chunked.map_batches(EmbedChunks, fn_constructor_kwargs={"embedder": self.embedder.name, "threads": threads},
                                       batch_size=EMBED_BATCH, num_cpus=ACTOR_CPUS * threads,
                                       compute=ray.data.ActorPoolStrategy(size=actors))
        by_source = {w.source: w for w in work}
        waiting: dict[str, list[dict]] = {}
        for row in embedded.iter_rows():
            source = row["source"]
            if row["problem"]:
                self._problem(by_source[source], row)
            else:
                waiting.setdefault(source, []).append(row)
                if len(waiting[source]) < row["chunks"]:
                    continue
                self._commit_rows(by_source[source], waiting.pop(source))
            done += 1
            self._show(bar, started)
            if self.on_commit:
                self.on_commit(done, total)

    def _commit_rows(self, work: FileWork, rows: list[dict]) -> None:
        rows.sort(key=lambda r: r["ordinal"])
        doc = DocumentIn(**json.loads(rows[0]["document"]))
        chunks = [ChunkIn(**{f: r[f] for f in CHUNK_FIELDS}) for r in rows]
        vectors = np.stack([np.asarray(r["vector"], dtype=np.float32) for r in rows])
        if self._commit(_Pending(doc, chunks, work.replaced), vectors):
            self.summary.files_ingested += 1

    def _problem(self, work: FileWork, row: dict) -> None:
        if row["problem"] == "unsupported":
            self._skip(work.source, row["reason"])
        elif row["problem"] == "no text":
            self._no_text(work)
        else:
            self._fail(work.source, row["reason"])


def read_and_chunk(item: dict, *, embedder: str, config: dict, encoding: str | None, meta: dict) -> list[dict]:
    """A Ray task: one file -> one row per chunk (or one row saying why there are none)."""
    work = FileWork(**item)
    try:
        tokenizer = load_tokenizer(embedder)  # once per worker process
        doc, chunker, chunks = read_document(work, tokenizer, ChunkerConfig(**config), encoding, meta)
        chunks = list(chunks)
        doc.char_count = chunker.char_count
    except Unsupported as e:
        return [_problem_row(work, "unsupported", str(e))]
    except Exception as e:  # noqa: BLE001 - reported as that file's failure, as without Ray
        return [_problem_row(work, "failed", failure_reason(e))]
    if not chunks:
        return [_problem_row(work, "no text", "no text found")]
    document = json.dumps(asdict(doc))
    return [{"source": work.source, "problem": "", "reason": "", "chunks": len(chunks), "document": document,
             **asdict(c)} for c in chunks]


def _problem_row(work: FileWork, problem: str, reason: str) -> dict:
    # every row has every column: Ray Data blocks are tables
    return {"source": work.source, "problem": problem, "reason": reason, "chunks": 0, "document": "",
            "ordinal": -1, "char_start": 0, "char_end": 0, "text": "", "token_count": 0, "heading_path": ""}


class EmbedChunks:
    """A Ray actor: embeds batches of chunk rows on `threads` threads."""

    def __init__(self, embedder: str, threads: int):
        self.embedder = Embedder(embedder, threads=threads)
        self.threads = threads

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch["text"]
        real = batch["chunks"] > 0
        vectors = np.zeros((len(texts), self.embedder.dim), dtype=np.float32)
        if real.any():
            with torch_threads(self.threads):
                vectors[real] = self.embedder.encode([str(t) for t in texts[real]])
        batch["vector"] = vectors
        return batch
