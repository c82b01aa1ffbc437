"""Files -> documents -> chunks -> embeddings -> store, incrementally and crash-safely.

Each file is committed in its own transaction, so a killed run loses at most the files
still being embedded; the next run skips every committed file (size and mtime, then
content hash). Chunks of small files are embedded together in large batches for speed.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from memstore.errors import InvalidInputError, StoreError
from memstore.ingest.chunking import Chunker, ChunkerConfig
from memstore.ingest.embed import Embedder
from memstore.ingest.loaders import LoadError, Unsupported, codec_name, load, one_line
from memstore.settings import embed_buffer
from memstore.store import ChunkIn, DocumentIn, MemoryStore

log = logging.getLogger("memstore.ingest")
# failures of the store itself end the run: no later file could be written either
STORE_ERRORS = (OperationalError, StoreError)

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
class FileWork:
    """A file to read: what the driver learnt about it before handing it to a reader."""

    path: str
    source: str
    digest: str
    size: int
    mtime: float
    replaced: int  # chunks of the stored version this file replaces
    known: bool  # a version of it is stored


def read_document(work: FileWork, tokenizer, config: ChunkerConfig, encoding: str | None,
                  meta: dict) -> tuple[DocumentIn, Chunker, Iterator[ChunkIn]]:
    """Load a file and cut it into chunks (lazily: `chunker.char_count` is known once they are all taken)."""
    path = Path(work.path)
    loaded = load(path, encoding)
    doc = DocumentIn(source=work.source, content_hash=work.digest, size=work.size, mtime=work.mtime,
                     char_count=0, title=loaded.title or source_name(path.name), meta=dict(meta),
                     encoding=loaded.encoding)
    chunker = Chunker(tokenizer, config)
    return doc, chunker, chunker.chunks(loaded.blocks)


@dataclass
class _Pending:
    doc: DocumentIn
    chunks: list[ChunkIn]
    replaced: int  # chunks of the stored version this document replaces


def discover(paths: Iterable[str | Path], glob: str | None, exclude: Path | None = None):
    """Files under `paths` (following symlinks, never looping). Returns (files, failed, skipped):
    a path that does not exist has failed; a broken symlink, a loop or a fifo is skipped."""
    files: list[Path] = []
    failed: list[dict] = []
    skipped: list[dict] = []
    for root in map(Path, paths):
        if root.is_dir():
            files += _walk(Path(os.path.abspath(root)), glob, exclude, failed, skipped)
        elif not root.exists():
            (skipped if root.is_symlink() else failed).append(
                _problem(root, "broken symlink" if root.is_symlink() else "no such file or directory"))
        elif not root.is_file():
            skipped.append(_problem(root, "not a regular file (a fifo, socket or device), skipped"))
        else:
            files.append(Path(os.path.abspath(root)))
    return list(dict.fromkeys(files)), failed, skipped


def source_name(path: str | Path) -> str:
    """A path as stored and shown: a file name that is not valid UTF-8 keeps its odd bytes as \\xNN."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def _problem(path: str | Path, reason: str) -> dict:
    return {"path": source_name(path), "reason": reason}


