"""Files -> documents -> chunks -> embeddings -> store, incrementally and crash-safely.

Each file is committed in its own transaction, so a killed run loses at most the files
still being embedded; the next run skips every committed file (size and mtime, then
content hash). Chunks of small files are embedded together in large batches for speed.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ingest.chunking import Chunker, ChunkerConfig
from ingest.embed import Embedder
from ingest.loaders import LoadError, Unsupported, load
from memstore.store import ChunkIn, DocumentIn, MemoryStore

EMBED_BUFFER = int(os.environ.get("MEMSTORE_EMBED_BUFFER", 256))  # chunks from small files per embedding call
STREAM_AFTER = 2048  # a document with more chunks than this is written batch by batch


@dataclass
class IngestSummary:
    files_seen: int = 0
    files_ingested: int = 0
    files_skipped: int = 0
    files_failed: int = 0
    documents_removed: int = 0
    chunks_added: int = 0
    chunks_removed: int = 0
    tokens_added: int = 0
    seconds: float = 0.0
    failed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # unsupported or empty files, with the reason

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def ok(self) -> bool:
        return self.files_failed == 0


@dataclass
class _Pending:
    doc: DocumentIn
    chunks: list[ChunkIn]
    replaced: int  # chunks of the stored version this document replaces


def discover(paths: Iterable[str | Path], glob: str | None, exclude: Path | None = None):
    """Files under `paths` (following symlinks, never looping). Returns (files, problems)."""
    files: list[Path] = []
    problems: list[dict] = []
    for root in map(Path, paths):
        if not root.exists():
            kind = "broken symlink" if root.is_symlink() else "no such file or directory"
            problems.append({"path": str(root), "reason": kind})
        elif root.is_file():
            files.append(Path(os.path.abspath(root)))
        else:
            files += _walk(Path(os.path.abspath(root)), glob, exclude, problems)
    return list(dict.fromkeys(files)), problems


def _walk(root: Path, glob: str | None, exclude: Path | None, problems: list[dict]) -> list[Path]:
    seen_dirs: set[tuple[int, int]] = set()
    found = []

    def on_error(err: OSError):
        problems.append({"path": err.filename, "reason": err.strerror or str(err)})

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:
            problems.append({"path": dirpath, "reason": "symlink loop, not followed"})
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or Path(dirpath, d).resolve() != exclude))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.startswith(".") or (glob and not _matches(path, root, glob)):
                continue
            if not path.exists():
                problems.append({"path": str(path), "reason": "broken symlink"})
                continue
            found.append(path)
    return found


def _matches(path: Path, root: Path, pattern: str) -> bool:
    target = str(path.relative_to(root)) if "/" in pattern else path.name
    return fnmatch.fnmatch(target, pattern)


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _progress(total: int, enabled: bool | None):
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="file", disable=not enabled, dynamic_ncols=True, desc="ingest")


class Ingestor:
    def __init__(self, store: MemoryStore, embedder: Embedder, chunker: ChunkerConfig | None = None,
                 meta: dict | None = None, progress: bool | None = None):
        self.store = store
        self.embedder = embedder
        self.config = (chunker or ChunkerConfig()).validate(embedder.max_tokens)
        self.meta = meta or {}
        self.progress = progress
        self.summary = IngestSummary()
        self._pending: list[_Pending] = []

    def run(self, paths: Iterable[str | Path], glob: str | None = None, prune: bool = False) -> IngestSummary:
        started = time.perf_counter()
        paths = [Path(p) for p in paths]
        store, summary = self.store, self.summary
        store.require_embedder(self.embedder.name, self.embedder.dim)
        rechunk = self._chunker_changed()
        files, problems = discover(paths, glob, exclude=store.dir.resolve())
        summary.files_failed += len(problems)
        summary.failed += problems
        run_id = store.start_run()
        checkpoint, store.checkpoint_seconds = store.checkpoint_seconds, 30.0
        status = "interrupted"
        bar = _progress(len(files), self.progress)
        try:
            for path in files:
                summary.files_seen += 1
                self._ingest_file(path, rechunk)
                if self._pending_chunks() >= EMBED_BUFFER:
                    self._flush()
                bar.update(1)
                bar.set_postfix(chunks=summary.chunks_added,
                                rate=f"{summary.chunks_added / max(1e-9, time.perf_counter() - started):.0f} chunks/s")
            self._flush()
            if prune:
                self._prune(paths, set(map(str, files)) | {p["path"] for p in problems})
            store.set_setting("chunker", self._chunker_signature())
            status = "done" if summary.ok else "failed"
        finally:
            bar.close()
            summary.seconds = round(time.perf_counter() - started, 3)
            store.checkpoint_seconds = checkpoint
            store.save_index()
            store.finish_run(run_id, status, {k: v for k, v in summary.to_dict().items() if not isinstance(v, list)})
        return summary

    # ---- one file ------------------------------------------------------------------------

    def _ingest_file(self, path: Path, rechunk: bool) -> None:
        source = str(path)
        try:
            st = path.stat()
            known = self.store.document(source)
            if known and not rechunk and known["size"] == st.st_size and known["mtime"] == st.st_mtime:
                self.summary.files_skipped += 1
                return
            digest = file_hash(path)
            if known and not rechunk and known["content_hash"] == digest:
                self.store.touch_document(source, st.st_size, st.st_mtime)
                self.summary.files_skipped += 1
                return
            if st.st_size == 0:
                self._skip(source, "empty file")
                return
            loaded = load(path)
            doc = DocumentIn(source=source, content_hash=digest, size=st.st_size, mtime=st.st_mtime,
                             char_count=0, title=loaded.title or path.name, meta=dict(self.meta))
            chunker = Chunker(self.embedder.tokenizer, self.config)
            chunks = chunker.chunks(loaded.blocks)
            head = _take(chunks, STREAM_AFTER)
            replaced = self._chunks_of(known)  # counted before the new version replaces it
            if len(head) < STREAM_AFTER:
                doc.char_count = chunker.char_count
                if not head:
                    self._skip(source, "no text found")
                    if known:
                        self._delete(source)
                    return
                self._pending.append(_Pending(doc, head, replaced))
            else:
                self._flush()
                self._stream_document(doc, chunker, head, chunks)
                self.summary.chunks_removed += replaced
            self.summary.files_ingested += 1
        except Unsupported as e:
            self._skip(source, str(e))
        except LoadError as e:
            self._fail(source, str(e))
        except FileNotFoundError:
            self._fail(source, "vanished during ingest")
        except PermissionError:
            self._fail(source, "permission denied")
        except IsADirectoryError:
            self._fail(source, "is a directory")
        except OSError as e:
            self._fail(source, e.strerror or str(e))

    def _stream_document(self, doc: DocumentIn, chunker: Chunker, head: list[ChunkIn], rest: Iterator[ChunkIn]) -> None:
        """A large document: embed and insert batch by batch inside one transaction."""
        with self.store.document_writer(doc) as writer:
            batch = head
            while batch:
                writer.add(batch, self.embedder.encode([c.text for c in batch]))
                self._count_added(batch)
                batch = _take(rest, EMBED_BUFFER * 4)
            writer.set_char_count(chunker.char_count)

    def _flush(self) -> None:
        """Embed all pending chunks in one call, then commit each document on its own."""
        if not self._pending:
            return
        texts = [c.text for p in self._pending for c in p.chunks]
        vectors = self.embedder.encode(texts)
        start = 0
        for p in self._pending:
            self.store.add_document(p.doc, p.chunks, vectors[start:start + len(p.chunks)])
            self.summary.chunks_removed += p.replaced
            self._count_added(p.chunks)
            start += len(p.chunks)
        self._pending.clear()

    def _count_added(self, chunks: list[ChunkIn]) -> None:
        self.summary.chunks_added += len(chunks)
        self.summary.tokens_added += sum(c.token_count for c in chunks)

    def _chunks_of(self, known: dict | None) -> int:
        return self.store.chunk_count(known["id"]) if known else 0

    def _pending_chunks(self) -> int:
        return sum(len(p.chunks) for p in self._pending)

    def _skip(self, source: str, reason: str) -> None:
        self.summary.files_skipped += 1
        self.summary.skipped.append({"path": source, "reason": reason})

    def _fail(self, source: str, reason: str) -> None:
        self.summary.files_failed += 1
        self.summary.failed.append({"path": source, "reason": reason})

    def _delete(self, source: str) -> None:
        self.summary.chunks_removed += self._chunks_of(self.store.document(source))
        if self.store.delete_document(source):
            self.summary.documents_removed += 1

    # ---- prune and settings ----------------------------------------------------------------

    def _prune(self, roots: list[Path], seen: set[str]) -> None:
        """Remove documents under the given roots whose files are gone."""
        prefixes = [os.path.abspath(r) for r in roots]
        for doc in self.store.documents():
            src = doc["source"]
            under = any(src == p or src.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes)
            if under and src not in seen and not os.path.exists(src):
                self._delete(src)

    def _chunker_signature(self) -> dict:
        return {"size": self.config.size, "overlap": self.config.overlap, "tokenizer": self.embedder.name}

    def _chunker_changed(self) -> bool:
        stored = self.store.get_setting("chunker")
        return stored is not None and stored != self._chunker_signature()


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out
