"""MemoryStore: one commit boundary over the SQL database and the FAISS index.

SQL is the source of truth. Every write runs in one SQL transaction that also bumps a
store generation; the FAISS index is updated in memory after the commit and saved
(atomically, stamped with the generation) at checkpoints. On open, and before every
search or write, an index whose generation differs from SQL's is reconciled from SQL:
missing vectors are added back from the copies kept in SQL, stale ones removed.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import URL

from memstore.errors import (
    EmbedderMismatchError,
    IndexCorruptError,
    NotAStoreError,
)
from memstore.store import db
from memstore.store.consistency import Consistency
from memstore.store.index import IndexConfig, VectorIndex
from memstore.store.reads import Reads
from memstore.store.schema import Setting
from memstore.store.search import Search
from memstore.store.writes import Writes

DB_FILE = "memstore.db"
INDEX_FILE = "vectors.faiss"


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


class MemoryStore(Writes, Search, Reads, Consistency):
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