def _walk(root: Path, glob: str | None, exclude: Path | None, failed: list[dict], skipped: list[dict]) -> list[Path]:
    seen_dirs: set[tuple[int, int]] = set()
    found = []

    def on_error(err: OSError):
        failed.append(_problem(err.filename, err.strerror or str(err)))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        try:
            st = os.stat(dirpath)
        except OSError as e:  # removed while we walk
            on_error(e)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            skipped.append(_problem(dirpath, "symlink loop, not followed"))
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
                skipped.append(_problem(path, "broken symlink"))
            elif not path.is_file():
                skipped.append(_problem(path, "not a regular file (a fifo, socket or device), skipped"))
            else:
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
                 meta: dict | None = None, progress: bool | None = None, encoding: str | None = None,
                 on_commit: Callable[[int, int], None] | None = None):
        """on_commit(files done, files in all) is called whenever every file so far is committed."""
        self.store = store
        self.on_commit = on_commit
        self.embedder = embedder
        self.config = (chunker or ChunkerConfig()).validate(embedder.max_tokens)
        self.meta = meta or {}
        self.progress = progress
        self.encoding = _known_encoding(encoding)  # text files' encoding if the user names one; else per file
        self.summary = IngestSummary()
        self.embed_buffer = embed_buffer()  # chunks from small files per embedding call
        self._pending: list[_Pending] = []

    def run(self, paths: Iterable[str | Path], glob: str | None = None, prune: bool = False) -> IngestSummary:
        started = time.perf_counter()
        paths = [Path(p) for p in paths]
        store, summary = self.store, self.summary
        store.require_embedder(self.embedder.name, self.embedder.dim)
        rechunk = self._chunker_changed()
        files, failed, skipped = discover(paths, glob, exclude=store.dir.resolve())
        summary.files_failed += len(failed)
        summary.failed += failed
        summary.files_skipped += len(skipped)
        summary.skipped += skipped
        run_id = store.start_run()
        checkpoint, store.checkpoint_seconds = store.checkpoint_seconds, 30.0
        status = "interrupted"
        bar = _progress(len(files), self.progress)
        try:
            self._ingest_all(files, rechunk, bar, started)
            if self.on_commit:
                self.on_commit(len(files), len(files))
            if prune:
                self._prune(paths, set(map(source_name, files)) | {p["path"] for p in failed + skipped})
            store.set_setting("chunker", self._chunker_signature())
            status = "done" if summary.ok else "failed"
        finally:
            bar.close()
            summary.seconds = round(time.perf_counter() - started, 3)
            store.checkpoint_seconds = checkpoint
            store.save_index()
            store.finish_run(run_id, status, {k: v for k, v in summary.to_dict().items() if not isinstance(v, list)})
        return summary

    def _ingest_all(self, files: list[Path], rechunk: bool, bar, started: float) -> None:
        """Read, embed and commit the files here, small files' chunks embedded together."""
        for path in files:
            self.summary.files_seen += 1
            self._ingest_file(path, rechunk)
            if self._pending_chunks() >= self.embed_buffer:
                self._flush()
            self._show(bar, started)
            if self.on_commit and not self._pending:
                self.on_commit(self.summary.files_seen, len(files))
        self._flush()

    def _show(self, bar, started: float) -> None:
        bar.update(1)
        rate = self.summary.chunks_added / max(1e-9, time.perf_counter() - started)
        bar.set_postfix(chunks=self.summary.chunks_added, rate=f"{rate:.0f} chunks/s")

    # ---- one file ------------------------------------------------------------------------

    def _plan(self, path: Path, rechunk: bool) -> FileWork | None:
        """What reading `path` would replace, or None when the stored version is current (skipped)."""
        source = source_name(path)
        st = path.stat()
        known = self.store.document(source)
        if known and not rechunk and known["size"] == st.st_size and known["mtime"] == st.st_mtime:
            self.summary.files_skipped += 1
            return None
        digest = file_hash(path)
        if known and not rechunk and known["content_hash"] == digest:
            self.store.touch_document(source, st.st_size, st.st_mtime)
            self.summary.files_skipped += 1
            return None
        if st.st_size == 0:
            self._skip(source, "empty file")
            return None
        return FileWork(str(path), source, digest, st.st_size, st.st_mtime, self._chunks_of(known), known is not None)

    def _ingest_file(self, path: Path, rechunk: bool) -> None:
        source = source_name(path)
        try:
            work = self._plan(path, rechunk)
            if work is None:
                return
            doc, chunker, chunks = read_document(work, self.embedder.tokenizer, self.config, self.encoding, self.meta)
            head = _take(chunks, STREAM_AFTER)
            if len(head) < STREAM_AFTER:
                doc.char_count = chunker.char_count
                if not head:
                    self._no_text(work)
                    return
                self._pending.append(_Pending(doc, head, work.replaced))
            else:
                self._flush()
                self._stream_document(doc, chunker, head, chunks)
                self.summary.chunks_removed += work.replaced
            self.summary.files_ingested += 1
        except Unsupported as e:
            self._skip(source, str(e))
        except Exception as e:
            if isinstance(e, STORE_ERRORS):
                raise
            self._fail(source, failure_reason(e), e)

    def _no_text(self, work: FileWork) -> None:
        self._skip(work.source, "no text found")
        if work.known:
            self._delete(work.source)

    def _stream_document(self, doc: DocumentIn, chunker: Chunker, head: list[ChunkIn], rest: Iterator[ChunkIn]) -> None:
        """A large document: embed and insert batch by batch inside one transaction."""
        added: list[ChunkIn] = []
        with self.store.document_writer(doc) as writer:
            batch = head
            while batch:
                writer.add(batch, self.embedder.encode([c.text for c in batch]))
                added += batch
                batch = _take(rest, self.embed_buffer * 4)
            writer.set_char_count(chunker.char_count)
        self._count_added(added)  # only once committed: a failure rolls the whole document back

    def _flush(self) -> None:
        """Embed all pending chunks in one call, then commit each document on its own. If that
        call fails, each document is embedded alone, so only the one that fails is reported."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            vectors = self.embedder.encode([c.text for p in pending for c in p.chunks])
        except Exception as e:  # noqa: BLE001
            if len(pending) == 1:
                self.summary.files_ingested -= 1
                self._fail(pending[0].doc.source, failure_reason(e, "embedding"), e)
                return
            for p in pending:
                self._pending = [p]
                self._flush()
            return
        start = 0
        for p in pending:
            part = vectors[start:start + len(p.chunks)]
            start += len(p.chunks)
            if not self._commit(p, part):
                self.summary.files_ingested -= 1

    def _commit(self, p: _Pending, vectors: np.ndarray) -> bool:
        """Store one document with its chunks and vectors in one transaction; a refusal is that file's failure."""
        try:
            self.store.add_document(p.doc, p.chunks, vectors)
        except Exception as e:
            if isinstance(e, STORE_ERRORS):
                raise
            self._fail(p.doc.source, failure_reason(e, "storing"), e)
            return False
        self.summary.chunks_removed += p.replaced
        self._count_added(p.chunks)
        return True

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

    def _fail(self, source: str, reason: str, error: BaseException | None = None) -> None:
        self.summary.files_failed += 1
        self.summary.failed.append({"path": source, "reason": reason})
        log.info("failed: %s: %s", source, reason, exc_info=error)

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


def _known_encoding(name: str | None) -> str | None:
    if name is None:
        return None
    try:
        return codec_name(name)
    except LookupError:
        raise InvalidInputError(f"unknown encoding {name!r} (try utf-8, utf-16, cp1252, latin-1, shift_jis, gb18030)") from None


def failure_reason(error: BaseException, stage: str = "reading") -> str:
    """One line for the user: what failed and why (the traceback goes to the log with --verbose)."""
    if isinstance(error, LoadError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return "vanished during ingest"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if isinstance(error, RecursionError):
        return f"too deeply nested to process ({stage})"
    if isinstance(error, MemoryError):
        return f"ran out of memory ({stage})"
    if isinstance(error, SQLAlchemyError):
        return f"the database refused it ({type(error).__name__}: {one_line(error)})"
    return f"internal error while {stage} it ({type(error).__name__}: {one_line(error)}); --verbose logs the traceback"


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out
